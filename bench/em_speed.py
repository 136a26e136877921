"""
bench/em_speed.py: what SQUAREM buys the prior fit (prior.fit_em). For each scored run (or the population it had
at --budget epochs), fit the prior twice on its fitness scores, side by side in one process: plain EM with the
stopping rule used before 2026-11-30 (a step that lowers f by less than em_tol), and the default (SQUAREM steps,
the same tol, or a certified gap of em_gap). Reports passes over L, seconds, the objective, the certified gap, and what
the two weightings give on val (val is only reported, never used). Medians of --rounds for the seconds.

    OMP_NUM_THREADS=1 python bench/em_speed.py bench/out/runs/q0-b128-s1 bench/out/runs/q0-b128-s2 --rounds 3
    OMP_NUM_THREADS=1 python bench/em_speed.py bench/out/runs/q0-b128-s1 --budget 64
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import prior  # noqa: E402
from reproduce import existing_at, members  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="scored run folders (eval.py --score done)")
    ap.add_argument("--budget", type=float, default=None, help="the population as it was at this many epochs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print("| run | members | fit | passes | seconds (median) | fitness objective | certified gap | val |")
    print("|---|--:|---|--:|--:|--:|--:|--:|")
    for run_dir in args.runs:
        rows, F, V = members(run_dir)
        idx = existing_at(rows, float("inf") if args.budget is None else args.budget)
        F, V = F[idx], V[idx]
        for label, kw in (("plain EM, stop on tol", dict(accelerate=False, gap=-np.inf)), ("SQUAREM (the default)", {})):
            fits = [prior.fit_em(F, **kw) for _ in range(args.rounds)]
            w, info = fits[0]
            print(f"| {run_dir.name} | {len(idx)} | {label} | {info['iterations']} | "
                  f"{statistics.median(i['seconds'] for _, i in fits):.1f} | {info['objective']:.9f} | "
                  f"{info['gap']:.1e} | {prior.mixture_nll(V, w):.6f} |", flush=True)


if __name__ == "__main__":
    main()
