"""
bench/eval_scale.py: the whole eval.py report (eval.evaluate_run: prior.json's fit and greedy, the K table, the budget
curve, optionally the AdamW comparison) on synthetic score files at M members x 131,072 fitness x N val tokens;
time and peak RSS per stage.

    OMP_NUM_THREADS=1 python bench/eval_scale.py                                  # M 32,128,480 x 1M val tokens
    OMP_NUM_THREADS=1 python bench/eval_scale.py --members 32 --code /tmp/main    # the old code (main's eval.py,
                                                                                  # prior.py copied into /tmp/main)

The run is 5 trajectories (4 when 5 does not divide M) of 2-epoch cycles, in budget order, as q0.py writes them
(480 members: 96 budgets). Score files are float32 -|normal| (as bench/eval_memory.py's), fitness and val separate;
each M runs in a fresh process (its own ru_maxrss). Stages: open (the NaN check and the members' means, one read of
each split), prior.json (fit_prior: EM, greedy, with --compare_adamw or on the old code AdamW too), the budget curve's
fits, and the rest (the val pass of the K table, its baselines and the curve). Synthetic members are alike, so EM's
pass counts differ from a real run's: read the seconds per pass, not the pass counts. Prints one JSON line per M.
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------------------------------
members = [32, 128, 480]     # population sizes M
fitness_tokens = 131_072     # the target's fitness split
val_tokens = 1_000_000       # the target has 10M: time is linear in it (BENCHMARKS 4)
seed = 0
# -----------------------------------------------------------------------------------------------------


def write_run(folder, m, n_fit, n_val, rng):
    """m members' fitness and val score files and the run dict eval.evaluate_run reads."""
    (folder / "scores").mkdir(parents=True, exist_ok=True)
    tracks = 5 if m % 5 == 0 else 4
    rows = sorted((dict(name=f"t{t}-c{c + 1:03d}", track=t, cycle=c + 1, budget_epochs=2.0 * (c + 1))
                   for t in range(tracks) for c in range(m // tracks)), key=lambda r: (r["budget_epochs"], r["track"]))
    for r in rows:
        for split, n in (("fitness", n_fit), ("val", n_val)):
            np.save(folder / "scores" / f"{r['name']}.{split}.npy", -np.abs(rng.standard_normal(n, dtype=np.float32)))
    meta = dict(tokenizer="byte", source="synthetic", source_detail="")
    return dict(dir=folder, cfg=dict(mode="q0"), rows=rows, names=[r["name"] for r in rows], planned=m, found=m,
                scored_now=[], eval_tokens=0, fitness=dict(n=n_fit, meta=meta), val=dict(n=n_val, meta=meta))


def child(folder, m, n_fit, n_val, compare):
    """One point in its own process -> dict of stage seconds and peak RSS."""
    import eval as ev
    import prior
    run = write_run(folder, m, n_fit, n_val, np.random.default_rng(seed))
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    stage, seconds, peak = ["rest"], {}, {}

    def timed(name, fn, inner=False):  # calls of fn count in stage `name` (not while inside prior.json's fit)
        def wrapped(*a, **k):
            if inner and stage[0] == "prior.json":
                return fn(*a, **k)
            outer, stage[0], t0 = stage[0], name, time.time()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.time() - t0
                peak[name], stage[0] = rss(), outer
        return wrapped

    ev.run_scores = timed("open", ev.run_scores)
    owner = ev if hasattr(ev, "fit_prior") else prior  # eval.py's since the minimal-q0 layout, prior.py's before
    owner.fit_prior = timed("prior.json", owner.fit_prior)
    for name in prior.FITS:  # the old code's curve calls prior.FITS[method], the new one prior.fit_em
        prior.FITS[name] = timed("budget curve fits", prior.FITS[name], inner=True)
    prior.fit_em = timed("budget curve fits", prior.fit_em, inner=True)
    t0 = time.time()
    kw = dict(compare=True) if compare else {}
    rep, _ = ev.evaluate_run(run, "em", **kw)
    total = time.time() - t0
    seconds["rest"] = total - sum(v for k, v in seconds.items() if k != "rest")
    return dict(members=m, fitness_tokens=n_fit, val_tokens=n_val, budgets=len(rep["budget_curve"]), total_s=total,
                seconds=seconds, peak_rss_mib=peak, final_peak_rss_mib=rss(), prior_val=rep["summary"]["prior_val"],
                compare=rep.get("prior_compare") or {})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, nargs="+", default=members)
    ap.add_argument("--fitness_tokens", type=int, default=fitness_tokens)
    ap.add_argument("--val_tokens", type=int, default=val_tokens)
    ap.add_argument("--code", default=str(ROOT), help="folder whose eval.py and prior.py run (default: this checkout)")
    ap.add_argument("--compare_adamw", action="store_true", help="also the AdamW fit (new code; the old always runs it)")
    ap.add_argument("--dir", default=None, help="where the temporary score files go (default: the system temp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path[:0] = [args.code, str(ROOT)]  # the code under test first; the rest (store.py, scores.py, ...) from here
    if args.child:
        print(json.dumps(child(Path(args.child), args.members[0], args.fitness_tokens, args.val_tokens,
                               args.compare_adamw)))
        return
    for m in args.members:
        folder = Path(tempfile.mkdtemp(prefix="eval_scale_", dir=args.dir))
        try:
            cmd = [sys.executable, __file__, "--child", str(folder), "--members", str(m), "--code", args.code,
                   "--fitness_tokens", str(args.fitness_tokens), "--val_tokens", str(args.val_tokens)]
            proc = subprocess.run(cmd + (["--compare_adamw"] if args.compare_adamw else []), capture_output=True,
                                  text=True, check=True)
            print(proc.stdout.strip().splitlines()[-1], flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
