"""model.py: the 1.8B shape on the meta device (and Muon's per-matrix LR there), forward(idx, targets) against
log_softmax, no mass on padded ids, the embedding norm, the first loss, causality, the soft-cap, FLOPs per token by
hand, meta build + init, no MFU on CPU, cautious weight decay against a hand computation, the memory estimate."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as gpt
import runtime


def tiny(**overrides):
    return gpt.config_for("tiny", **dict(dict(vocab_size=257, seq_len=16), **overrides))  # 257 bytes: 320 rows


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
    cfg = gpt.config_for("1.8B", vocab_size=50257, seq_len=2048)
    with torch.device("meta"):
        m = gpt.GPT(cfg)
    assert all(p.is_meta for p in m.parameters())  # no memory spent
    n = m.num_params()
    assert 1.70e9 <= n <= 1.95e9, n
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.mlp_hidden) == (30, 2048, 16, 5632)
    assert len(m.blocks) == 30 and m.blocks[0].attn.n_head == 16 and m.blocks[0].attn.head_dim == 128
    assert m.blocks[0].attn.q.weight.shape == m.blocks[0].attn.v.weight.shape == (2048, 2048)
    assert m.blocks[0].mlp.gate.weight.shape == m.blocks[0].mlp.up.weight.shape == (5632, 2048)  # SwiGLU
    assert m.blocks[0].mlp.down.weight.shape == (2048, 5632)
    # untied: the head is its own (V, C) matrix, counted once next to the embedding
    assert m.head.weight is not m.embed.weight and m.head.weight.shape == m.embed.weight.shape == (50304, 2048)  # padded
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632
    assert n == 30 * per_layer + 2 * 50304 * 2048
    assert m.num_params(embedding=False) == n - 50304 * 2048


def test_muon_lr_factor_per_matrix_at_1p8b():
    """torch.optim.Muon scales each parameter's LR by sqrt(max(1, rows/cols)): as separate matrices (the reference) q, k,
    v and both writers get 1 and gate, up sqrt(5632/2048) = 1.66; fused, qkv got 1.73 and gate_up 2.35."""
    with torch.device("meta"):
        m = gpt.GPT(gpt.config_for("1.8B", vocab_size=50257, seq_len=2048))
    factors = {n.split(".", 2)[2]: gpt.muon_lr_factor(p.shape) for n, p in m.named_parameters() if n.startswith("blocks.0.")}
    assert factors == {"attn.q.weight": 1.0, "attn.k.weight": 1.0, "attn.v.weight": 1.0, "attn.proj.weight": 1.0,
                       "mlp.gate.weight": (5632 / 2048) ** 0.5, "mlp.up.weight": (5632 / 2048) ** 0.5, "mlp.down.weight": 1.0}
    assert abs(factors["mlp.gate.weight"] - 1.658) < 1e-3
    assert torch.optim._muon._adjust_lr(1.0, None, m.blocks[0].mlp.up.weight.shape) == factors["mlp.up.weight"]  # torch's own


def test_forward_targets_is_log_softmax_of_forward():
    cfg = tiny()
    m = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m(idx)
        lp = m(idx, targets)
    assert logits.shape == (3, 16, 257) and logits.dtype == torch.float32
    assert lp.shape == (3, 16)
    by_hand = torch.stack([torch.stack([logits[b, t] - torch.logsumexp(logits[b, t], 0) for t in range(16)])
                           for b in range(3)])  # (B, T, V)
    expected = by_hand.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)
    assert lp.std() > 0.1  # not a degenerate (uniform) model


def test_no_probability_mass_on_padded_ids():
    """The head has 320 rows for 257 byte ids: logits, softmax and loss run over the 257 real ids only."""
    cfg = tiny()
    m = random_model(cfg)
    assert cfg.padded_vocab_size == 320 and m.head.weight.shape[0] == 320
    idx = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        z = m(idx)
        lp = m(idx, idx)
        m.head.weight[257:] = 0  # padded rows that would hold mass if the softmax saw them: the result must not move
        torch.testing.assert_close(m(idx, idx), lp)
    assert z.shape[-1] == 257
    torch.testing.assert_close(torch.softmax(z, -1).sum(-1), torch.ones(2, 16))


def test_embedding_is_rms_normed_before_the_first_block():
    """x = rms_norm(wte(idx)) as the reference: scaling the embedding leaves every logit unchanged."""
    m = random_model(tiny())
    idx = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        z = m(idx)
        m.embed.weight.mul_(7.0)
        torch.testing.assert_close(m(idx), z, rtol=1e-5, atol=1e-5)


def test_fresh_model_first_loss_is_log_vocab():
    cfg = tiny()
    m = gpt.build(cfg, "cpu")
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        loss = -m(idx, torch.roll(idx, -1, 1)).mean()
    assert abs(loss.item() - math.log(257)) < 1e-3  # head N(0, 0.001): logits near 0, over the 257 real ids


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
    per_layer = 3 * 64 * 64 + 64 * 64 + 2 * 64 * 176 + 176 * 64  # q, k, v, proj, gate, up, down = 50176
    n = 2 * per_layer + 320 * 64  # + head (its padded rows are computed too); the embedding lookup is left out: 120832
    assert m.num_params(embedding=False) == n == 120832
    assert runtime.flops_per_token(m) == 6 * n + 12 * 2 * 128 * 64 == 921600


def test_build_on_meta_then_init_gives_finite_weights():
    cfg = tiny()
    m = gpt.build(cfg, "cpu")
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert t.device.type == "cpu" and torch.isfinite(t).all(), name
    s = 64 ** -0.5  # the reference's init (init_weights)
    assert abs(m.embed.weight.std() - 1) < 0.05 and abs(m.head.weight.std() - 0.001) < 1e-4
    for block in m.blocks:
        for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up):  # uniform, std s
            assert lin.weight.abs().max() <= 3 ** 0.5 * s and abs(lin.weight.std() / s - 1) < 0.1
        for lin in (block.attn.proj, block.mlp.down):  # N(0, s)
            assert lin.weight.abs().max() > 3 ** 0.5 * s and abs(lin.weight.std() / s - 1) < 0.1
    torch.testing.assert_close(m.rope_cos[0], torch.ones_like(m.rope_cos[0]))
    torch.testing.assert_close(m.rope_sin[3, 0], torch.tensor(math.sin(3.0)))


def test_peak_flops_none_on_cpu():
    assert runtime.peak_flops("cpu") is None
    assert runtime.peak_flops(torch.device("cpu")) is None


def test_a_cpu_run_flushes_subnormals_to_zero():
    """Weight decay shrinks the rows of bytes never seen (and of dead units) into the subnormal range (< 1.2e-38),
    where x86 arithmetic ran a 90-cycle member's forward and backward 5.8x slower (BENCHMARKS.md 1j):
    pick_device("cpu") turns on flush-to-zero, so 1e-20 * 1e-20 is 0, not 1e-40."""
    a, b = torch.tensor([1e-20]), torch.tensor([1e-20])
    try:
        torch.set_flush_denormal(False)
        assert 0 < (a * b).item() < 1.2e-38  # the subnormal, without the flag
        assert runtime.pick_device("cpu") == torch.device("cpu")
        assert (a * b).item() == 0.0
    finally:
        torch.set_flush_denormal(False)  # torch's default, for the tests after this one


def test_dropout_only_on_the_residual_branches(monkeypatch):
    """As the reference: dropout on the attention and MLP outputs, not on the embedding or the attention
    probabilities. With the residual writers (proj, down) zeroed, a train-mode forward with dropout must equal the
    eval-mode one; embedding dropout would change it."""
    model = gpt.GPT(tiny(dropout=0.5))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.proj.weight.zero_()
            b.mlp.down.weight.zero_()
    idx = torch.randint(0, 257, (2, 16))
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


def muon_pair(shapes, wd, seed=0):
    """Two copies of the same random matrices with the same grads: one under torch.optim.Muon at weight_decay 0,
    one under Muon(weight_decay=wd) made cautious."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    plain, cautious = [nn.Parameter(w.clone()) for w in ws], [nn.Parameter(w.clone()) for w in ws]
    opt_plain = torch.optim.Muon(plain, lr=0.1, weight_decay=0.0, momentum=0.95)
    opt_cautious = torch.optim.Muon(cautious, lr=0.1, weight_decay=wd, momentum=0.95)
    gpt.cautious_weight_decay(opt_cautious)
    return plain, cautious, grads, opt_plain, opt_cautious


def test_cautious_weight_decay_against_a_hand_computation():
    """p <- p - lr' X - lr' wd p [X p >= 0], lr' = lr sqrt(max(1, rows/cols)): X from Muon at wd 0, the decay by hand,
    over two steps (momentum in play); a tall matrix gets lr' = lr sqrt(2), a wide one lr."""
    wd = 1.3
    plain, cautious, grads, opt_plain, opt_cautious = muon_pair([(6, 3), (3, 5)], wd)
    decayed = []
    for step in range(2):
        before = [p.detach().clone() for p in cautious]
        with torch.no_grad():
            for p, p0 in zip(plain, before):  # Muon at wd 0 from the cautious run's weights (same momentum): lr' X
                p.copy_(p0)
        for p, q, gr in zip(plain, cautious, grads):
            p.grad, q.grad = gr * (step + 1), gr * (step + 1)
        opt_plain.step()
        opt_cautious.step()
        assert opt_cautious.param_groups[0]["weight_decay"] == wd  # put back after the step
        for p0, pa, pc, lr in zip(before, plain, cautious, (0.1 * 2 ** 0.5, 0.1)):
            X = (p0 - pa.detach()) / lr
            mask = (X * p0 >= 0).float()
            expected = p0 - lr * X - lr * wd * p0 * mask
            torch.testing.assert_close(pc.detach(), expected, rtol=1e-6, atol=1e-6)
            decayed.append(mask.mean().item())
    assert 0.2 < sum(decayed) / len(decayed) < 0.8  # about half the entries decay, as the reference notes


def test_cautious_weight_decay_is_plain_muon_at_zero_wd():
    plain, cautious, grads, opt_plain, opt_cautious = muon_pair([(4, 4)], 0.0)
    for ps in (plain, cautious):
        ps[0].grad = grads[0].clone()
    opt_plain.step()
    opt_cautious.step()
    assert torch.equal(plain[0], cautious[0])  # wd 0: exactly Muon


def test_memory_estimate_arithmetic_by_hand():
    cfg = tiny(seq_len=16)  # L=2, C=64, M=176, H=4, V=257 (320 rows); micro-batch 2: n = 32 tokens
    est = runtime.memory_estimate(cfg, 2, teacher="bf16", eval_batch=3)
    n_muon, n_embed = 2 * (4 * 64 * 64 + 3 * 64 * 176), 320 * 64  # 100352, 20480
    N = n_muon + 2 * n_embed
    assert N == gpt.GPT(cfg).num_params()
    assert (est["weights"], est["grads"], est["muon_momentum"], est["adam_moments"]) == (4 * N, 4 * N, 4 * n_muon, 16 * n_embed)
    assert est["teacher"] == 2 * N and est["weight_casts"] == 2 * (N - n_embed)
    per_block = 36 * 64 + 8 * 176 + 12 * 4 + 8  # 3768 bytes a token
    assert est["activations"] == 32 * 2 * per_block + 32 * (10 * 64 + 24)
    assert est["logits_train"] == 8 * 32 * 257 * 4 and est["logits_eval"] == 3 * 16 * (8 * 257 + 2 * 320)
    held = 4 * N + 4 * n_muon + 16 * n_embed + 2 * N
    assert est["peak_train"] == held + 4 * N + 2 * (N - n_embed) + est["activations"] + est["logits_train"]
    assert est["peak_eval"] == held + est["logits_eval"]
    assert runtime.memory_estimate(cfg, 2, teacher=None)["teacher"] == 0
    assert runtime.memory_estimate(cfg, 2, teacher="fp32", teachers=4)["teacher"] == 16 * N


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_memory_estimate_activations_are_what_autograd_keeps(dropout):
    """Under bf16 autocast (CPU's here), the bytes of every distinct tensor saved for the backward: the matrices' bf16
    casts plus the activations plus the two kept logits tensors (tanh's and log-softmax's outputs), as estimated."""
    cfg = tiny(seq_len=32, dropout=dropout)
    m = gpt.GPT(cfg).train()
    storages = {}

    def pack(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    idx, targets = torch.randint(0, 257, (2, 32)), torch.randint(0, 257, (2, 32))
    fixed = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}  # RoPE tables too
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        m(idx, targets)
    saved = sum(b for ptr, b in storages.items() if ptr not in fixed and b > 8)  # and a 0-d scalar
    est = runtime.memory_estimate(cfg, 2)
    assert saved == est["weight_casts"] + est["activations"] + 2 * 2 * 32 * 257 * 4


def test_a_member_file_of_another_model_fails_with_a_message(tmp_path):
    """A member saved by another model.py (here model v1's fused qkv and gate_up) stops with one line that says so, no
    traceback."""
    import config
    import store
    cfg = tiny()
    state = {k.replace("attn.q.", "attn.qkv.").replace("mlp.gate.", "mlp.gate_up."): v
             for k, v in gpt.GPT(cfg).state_dict().items() if ".attn.k." not in k and ".attn.v." not in k and ".mlp.up." not in k}
    store.save_torch({"model_config": dict(vars(cfg), vocab_size=320), "model": state, "row": {"name": "m"}, "data": {}},
                     tmp_path / "m.pt")
    with pytest.raises(config.UserError, match="does not fit this model.py"):
        store.load_member(tmp_path / "m.pt")