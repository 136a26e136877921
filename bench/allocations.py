"""
bench/allocations.py: the recipe for every budget (BENCHMARKS.md 1k). How to spend B epochs of the headline recipe
(bench/reproduce.py: model v2, lr_floor 0.08, wd_floor 0.7, no perturbation noise, the learned prior), B = 2 ... 64:
how long a cycle (0.5, 1, 2 or 4 epochs) and how many trajectories (1 or 2)? Each allocation is run once to 64 epochs;
the population of a smaller budget is the prefix of its snapshots that existed then (a q0 snapshot of cycle c exists at
P * c * epochs per cycle). At each budget the allocation is picked on the fitness loss of its population with the
prior cross-fitted on the held-out pieces (reproduce.crossfit_nll), mean of the seeds; val is only reported. Then chain
distillation on and off for the winners at 32 and 64 epochs, and the winners at 8 and 64 checked on pydoc prose.

    python bench/allocations.py CORPUS --seeds S [--shard i/n]       # the grid (after the headline suite of seed S)
    python bench/allocations.py CORPUS --stage distill --seeds S     # the winners at distill_budgets, distilled
    python bench/allocations.py pydoc --out bench/out-pydoc --stage pydoc --chosen_in bench/out --seeds S
    python bench/allocations.py --report [--out bench/out] [--seeds S ...]   # the tables, no training

The distill and pydoc stages take the picks from the grid's runs in --out (--chosen_in), or, where those are gone,
from its report as --picks B:PxC[,PxC] ... (each budget's pick, then the allocation compared with it on pydoc).

The allocations (1, 2), (2, 2) and (1, 1) are the runs of bench/reproduce.py's headline (q0-s<S>) and recipes suite,
trained once for both. Runs are cached, resumed and never redone as bench/reproduce.py's.
"""
import argparse
import itertools
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import prior  # noqa: E402
import reproduce as rp  # noqa: E402

# -----------------------------------------------------------------------------------------------------
cycle_epochs = (0.5, 1.0, 2.0, 4.0)  # epochs per cycle
trajectories = (1, 2)               # run in parallel, each its own seed stream
grid_budget = 64                    # every allocation's run spends this many epochs
budgets = (2, 4, 8, 16, 32, 64)     # the recipe picked at each, on fitness
distill_budgets = (32, 64)          # the winner's distillation check: from distill_start (E* per trajectory)
distill = dict(distill_alpha=0.45, distill_temperature=1.2)  # the reference's; the predecessor as teacher
pydoc_budgets = (8, 64)             # the winners checked on the second corpus at these budgets
# -----------------------------------------------------------------------------------------------------


def grid(seed, budget=grid_budget):
    """{(P, epochs per cycle): (run name, q0.py flags)}: the headline recipe at every allocation of `budget` epochs,
    no chain distillation (reproduce.recipe_run: the headline's own allocation is its q0 run)."""
    return {(P, c): rp.recipe_run(seed, None, (P, c, int(budget / (P * c)), None))
            for P in trajectories for c in cycle_epochs}


def train_grid(out, seed, shard=(0, 1)):
    """Train this shard's entries of the grid (entries i, i+n, ...)."""
    for j, (name, flags) in enumerate(grid(seed).values()):
        if j % shard[1] == shard[0]:
            rp.run(name, out, flags)


def scores(out, seeds, budget):
    """{(P, c): {seed: (cross-fitted fitness, val of the prior fit on all fitness, members)}} of the populations that
    existed at `budget` epochs, for every finished run of the grid that had a snapshot by then."""
    table = {}
    for seed in seeds:
        for (P, c), (name, _) in grid(seed).items():
            if P * c <= budget and (m := rp.finished(out, name, budget=budget)):  # its first snapshots exist at P * c
                rows, F, V = m
                w, _ = prior.fit_em(F)
                table.setdefault((P, c), {})[seed] = (rp.crossfit_nll(F, rp.heldout_piece_tokens),
                                                     prior.mixture_nll(V, w), len(rows))
    return table


def complete(out, seeds):
    """Whether every run of the grid has finished for every seed: the picks (on the seeds' mean) are final."""
    return all(rp.finished(out, name) for seed in seeds for name, _ in grid(seed).values())


def rank(table, seeds):
    """One budget's scores(...) -> ranked [(mean cross-fitted fitness over the seeds, (P, c))] of the allocations
    measured on every seed, best first."""
    return sorted((float(np.mean([table[a][s][0] for s in seeds])), a) for a in table if set(seeds) <= set(table[a]))


def picks(out, seeds):
    """{budget: rank(...) at that budget}."""
    return {b: rank(scores(out, seeds, b), seeds) for b in budgets}


def lacking_headline(out, seeds):
    """The seeds whose headline suite has not run in `out`: chain distillation starts at its E*."""
    done = rp.load_results(out).get("headline", {})
    return [s for s in seeds if str(s) not in done]


def given_picks(items):
    """--picks ["32:1x2", "64:1x2,1x4", ...] -> {budget: [(None, (P, c)), ...]}, picks(...)'s form without the scores:
    the grid's ranking as its report printed it, for when its runs are gone."""
    table = {}
    for item in items:
        if not (m := re.fullmatch(r"(\d+):((?:\d+x[\d.]+,?)+)", item)):
            sys.exit(f"--picks {item}: expected budget:PxC[,PxC], e.g. 64:1x2,1x4")
        table[int(m[1])] = [(None, (int(P), float(c))) for P, c in re.findall(r"(\d+)x([\d.]+)", m[2])]
    return table


def distill_runs(out, seeds, seed, ranking=None):
    """{(budget, (P, c)): (run name, q0.py flags)}: the winner at each of distill_budgets (of `ranking`, default the
    grid's picks) with chain distillation from reproduce.distill_start (E* epochs per trajectory, at most half-way),
    spending that budget."""
    best_E = rp.best_single_epochs(out, seed)
    runs = {}
    for b, ranked in (ranking or picks(out, seeds)).items():
        if b in distill_budgets and ranked:
            P, c = ranked[0][1]
            cycles = int(b / (P * c))
            runs[(b, (P, c))] = (f"alloc-distill-P{P}-c{c:g}-b{b}-s{seed}", rp.q0_flags(seed, **{
                **rp.headline_flags(), **distill, "num_trajectories": P, "epochs_per_cycle": c, "num_cycles": cycles,
                "distill_after_cycles": rp.distill_start(best_E, cycles, c)}))
    return runs


def pydoc_allocations(chosen_in, seeds, ranking=None):
    """The allocations to check on pydoc: at each of pydoc_budgets the winner on Shakespeare (of `ranking`, default
    the grid's picks) and, to compare with, the headline's allocation (the runner-up when the winner is the headline's)."""
    headline = (rp.q0_trajectories, rp.q0_epochs_per_cycle)
    pairs = {}
    for b, ranked in (ranking or picks(chosen_in, seeds)).items():
        if b in pydoc_budgets and ranked:
            allocs = [a for _, a in ranked]
            if allocs[0] == headline and len(allocs) < 2:
                sys.exit(f"pydoc at {b} epochs: the pick is the headline's allocation; name the one to compare with it "
                         f"after it (--picks {b}:1x2,PxC)")
            pairs[b] = (allocs[0], headline if allocs[0] != headline else allocs[1])
    return pairs


def report(out, seeds=rp.seeds):
    tables = {b: scores(out, seeds, b) for b in budgets}  # (each the cross-fit of every population: computed once)
    ranked = {b: rank(t, seeds) for b, t in tables.items()}
    name = lambda a: f"{a[0]} x {a[1]:g}"
    print(f"\nallocations ({out}): fitness with the prior cross-fitted / val with the prior (all K), seeds "
          f"{' / '.join(map(str, seeds))}; the pick at each budget: the lowest mean cross-fitted fitness")
    for b, t in tables.items():
        print(f"\nbudget {b} epochs\n| P x cycle (epochs) | members | fitness, cross-fit | val, prior |\n|---|---|---|---|")
        for mean_fit, a in ranked[b]:
            cells = [t[a][s] for s in seeds]
            print(f"| {name(a)}{' (pick)' if a == ranked[b][0][1] else ''} | {' / '.join(str(x[2]) for x in cells)} | "
                  f"{' / '.join(f'{x[0]:.4f}' for x in cells)} | {' / '.join(f'{x[1]:.4f}' for x in cells)} |")
        if singles := [m for s in seeds if (m := rp.finished(out, f"single-E{b}-s{s}"))]:
            print(f"| single model of {b} epochs (reference, not a candidate) | 1 | "
                  f"{' / '.join(f'{rp.crossfit_nll(F, rp.heldout_piece_tokens):.4f}' for _, F, _ in singles)} | "
                  f"{' / '.join(f'{-V[0].mean():.4f}' for _, _, V in singles)} |")
    allocs = sorted({a for r in ranked.values() for _, a in r})
    print(f"\ncross-fitted fitness, allocation x budget, seed {' / '.join(map(str, seeds))} (mean) (- : no snapshot by then)\n"
          f"| P x cycle | {' | '.join(map(str, budgets))} |\n|---|{'---|' * len(budgets)}")
    for a in allocs:
        cells = [next((f"{' / '.join(f'{tables[b][a][s][0]:.4f}' for s in seeds)} ({f:.4f})" for f, x in ranked[b]
                       if x == a), "-") for b in budgets]
        print(f"| {name(a)} | {' | '.join(cells)} |")
    print("\nthe recipe: at each budget the pick, the runner-up and the margin between them (mean cross-fitted fitness "
          "over the seeds), each seed's own pick, and the pick's val\n"
          "| budget | pick | runner-up | margin | each seed's pick | val of the pick |\n|---|---|---|---|---|---|")
    for b, t in tables.items():
        if len(ranked[b]) >= 2:
            (f1, a1), (f2, a2) = ranked[b][:2]
            own = [rank(t, [s])[0][1] for s in seeds]
            print(f"| {b} | {name(a1)} | {name(a2)} | {f2 - f1:.4f} | {' / '.join(map(name, own))} | "
                  f"{' / '.join(f'{t[a1][s][1]:.4f}' for s in seeds)} |")
    distilled = [(int(b), (int(P), float(c)), int(s), m) for d in sorted((out / "runs").glob("alloc-distill-*"))
                 for P, c, b, s in re.findall(r"alloc-distill-P(\d+)-c([\d.]+)-b(\d+)-s(\d+)$", d.name)
                 if int(s) in seeds and (m := rp.finished(out, d.name))]
    if not distilled:
        return
    print("\nchain distillation for the pick (alpha 0.45, T 1.2, from E* epochs per trajectory), seed by seed "
          "(off: the undistilled run's prefix at the budget):\n"
          "| budget | P x cycle | seed | fitness, cross-fit: off / on | val, prior: off / on |\n|---|---|---|---|---|")
    for b, alloc, seed, m in sorted(distilled, key=lambda x: (x[0], x[2])):
        off = (tables[b] if b in tables else scores(out, [seed], b)).get(alloc, {}).get(seed)  # the grid's, computed above
        fit_off, val_off = (f"{off[0]:.4f}", f"{off[1]:.4f}") if off else ("not run", "not run")
        print(f"| {b} | {alloc[0]} x {alloc[1]:g} | {seed} | {fit_off} / {rp.crossfit_nll(m[1], rp.heldout_piece_tokens):.4f}"
              f" | {val_off} / {prior.mixture_nll(m[2], prior.fit_em(m[1])[0]):.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(rp.seeds))
    ap.add_argument("--stage", choices=("grid", "distill", "pydoc"), default="grid")
    ap.add_argument("--shard", default="0/1", help="grid: train entries i, i+n, ... of i/n")
    ap.add_argument("--chosen_in", type=Path, default=ROOT / "bench" / "out", help="pydoc: the --out the picks come from")
    ap.add_argument("--picks", nargs="+", metavar="B:PxC[,PxC]", help="distill, pydoc: the grid's picks as its report "
                    "printed them (where its runs are gone), e.g. 8:1x4 64:1x2,1x4")
    args = ap.parse_args()
    args.out, corpus = rp.from_root(args.out), rp.corpus_arg(args.corpus)
    chosen_in = rp.from_root(args.chosen_in)
    os.chdir(ROOT)
    args.out.mkdir(parents=True, exist_ok=True)
    rp.prepare(corpus, args.out / "data")
    ranking = given_picks(args.picks) if args.picks else None
    if args.stage != "grid" and not ranking and not complete(chosen_in if args.stage == "pydoc" else args.out, rp.seeds):
        sys.exit(f"the {args.stage} stage needs the picks: first the whole grid on seeds {rp.seeds} (--stage grid), "
                 f"or its report's picks as --picks")
    if args.stage == "distill" and (missing := lacking_headline(args.out, args.seeds)):
        sys.exit(f"the distill stage starts at the headline suite's E*: first bench/reproduce.py CORPUS --seeds "
                 f"{' '.join(map(str, missing))}")
    for seed in args.seeds:
        if args.stage == "grid":
            train_grid(args.out, seed, tuple(int(x) for x in args.shard.split("/")))
        elif args.stage == "distill":
            for name, flags in distill_runs(args.out, rp.seeds, seed, ranking).values():
                rp.run(name, args.out, flags)
        else:
            for alloc in dict.fromkeys(a for pair in pydoc_allocations(chosen_in, rp.seeds, ranking).values() for a in pair):
                name, flags = grid(seed)[alloc]
                rp.run(name, args.out, flags)
    report(args.out)


if __name__ == "__main__":
    if (out := rp.report_out()) is not None:
        at = sys.argv.index("--seeds") + 1 if "--seeds" in sys.argv else len(sys.argv)
        report(out, [int(a) for a in itertools.takewhile(lambda a: not a.startswith("--"), sys.argv[at:])] or rp.seeds)
    else:
        main()
