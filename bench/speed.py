"""
bench/speed.py: training and scoring speed, side by side in one process (CPU or one GPU).

    python bench/speed.py                          # CPU: the CPU benchmark model (mini, seq 128, byte vocab)
    python bench/speed.py --size=1.8B --vocab=50257 --seq_len=2048 --micro_batch=2 --compile   # one GPU

1. Training tokens/s of our GPT (Muon + AdamW, the train.py step) against a straightforward nanoGPT-style
   GPT of about the same size written below (LayerNorm, GELU MLP 4x, learned positions, AdamW), timed in
   alternating rounds so both see the same machine load; the median over rounds. "ours, AdamW" is our model
   with AdamW everywhere: the gap between it and "ours" is Muon's cost, the gap to nanoGPT the model's.
2. Chain distillation: step time with a frozen teacher forward (q0.Q0Plan.loss) over the plain step.
3. Scoring (eval.py's forward): tokens/s per member, and peak memory after scoring 1 member and after 4
   (one model in memory at a time, so the peak should not grow with K).
Ratios are the result on a shared CPU; absolute times only mean something on a GPU.
"""
import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as gpt  # noqa: E402
import q0  # noqa: E402
import runtime  # noqa: E402
from runtime import autocast  # noqa: E402


class NanoBlock(nn.Module):
    """nanoGPT's block: LayerNorm, fused qkv attention through SDPA, GELU MLP 4x."""

    def __init__(self, C, H):
        super().__init__()
        self.ln1, self.ln2, self.H = nn.LayerNorm(C), nn.LayerNorm(C), H
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(NanoBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f, self.head = nn.LayerNorm(cfg.n_embd), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1).float(), targets.flatten())


def train_step(m, optimizers, loss_fn):
    """One optimizer step as train.py takes it: loss, backward, clip, every optimizer steps, grads cleared."""
    def step(x, y):
        loss_fn(x, y).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    return step


def time_rounds(steps, x, y, rounds, iters, dev):
    """Alternate the contenders round by round; median seconds per step for each."""
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (and compilation)
        fn(x, y), fn(x, y)
    for _ in range(rounds):
        for k, fn in steps.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mini")
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--micro_batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip_nanogpt", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = gpt.config_for(a.size, vocab_size=a.vocab, seq_len=a.seq_len, dropout=0.0)
    torch.manual_seed(0)
    x = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), device=dev)
    y = torch.roll(x, -1, 1)

    ours = gpt.build(cfg, dev)
    hidden = [p for n, p in ours.named_parameters() if n.startswith("blocks.")]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    adam = torch.optim.AdamW([ours.embed.weight, ours.head.weight], lr=0.004, betas=(0.8, 0.95))
    fwd = torch.compile(ours) if a.compile else ours
    teacher = gpt.build(cfg, dev).eval().requires_grad_(False)
    teacher_fwd = torch.compile(teacher) if a.compile else teacher
    plain = lambda x, y: -fwd(x, y).mean()
    distil = lambda x, y: q0.distill_loss(fwd(x), teacher_fwd(x).detach(), y, 0.45, 1.2)

    def with_amp(step):
        def run(x, y):
            with autocast(dev):
                step(x, y)
        return run

    # the same model with AdamW on every matrix instead of Muon: separates the optimizer's cost from the model's
    adam_all = torch.optim.AdamW(ours.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    steps = {"ours": with_amp(train_step(ours, [muon, adam], plain)), "ours+distill": with_amp(train_step(ours, [muon, adam], distil)),
             "ours, AdamW": with_amp(train_step(ours, [adam_all], plain))}
    nano_params = None
    if not a.skip_nanogpt:
        nano = NanoGPT(cfg).to(dev)
        nano_params = sum(p.numel() for p in nano.parameters())
        nano_opt = torch.optim.AdamW(nano.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
        nano_fwd = torch.compile(nano) if a.compile else nano
        steps["nanoGPT"] = with_amp(train_step(nano, [nano_opt], nano_fwd))
    med, all_times = time_rounds(steps, x, y, a.rounds, a.iters, dev)
    tokens = a.micro_batch * a.seq_len
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU, ' + str(torch.get_num_threads()) + ' threads'}) "
          f"| torch {torch.__version__} | size {a.size} ({ours.num_params() / 1e6:.2f}M params"
          + (f"; nanoGPT {nano_params / 1e6:.2f}M" if nano_params else "") + f") | batch {a.micro_batch} x {a.seq_len} | compile {a.compile}")
    for k, t in med.items():
        spread = f"{min(all_times[k]) * 1e3:.1f}-{max(all_times[k]) * 1e3:.1f}"
        print(f"  {k:14s} {t * 1e3:9.1f} ms/step (rounds {spread}) {tokens / t:12,.0f} tok/s")
    if "nanoGPT" in med:
        print(f"  ours / nanoGPT tokens/s: {med['nanoGPT'] / med['ours']:.2f}x")
    print(f"  distillation step / plain step: {med['ours+distill'] / med['ours']:.2f}x")
    peak = runtime.peak_flops(dev)
    if peak:
        print(f"  MFU (ours): {runtime.flops_per_token(ours) * tokens / med['ours'] / peak * 100:.1f}%")
    if dev.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    # scoring: eval.py's forward, one member at a time
    import eval as ev
    del steps, muon, adam, adam_all, teacher, fwd
    split = {"tokens": torch.randint(0, a.vocab, (a.seq_len * 64 + 1,)).numpy().astype("uint16")}
    split["windows"] = [(s, s + a.seq_len + 1) for s in range(0, a.seq_len * 64, a.seq_len)]
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for k in range(1, 5):
        member = gpt.build(cfg, dev).eval()
        t0 = time.perf_counter()
        ev.score_split(member, split, dev)
        dt = time.perf_counter() - t0
        del member
        print(f"  scoring member {k}: {a.seq_len * 64 / dt:10,.0f} tok/s | peak memory after {k} member(s): "
              f"{(torch.cuda.max_memory_allocated() / 2**20) if dev.type == 'cuda' else rss():,.0f} MiB")


if __name__ == "__main__":
    main()
