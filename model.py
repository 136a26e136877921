"""
The GPT of q0: a decoder-only transformer from a tiny CPU model up to the paper's 1.8B.

    RoPE, RMSNorm pre-norm (no learned gain) and on the embedding, QK-norm, SwiGLU MLP, untied embedding and head,
    logit soft-cap 15 * tanh(z / 15) over the real vocabulary (the padded head rows are cut off first), dropout on the
    residual branches, attention through one F.scaled_dot_product_attention(is_causal=True) call (FlashAttention on
    GPU, a flash kernel on CPU). q, k, v and gate, up are separate matrices, so Muon orthogonalises and LR-scales
    each on its own, as the reference (model v2; v1 fused them, normed no embedding and gave padded ids mass).

Quick checks:
    python model.py                 # parameter counts and FLOPs/token of every named size (meta device)
    python model.py --size=1.8B     # one size
    python model.py --size=1.8B --memory=2  # and its training memory at micro-batch 2, with an fp32 teacher

The ensemble and the prior only ever need log p(y_t | y_<t) of the true next token, so
`GPT.forward(idx, targets)` returns exactly that, per token, shape (B, T). `GPT.forward(idx)` gives
the full (soft-capped, fp32) logits for distillation, logit averaging and sampling.
"""
import sys
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

    # ---- accounting -------------------------------------------------------------------------------
    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed.weight.numel()

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 N + 12 L T C  (PaLM appendix B; the input
        embedding is a lookup, not a matmul, so it is left out of N)."""
        c = self.cfg
        return 6 * self.num_params(embedding=False) + 12 * c.n_layer * c.seq_len * c.n_embd


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


# bf16 dense peak FLOP/s by device name (no sparsity). An unknown device or the CPU shows no MFU.
# dense bf16 peak by the card's name (torch.cuda.get_device_name), most specific first; a card not listed (an H100
# whose name says neither PCIe, NVL nor SXM's "HBM3") shows no MFU rather than a guessed one
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H200": 989e12,
              "H800": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_estimate(cfg, micro_batch, teacher="fp32", teachers=1, eval_batch=16):
    """Bytes one GPU holds to train `cfg` at `micro_batch` sequences in bf16 autocast (fp32 weights), as train.py and
    q0.py keep them; n = micro_batch * seq_len tokens, N parameters (N_muon in the blocks, N_adam embedding + head):
        weights, grads        4 N each (fp32)
        muon_momentum         4 N_muon;  adam_moments  8 N_adam
        cautious_copy         4 N_muon, only inside step(), when the activations are freed (cautious_weight_decay)
        teacher               4 N as q0.py's frozen fp32 copy, 2 N in bf16 (the reference's), or None: 0; x teachers
                              (distill_teacher="mixture" holds distill_teacher_k of them)
        weight_casts          2 (N - embedding): autocast's bf16 copy of every matrix, kept for the backward
        activations           n L (36 C + 8 M + 12 H + 8 [+ 4 C dropout]) + n (10 C + 24): what autograd keeps
                              (tests/test_model.py measures it); L x 36 C counts q, k, v's three bf16 copies of the
                              input, QK-norm's fp32 q, k and FlashAttention's q, k, v, out; the two dropout masks
                              are bf16 on CPU (2 C on CUDA, where they are bool)
        activations_ckpt      n L 4 C + one block's: if each block were recomputed in the backward (not in model.py)
        logits_train          4 n V x 4 (tanh and log-softmax outputs kept, two gradients), x 8 with a teacher
                              (its logits, log-softmax and probabilities and the KL's product besides)
        logits_eval           eval_batch T (4 V x 2 + 2 V_pad): fp32 logits and cross-entropy's log-softmax, the bf16
                              head output (score_windows, 16 windows a forward)
    peak_train = weights + grads + optimizer states + teacher + weight_casts + activations + logits_train;
    peak_step = weights + grads + optimizer states + teacher + cautious_copy (inside step());
    peak_eval = weights + optimizer states + teacher + logits_eval (grads are None between steps).
    Left out: the RoPE tables, allocator fragmentation, NCCL and the CUDA context (a few GB)."""
    C, M, H, L, V, Vp = cfg.n_embd, cfg.mlp_hidden, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.padded_vocab_size
    n = micro_batch * cfg.seq_len
    n_embed = Vp * C
    n_muon = L * (4 * C * C + 3 * C * M)
    N = n_muon + 2 * n_embed
    per_block = 36 * C + 8 * M + 12 * H + 8 + (4 * C if cfg.dropout else 0)
    est = dict(weights=4 * N, grads=4 * N, muon_momentum=4 * n_muon, adam_moments=8 * 2 * n_embed,
               cautious_copy=4 * n_muon, teacher={"fp32": 4 * N, "bf16": 2 * N, None: 0}[teacher] * teachers,
               weight_casts=2 * (N - n_embed), activations=n * L * per_block + n * (10 * C + 24),
               activations_ckpt=n * (L * 4 * C + per_block) + n * (10 * C + 24),
               logits_train=(8 if teacher else 4) * n * V * 4, logits_eval=eval_batch * cfg.seq_len * (8 * V + 2 * Vp))
    held = est["weights"] + est["muon_momentum"] + est["adam_moments"] + est["teacher"]
    est["peak_train"] = held + est["grads"] + est["weight_casts"] + est["activations"] + est["logits_train"]
    est["peak_step"] = held + est["grads"] + est["cautious_copy"]
    est["peak_eval"] = held + est["logits_eval"]
    return est


def build(cfg, device):
    """Build on the meta device (no memory), materialise on `device`, then init: works for any size."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


if __name__ == "__main__":
    sizes = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--size=")] or list(SIZES)
    for size in sizes:
        cfg = config_for(size, vocab_size=50257, seq_len=2048)
        with torch.device("meta"):
            m = GPT(cfg)
        print(f"{size:>7}: {m.num_params() / 1e6:9.1f}M params ({m.num_params(False) / 1e6:9.1f}M non-embedding), "
              f"{m.flops_per_token() / 1e9:6.2f} GFLOPs/token (vocab 50257 padded to 50304, seq 2048)")
        for mb in [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--memory=")]:
            for teacher in ("fp32", "bf16", None):
                est = memory_estimate(replace(cfg, dropout=0.1), mb, teacher)
                print(f"         micro-batch {mb}, teacher {teacher}: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in est.items()) + " GB")
