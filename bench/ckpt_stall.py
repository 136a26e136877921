"""
bench/ckpt_stall.py: how long a checkpoint stops training, written in line (async_checkpoints=False) against
snapshotted to host memory and written on a background thread (the default), as the training thread sees it.

    OMP_NUM_THREADS=1 python bench/ckpt_stall.py --sizes mini small base --rounds 5

For each model size it builds train.py's model, optimizers and plan and runtime.py's TrackRun on the pydoc data
(GPT-2-sized vocab, so the embedding and head are as large as at scale), takes one optimizer step so Muon and AdamW
hold their state, then alternates sync and async checkpoints: the stall is the time TrackRun.checkpoint() takes to
return; for async also the time until the write is done (finish_checkpoint). Medians of the rounds; the checkpoint goes to a temporary folder on the same disk.
"""
import argparse
import io
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as gpt  # noqa: E402
import prepare_data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from runtime import load_data  # noqa: E402
from store import nbytes  # noqa: E402


def track_for(size, data_dir, out_dir):
    """-> (the track's TrackRun, model, the checkpoint's state dict) after one optimizer step."""
    cfg = train.Config(data_dir=str(data_dir), out_dir=str(out_dir), model_size=size, seq_len=128, batch_tokens=1024,
                       micro_batch_size=8)
    env = dict(world=1, rank=0, device=torch.device("cpu"), group=None, group_size=1, group_rank=0, my_tracks=[0],
               log=lambda msg: None, barrier=lambda: None, all_reduce=lambda t: None)
    data = load_data(cfg)
    data["meta"] = dict(data["meta"], vocab_size=50257)  # GPT-2's vocab: embedding and head as at scale
    model = gpt.build(gpt.config_for(size, vocab_size=50257, seq_len=128), env["device"])
    muon, adam = train.make_optimizers(cfg, model, env["device"])
    plan = train.SinglePlan(cfg, 0, model, data, env)
    plan.loss(model, plan.loader.micro_batch(0, 0, 8, env["device"])).backward()
    muon.step()
    adam.step()
    state = {"model": model.state_dict(), "muon": muon.state_dict(), "adam": adam.state_dict(), "step": 1,
             "last_loss": 0.0, "plan": {}}
    return runtime.TrackRun(cfg, 0, env, data["meta"], model, plan), model, state


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["mini", "small", "base"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        with redirect_stdout(io.StringIO()):
            prepare_data.main(["--out_dir", str(data_dir)])
        print("| model | checkpoint | in line: stall (s) | background: stall (s) | background: write (s) | stall ratio |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            run, model, state = track_for(size, data_dir, Path(tmp) / size)
            mib = nbytes(state) / 2**20
            sync, stall, write = [], [], []
            for _ in range(args.rounds):
                run.cfg.async_checkpoints = False
                t0 = time.perf_counter()
                run.checkpoint(1, model, state)
                sync.append(time.perf_counter() - t0)
                run.cfg.async_checkpoints = True
                t0 = time.perf_counter()
                run.checkpoint(1, model, state)
                stall.append(time.perf_counter() - t0)
                run.finish_checkpoint()
                write.append(time.perf_counter() - t0)
            s, a, w = (statistics.median(v) for v in (sync, stall, write))
            print(f"| {size} ({model.num_params() / 1e6:.1f}M) | {mib:,.0f} MiB | {s:.3f} | {a:.3f} | {w:.3f} | "
                  f"{a / s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
