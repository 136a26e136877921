"""model.py: the 1.8B shape on the meta device, forward(idx, targets) against log_softmax, the zero-init first loss,
causality, the soft-cap, FLOPs per token by hand, meta build + init, and no MFU on CPU."""
import math

import torch
import torch.nn.functional as F

import model as gpt


def tiny(**overrides):
    return gpt.config_for("tiny", **dict(dict(vocab_size=320, seq_len=16), **overrides))


def random_model(cfg, seed=0):
    """A tiny GPT with every weight random (the fresh init has a zero head and zero residual writers, which
    would make the logit tests trivial)."""
    torch.manual_seed(seed)
    m = gpt.GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_1p8b_config_on_meta():
    cfg = gpt.config_for("1.8B", vocab_size=50304, seq_len=2048)
    with torch.device("meta"):
        m = gpt.GPT(cfg)
    assert all(p.is_meta for p in m.parameters())  # no memory spent
    n = m.num_params()
    assert 1.70e9 <= n <= 1.95e9, n
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.mlp_hidden) == (30, 2048, 16, 5632)
    assert len(m.blocks) == 30 and m.blocks[0].attn.n_head == 16 and m.blocks[0].attn.head_dim == 128
    assert m.blocks[0].mlp.gate_up.weight.shape == (2 * 5632, 2048)  # SwiGLU: gate and up
    assert m.blocks[0].mlp.down.weight.shape == (2048, 5632)
    # untied: the head is its own (V, C) matrix, counted once next to the embedding
    assert m.head.weight is not m.embed.weight and m.head.weight.shape == m.embed.weight.shape == (50304, 2048)
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632
    assert n == 30 * per_layer + 2 * 50304 * 2048
    assert m.num_params(embedding=False) == n - 50304 * 2048


def test_forward_targets_is_log_softmax_of_forward():
    cfg = tiny()
    m = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m(idx)
        lp = m(idx, targets)
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == torch.float32
    assert lp.shape == (3, 16)
    by_hand = torch.stack([torch.stack([logits[b, t] - torch.logsumexp(logits[b, t], 0) for t in range(16)])
                           for b in range(3)])  # (B, T, V)
    expected = by_hand.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)
    assert lp.std() > 0.1  # not a degenerate (uniform) model


def test_fresh_model_first_loss_is_log_vocab():
    cfg = tiny()
    m = gpt.build(cfg, "cpu")
    assert torch.count_nonzero(m.head.weight) == 0
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        loss = -m(idx, torch.roll(idx, -1, 1)).mean()
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1e-5


def test_causal_future_tokens_do_not_change_the_past():
    cfg = tiny()
    m = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = F.log_softmax(m(idx), -1), F.log_softmax(m(changed), -1)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3  # the change does reach positions 10 and on


def test_softcap_bounds_logits():
    cfg = tiny()
    m = random_model(cfg)
    with torch.no_grad():
        m.head.weight.mul_(100)  # raw logits far beyond the cap
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        z = m(idx)
        m.cfg.softcap = 0  # the same weights, uncapped
        raw = m(idx)
    assert z.abs().max() <= 15.0 and z.abs().max() > 14.0
    assert raw.abs().max() > 100
    torch.testing.assert_close(z, 15 * torch.tanh(raw / 15))


def test_flops_per_token_by_hand():
    cfg = tiny(seq_len=128)  # L=2, C=64, mlp 176, V=320, T=128
    m = gpt.GPT(cfg)
    per_layer = 64 * 192 + 64 * 64 + 64 * 352 + 176 * 64  # qkv, proj, gate_up, down = 50176
    n = 2 * per_layer + 320 * 64  # + head; the embedding lookup is left out: 120832
    assert m.num_params(embedding=False) == n == 120832
    assert m.flops_per_token() == 6 * n + 12 * 2 * 128 * 64 == 921600


def test_build_on_meta_then_init_gives_finite_weights():
    cfg = tiny()
    m = gpt.build(cfg, "cpu")
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert t.device.type == "cpu" and torch.isfinite(t).all(), name
    assert m.embed.weight.std() > 0.5 and m.blocks[0].attn.qkv.weight.std() > 0.05
    for block in m.blocks:  # residual writers start at zero: every block is the identity
        assert torch.count_nonzero(block.attn.proj.weight) == 0 and torch.count_nonzero(block.mlp.down.weight) == 0
    torch.testing.assert_close(m.rope_cos[0], torch.ones_like(m.rope_cos[0]))
    torch.testing.assert_close(m.rope_sin[3, 0], torch.tensor(math.sin(3.0)))


def test_peak_flops_none_on_cpu():
    assert gpt.peak_flops("cpu") is None
    assert gpt.peak_flops(torch.device("cpu")) is None


def test_dropout_only_on_the_residual_branches(monkeypatch):
    """As the reference: dropout on the attention and MLP outputs, not on the embedding or the attention
    probabilities. At init the residual writers (proj, down) are zero, so a train-mode forward with dropout must
    equal the eval-mode one; embedding dropout would change it."""
    model = gpt.GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 320, (2, 16))
    model.eval()
    ref = model(idx)
    model.train()
    torch.manual_seed(0)
    assert torch.equal(model(idx), ref)
    seen = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: seen.append(k.get("dropout_p", 0.0)) or real_sdpa(*a, **k))
    model(idx)
    assert seen == [0.0] * model.cfg.n_layer  # no dropout on the attention probabilities, even in training
    with torch.no_grad():  # the residual branches do drop: with non-zero writers, train mode is random
        for b in model.blocks:
            b.mlp.down.weight.normal_(std=0.1)
        model.head.weight.normal_(std=0.1)
    model.eval()
    ref = model(idx)
    model.train()
    assert not torch.equal(model(idx), ref)
