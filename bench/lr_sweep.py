"""
bench/lr_sweep.py: the single model's learning rates re-checked on fitness (model v2, issue 25). One train.py run per
setting of configs/shakespeare_single.py (16 epochs, 0.88M params), two at a time; the table gives each setting's
best and last fitness loss (what a choice is made on) and its val loss (reported, never chosen on).

    python prepare_data.py --source files --files CORPUS --out_dir data/shakespeare-100k --train_tokens 100000 \\
        --val_tokens 100000 --fitness_tokens 50000 --heldout_piece_tokens 2048
    OMP_NUM_THREADS=1 python bench/lr_sweep.py --seed 1          # CORPUS: BENCHMARKS.md section 1's Shakespeare texts
    OMP_NUM_THREADS=1 python bench/lr_sweep.py --seed 2 --muon_lrs 0.01 0.02 0.04 0.06 0.08   # the Muon LRs only
    OMP_NUM_THREADS=1 python bench/lr_sweep.py --seed 1 --batch_tokens 1024   # 96 steps per epoch instead of 24
"""
import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [dict(muon_lr=0.02, embed_lr=0.2), dict(muon_lr=0.01, embed_lr=0.2), dict(muon_lr=0.04, embed_lr=0.2),
            dict(muon_lr=0.02, embed_lr=0.1), dict(muon_lr=0.02, embed_lr=0.4),
            dict(muon_lr=0.06, embed_lr=0.2), dict(muon_lr=0.08, embed_lr=0.2)]  # the last two: 0.04 won the first five


def run(setting, seed, out, batch_tokens=None):
    name = "_".join(f"{k}{v}" for k, v in setting.items()) + (f"_b{batch_tokens}" if batch_tokens else "") + f"_s{seed}"
    if batch_tokens:  # micro-batches of at most the config's 32 windows of 128 tokens
        setting = dict(setting, batch_tokens=batch_tokens, micro_batch_size=min(32, batch_tokens // 128))
    run_dir = out / name
    if not (run_dir / "members" / "single.pt").exists():
        flags = [f"--{k}={v}" for k, v in setting.items()] + [f"--seed={seed}", f"--out_dir={run_dir}"]
        if run_dir.exists():
            flags.append("--resume=True")
        subprocess.run([sys.executable, "train.py", "configs/shakespeare_single.py", *flags], cwd=ROOT, check=True,
                       capture_output=True)
    evals = [json.loads(x) for x in (run_dir / "track0" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["fitness"])
    return dict(setting=setting, last_fitness=evals[-1]["fitness"], last_val=evals[-1]["val"],
                best_fitness=best["fitness"], best_epoch=best["epoch"], val_at_best=best["val"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "lr_sweep")
    ap.add_argument("--muon_lrs", type=float, nargs="+", help="only these muon_lr settings at embed_lr 0.2")
    ap.add_argument("--batch_tokens", type=int, help="another batch than the config's 4,096 tokens")
    args = ap.parse_args()
    settings = [s for s in SETTINGS if not args.muon_lrs or (s["muon_lr"] in args.muon_lrs and s["embed_lr"] == 0.2)]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda s: run(s, args.seed, args.out, args.batch_tokens), settings))
    print("| muon_lr | embed_lr | fitness at 16 epochs | best fitness (epoch) | val at 16 epochs | val at the best |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["setting"]
        print(f"| {s['muon_lr']} | {s['embed_lr']} | {r['last_fitness']:.4f} | {r['best_fitness']:.4f} ({r['best_epoch']:g}) "
              f"| {r['last_val']:.4f} | {r['val_at_best']:.4f} |")


if __name__ == "__main__":
    main()
