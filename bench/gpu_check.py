"""
bench/gpu_check.py: the GPU code paths in one command, for the first time on a CUDA machine (under 10 minutes).

    python bench/gpu_check.py                                   # 1.8B width, 8 of its 30 layers, bf16, compile
    python bench/gpu_check.py --layers 30 --micro_batch 1       # the whole 1.8B model, if memory allows
    python bench/gpu_check.py --device cpu --size tiny --no_compile --steps 2   # a dry run of this script (the tests)

Prints one JSON object:
- sdpa_flash: the model's attention runs with only the flash backend allowed, under bf16 autocast and compile
  (torch.nn.attention.sdpa_kernel raises if that backend cannot take the call); "n/a" off CUDA;
- ms_per_step, tokens_per_s, mfu: a training step as train.py takes it (forward, backward, grad clip, Muon + AdamW),
  median of --steps after 2 warm-up steps; MFU against the card's dense bf16 peak (model.peak_flops; null when the
  card is not in its table);
- distill_ratio: the chain-distillation step (one frozen teacher forward more, q0.distill_loss) over the plain step;
- peak_memory_gib: torch.cuda.max_memory_allocated;
- checkpoint: save_torch + safe_load of the model and both optimizers' state (seconds, GiB, equal after the trip).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as gpt  # noqa: E402
import q0  # noqa: E402
import runtime  # noqa: E402
from runtime import autocast  # noqa: E402
from store import nbytes, safe_load, save_torch  # noqa: E402


def timed(step, x, y, steps, dev):
    for _ in range(2):  # warm-up: compilation, allocator, cudnn/flash autotuning
        step(x, y)
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.8B")
    ap.add_argument("--layers", type=int, default=8, help="at most this many of --size's layers (0 = all)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--micro_batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no_compile", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cfg = gpt.config_for(a.size, vocab_size=a.vocab, seq_len=a.seq_len, dropout=0.0)
    cfg = replace(cfg, n_layer=min(a.layers, cfg.n_layer) if a.layers else cfg.n_layer)
    torch.manual_seed(0)
    model = gpt.build(cfg, dev)
    fwd = model if a.no_compile else torch.compile(model)
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    opts = [torch.optim.Muon(hidden, lr=0.01, weight_decay=1.3, momentum=0.95),
            torch.optim.AdamW([model.embed.weight, model.head.weight], lr=0.002, betas=(0.8, 0.95), eps=1e-10,
                              weight_decay=1.3, **({"fused": True} if dev.type == "cuda" else {}))]
    teacher = gpt.build(cfg, dev).eval().requires_grad_(False)
    teacher_fwd = teacher if a.no_compile else torch.compile(teacher)
    x = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), device=dev)
    y = torch.roll(x, -1, 1)
    out = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
               size=a.size, layers=cfg.n_layer, params_m=round(model.num_params() / 1e6, 1), micro_batch=a.micro_batch,
               seq_len=a.seq_len, compile=not a.no_compile)

    if dev.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast(dev), torch.no_grad():
                fwd(x, y)
            out["sdpa_flash"] = True
        except RuntimeError as e:  # no flash kernel for these inputs: the math or efficient backend would run
            out["sdpa_flash"] = f"no: {str(e).splitlines()[0][:200]}"
    else:
        out["sdpa_flash"] = "n/a"

    def step_with(loss_fn):
        def step(x, y):
            with autocast(dev):
                loss = loss_fn(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step
    plain = timed(step_with(lambda x, y: -fwd(x, y).mean()), x, y, a.steps, dev)
    distil = timed(step_with(lambda x, y: q0.distill_loss(fwd(x), teacher_fwd(x), y, 0.45, 1.2)), x, y, a.steps, dev)
    tokens = a.micro_batch * a.seq_len
    peak = runtime.peak_flops(dev)
    out.update(ms_per_step=round(plain * 1e3, 2), tokens_per_s=round(tokens / plain),
               mfu=round(runtime.flops_per_token(model) * tokens / plain / peak, 4) if peak else None,
               distill_ratio=round(distil / plain, 3),
               peak_memory_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None)

    state = {"model": model.state_dict(), "muon": opts[0].state_dict(), "adam": opts[1].state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        t0 = time.perf_counter()
        save_torch(state, path)
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = safe_load(path, "checkpoint")
        same = all(torch.equal(v.cpu(), back["model"][k]) for k, v in state["model"].items())
        out["checkpoint"] = dict(gib=round(nbytes(state) / 2**30, 3), save_s=round(saved, 2),
                                 load_and_compare_s=round(time.perf_counter() - t0, 2), equal=same)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
