"""
The GPT of q0: a decoder-only transformer from a tiny CPU model up to the paper's 1.8B.

    RoPE, RMSNorm pre-norm (no learned gain) and on the embedding, QK-norm, SwiGLU MLP, untied embedding and head,
    logit soft-cap 15 * tanh(z / 15) over the real vocabulary (the padded head rows are cut off first), dropout on the
    residual branches, attention through one F.scaled_dot_product_attention(is_causal=True) call (FlashAttention on
    GPU, a flash kernel on CPU). q, k, v and gate, up are separate matrices, so Muon orthogonalises and LR-scales
    each on its own, as the reference (model v2; v1 fused them, normed no embedding and gave padded ids mass).

The ensemble and the prior only ever need log p(y_t | y_<t) of the true next token, so
`GPT.forward(idx, targets)` returns exactly that, per token, shape (B, T). `GPT.forward(idx)` gives
the full (soft-capped, fp32) logits for distillation, logit averaging and sampling.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    mlp_hidden: int = 176        # SwiGLU hidden width (about 8/3 n_embd, rounded)
    vocab_size: int = 257        # the tokenizer's real vocabulary (257 bytes, 50257 GPT-2): logits cover these ids only
    vocab_multiple: int = 64     # embedding and head rows padded up to a multiple of this (matmul-friendly)
    seq_len: int = 128
    dropout: float = 0.0         # on the residual branches (attention and MLP outputs) only, as the reference; q0 uses 0.1
    softcap: float = 15.0        # logits = softcap * tanh(z / softcap); 0 turns it off
    rope_base: float = 10000.0

    @property
    def padded_vocab_size(self):  # rows of the embedding and the head: 320 for 257, 50304 for 50257
        return padded_vocab(self.vocab_size, self.vocab_multiple)


# Named sizes: (n_layer, n_embd, n_head, mlp_hidden). vocab_size and seq_len come from the data/config.
SIZES = {
    "tiny": (2, 64, 4, 176),        # quick start and tests
    "mini": (4, 128, 4, 352),       # CPU benchmarks
    "small": (6, 256, 4, 704),      # CPU benchmarks, ~5M params
    "base": (12, 768, 6, 2048),     # ~124M class
    "medium": (24, 1024, 8, 2816),  # ~350M class
    "1.8B": (30, 2048, 16, 5632),   # the paper's model (head dim 128)
}


def config_for(size, **overrides):
    n_layer, n_embd, n_head, mlp_hidden = SIZES[size]
    return replace(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, mlp_hidden=mlp_hidden), **overrides)


def padded_vocab(vocab_size, multiple=64):
    return (vocab_size + multiple - 1) // multiple * multiple


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); rotate the two halves of the head dimension
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        # three matrices, not one fused qkv: Muon orthogonalises (and LR-scales) each on its own, as the reference
        self.q, self.k, self.v = (nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) for _ in range(3))
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, T, D)
        q, k = rms_norm(q), rms_norm(k)  # QK-norm: bounded attention logits at high LR
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no dropout on the attention probabilities
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)  # two matrices, not one fused gate_up (Muon)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(rms_norm(x), cos, sin))
        return x + self.drop(self.mlp(rms_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0, "head dim must be even for RoPE"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)  # untied from the embedding
        # RoPE tables are buffers (not parameters, not in the state dict): rebuilt by init_weights()
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, cfg.n_embd // cfg.n_head // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, cfg.n_embd // cfg.n_head // 2), persistent=False)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator=None):
        """Every init, in one place (call after `to_empty()` when the model was built on the meta device). As the
        reference, whose learning rates and weight decay (1.3, cautious) were tuned from this start:
        - embedding: N(0, 1) (RMSNorm follows, so the scale is free)
        - q, k, v, gate, up: uniform on [-s, s], s = sqrt(3 / n_embd): std 1/sqrt(n_embd), no outliers
        - proj, down (the residual-stream writers): N(0, 1/sqrt(n_embd)), both (down too, not 1/sqrt(mlp_hidden));
          with zeros instead (model v1) every block is the identity at step 0 and the first update reaches only the
          writers and the head: their gradients are the only non-zero ones
        - head: N(0, 0.001): logits near 0, so the first loss is log(vocab_size) to within about 1e-4, while every
          matrix gets a gradient at the first step
        - RoPE tables: cos/sin of t * base^(-2i/d)
        """
        C = self.cfg.n_embd
        nn.init.normal_(self.embed.weight, std=1.0, generator=generator)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up):
                nn.init.uniform_(lin.weight, -(3 / C) ** 0.5, (3 / C) ** 0.5, generator=generator)
            for lin in (block.attn.proj, block.mlp.down):
                nn.init.normal_(lin.weight, std=C ** -0.5, generator=generator)
        nn.init.normal_(self.head.weight, std=0.001, generator=generator)
        d = self.cfg.n_embd // self.cfg.n_head
        inv_freq = self.cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=self.rope_cos.device) / d)
        angles = torch.outer(torch.arange(self.cfg.seq_len, dtype=torch.float32, device=inv_freq.device), inv_freq)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def logits(self, idx):
        """idx (B, T) int64 -> soft-capped logits (B, T, V) in fp32, V = cfg.vocab_size: the padded head rows are cut
        off before the soft-cap, so softmax, loss, KL and sampling never give mass to an id no token has."""
        T = idx.size(1)
        assert T <= self.cfg.seq_len, f"sequence of {T} tokens exceeds seq_len={self.cfg.seq_len}"
        cos, sin = self.rope_cos[:T].to(self.embed.weight.dtype), self.rope_sin[:T].to(self.embed.weight.dtype)
        x = rms_norm(self.embed(idx))  # (B, T, C), normed as the reference; no dropout: only the residual branches drop
        for block in self.blocks:
            x = block(x, cos, sin)
        z = self.head(rms_norm(x))[..., :self.cfg.vocab_size].float()  # (B, T, V)
        if self.cfg.softcap:
            z = self.cfg.softcap * torch.tanh(z / self.cfg.softcap)
        return z

    def forward(self, idx, targets=None):
        """targets=None: logits (B, T, V). Else per-token log p(targets | prefix), shape (B, T); the
        training loss is -mean of it. One entry point, so DDP sees every forward."""
        logits = self.logits(idx)
        return logits if targets is None else token_logprobs(logits, targets)

    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed.weight.numel()


def token_logprobs(logits, targets):
    """log softmax(logits)[targets] without materialising a second (B, T, V) tensor."""
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


# ---- optimizer: Muon's per-matrix LR, and the reference's cautious weight decay on top of torch.optim.Muon ----------
def muon_lr_factor(shape):
    """torch.optim.Muon's (and the reference's) LR scale for one (rows, cols) matrix: sqrt(max(1, rows / cols))."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def cautious_weight_decay(muon):
    """Make a torch.optim.Muon decay cautiously, as the reference: per matrix, with X its orthogonalised update and
    lr' = lr * muon_lr_factor (Muon's own per-matrix LR, which the reference's decay uses too),
        p <- p - lr' X - lr' wd p [X p >= 0]          (p, X before the step; decay where they agree in sign)
    Muon runs its own step at weight_decay 0: a pre-step hook sets each group's weight_decay aside (to 0) and copies
    the weights; the post-step hook puts it back and decays the entries where (p_before - p_after) p_before >= 0
    (p_before - p_after = lr' X, its sign exact). set_multipliers, logs and state_dict see weight_decay as before.
    Costs one fp32 copy of the Muon matrices during step() only, when the activations are already freed.
    Returns the two hook handles (.remove() undoes it)."""
    kept = []  # per group: (weight_decay, {param: its copy before the step})

    def restore(opt):  # puts weight_decay back; at a pre-step, too, in case the last step raised half-way
        for g, (wd, _) in zip(opt.param_groups, kept):
            g["weight_decay"] = wd

    def pre(opt, args, kwargs):
        restore(opt)
        kept.clear()
        for g in opt.param_groups:
            if g.get("adjust_lr_fn") not in (None, "original"):
                raise ValueError(f"cautious_weight_decay assumes Muon's original LR adjustment, not {g['adjust_lr_fn']}")
            wd = g["weight_decay"]
            kept.append((wd, {p: p.detach().clone() for p in g["params"] if p.grad is not None} if wd else {}))
            g["weight_decay"] = 0.0

    def post(opt, args, kwargs):
        restore(opt)
        for g, (wd, before) in zip(opt.param_groups, kept):
            with torch.no_grad():
                for p, p0 in before.items():
                    agree = (p0 - p).mul_(p0).ge_(0)  # 1.0 where X p >= 0
                    p.addcmul_(p0, agree, value=-float(g["lr"]) * muon_lr_factor(p.shape) * wd)
        kept.clear()

    return muon.register_step_pre_hook(pre), muon.register_step_post_hook(post)


def build(cfg, device):
    """Build on the meta device (no memory), materialise on `device`, then init: works for any size."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model
