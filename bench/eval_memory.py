"""
bench/eval_memory.py: host memory and time of eval.py's arithmetic against population size M and scored tokens N.
Peak RSS should stay flat in N (prior.py memory-maps the score files and reads them chunk_tokens at a time) and
time should grow at most linearly in M x N.

    OMP_NUM_THREADS=1 python bench/eval_memory.py                                  # M 32,128,480 x N 1M,4M
    OMP_NUM_THREADS=1 python bench/eval_memory.py --members 32 --tokens 1000000    # one point

Per N it writes 480 synthetic score files (float32 log p = -|normal|, 4 B a token: 7.7 GB at N = 4M) into a
temporary folder (checks the free disk first, deletes it afterwards); fitness and val are the same files
(symlinks), which halves the disk and the page cache and changes nothing in the maths. Each (M, N) point then runs
in a fresh subprocess, so its peak RSS (ru_maxrss) is its own, what evaluate_run does with the first M members:
    open_scores (fitness, val) and the members' mean losses; EM on all M; the val loss of the prior's top K for
    K in ks_for(M), of uniform-last-K and of uniform over all; the budget curve at 4 budgets (the first M/4, M/2,
    3M/4, M members: EM refit, prior and uniform val loss); 2 greedy picks.
EM runs a fixed --em_iters iterations (tol -inf), so every point does the same number of passes over L. Not run:
AdamW (each of its 300 steps costs one EM iteration) and the full greedy baseline (one pass per pick, M/2 picks:
K x M x N by design, as before). Prints a markdown table.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# -----------------------------------------------------------------------------------------------------
members = [32, 128, 480]           # population sizes M
tokens = [1_000_000, 4_000_000]    # scored tokens N per split
em_iters = 5                       # EM iterations per fit (fixed, so every point does the same passes)
budgets = 4                        # budget-curve points
seed = 0
# -----------------------------------------------------------------------------------------------------


def write_scores(folder, m, n, rng):
    """m members' fitness score files (float32 -|normal|) and val symlinks to them."""
    import scores
    (folder / "scores").mkdir(parents=True, exist_ok=True)
    for i in range(m):
        path = scores.score_path(folder, f"m{i:03d}", "fitness")
        np.save(path, -np.abs(rng.standard_normal(n, dtype=np.float32)))
        scores.score_path(folder, f"m{i:03d}", "val").symlink_to(path.name)


def child(folder, m, iters):
    """One point, in its own process: evaluate_run's arithmetic on the first m members -> dict of numbers."""
    import prior
    import scores
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    names = [f"m{i:03d}" for i in range(m)]
    L_fit, L_val = scores.open_scores(folder, names, "fitness"), scores.open_scores(folder, names, "val")
    fit_loss, val_loss = -L_fit.mean(1), -L_val.mean(1)
    t_em = time.time()
    w, info = prior.fit_em(L_fit, iters=iters, tol=-np.inf)
    t_em = (time.time() - t_em) / (iters + 1)  # iters + 1 passes over L_fit
    out = {}
    for k in prior.ks_for(m):
        idx, wk = prior.mixture(w, k)
        full = np.zeros(m)
        full[idx] = wk
        out[f"prior K={k}"] = prior.mixture_nll(L_val, full)
        out[f"last K={k}"] = prior.mixture_nll(L_val[prior.uniform_last(m, k)], np.full(k, 1 / k))
    for b in range(1, budgets + 1):
        sub = list(range(m * b // budgets))
        wb, _ = prior.fit_em(L_fit[sub], iters=iters, tol=-np.inf)
        uniform = np.full(len(sub), 1 / len(sub))
        out[f"budget {b}"] = prior.mixture_nll(L_val[sub], wb), prior.mixture_nll(L_val[sub], uniform)
    prior.greedy_select(L_fit, 2)
    return dict(seconds=time.time() - t0, em_seconds_per_iter=t_em, objective=info["objective"],
                best_member=float(fit_loss.min()), rss_imports_kib=rss_imports,
                rss_peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, chunk_tokens=prior.chunk_tokens)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, nargs="+", default=members)
    ap.add_argument("--tokens", type=int, nargs="+", default=tokens)
    ap.add_argument("--em_iters", type=int, default=em_iters)
    ap.add_argument("--dir", default=None, help="where to write the temporary score files (default: the system temp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # FOLDER: run one point here, print JSON
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child), args.members[0], args.em_iters)))
        return
    rows = []
    print("|   M |     N | score files | RSS after imports | peak RSS | peak - imports | EM s/iter | total s | "
          "ns / (M x N) |")
    print("|----:|------:|------------:|------------------:|---------:|---------------:|----------:|--------:|"
          "-------------:|")
    for n in args.tokens:
        m_max = max(args.members)
        folder = Path(tempfile.mkdtemp(prefix="eval_memory_", dir=args.dir))
        try:
            need, free = m_max * n * 4, shutil.disk_usage(folder).free
            if need > free - 5e9:
                raise SystemExit(f"{m_max} x {n:,} float32 score files need {need / 1e9:.1f} GB; "
                                 f"{free / 1e9:.1f} GB free under {folder.parent} (keeping 5 GB spare)")
            t0 = time.time()
            write_scores(folder, m_max, n, np.random.default_rng(seed))
            print(f"<!-- wrote {m_max} x {n:,} score files ({need / 1e9:.1f} GB) in {time.time() - t0:.0f} s -->",
                  flush=True)
            for m in args.members:
                proc = subprocess.run([sys.executable, __file__, "--child", str(folder), "--members", str(m),
                                       "--em_iters", str(args.em_iters)], capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(dict(members=m, tokens=n, **r))
                mib = lambda kib: f"{kib / 1024:,.0f} MiB"
                print(f"| {m:3d} | {n / 1e6:4g}M | {m * n * 4 / 1e9:8.2f} GB | {mib(r['rss_imports_kib']):>17} | "
                      f"{mib(r['rss_peak_kib']):>8} | {mib(r['rss_peak_kib'] - r['rss_imports_kib']):>14} | "
                      f"{r['em_seconds_per_iter']:9.2f} | {r['seconds']:7.1f} | {r['seconds'] / (m * n) * 1e9:12.1f} |",
                      flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"chunk_tokens {rows[0]['chunk_tokens']:,}; EM {args.em_iters} iterations per fit; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return rows


if __name__ == "__main__":
    main()
