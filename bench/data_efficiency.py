"""
bench/data_efficiency.py: q0's data efficiency in the Slowrun unit, at CPU scale (BENCHMARKS.md 1j). The data-rich
baseline is the best single model trained on N bytes of the same Shakespeare corpus, N = 100K ... 3.2M, scored on the
same val and fitness bytes at every N; a method's efficiency is the N at which the baseline's val loss (piecewise-linear
in N) equals the method's, divided by the 100K bytes the method saw (eval.data_efficiency, the function eval.py's
FineWeb figure uses with the nanochat table). A loss off the baseline's table is reported as such, never extrapolated.

    python bench/reproduce.py CORPUS --seeds S                         # first: the methods (headline suite, 64 epochs)
    python bench/reproduce.py CORPUS --seeds S --budget 128            # ... and 128, 256 (the same runs extended)
    python bench/data_efficiency.py CORPUS --seeds S                   # mini baselines at every N, smallest N first
    python bench/data_efficiency.py CORPUS --seeds S --tokens 200000 400000     # only these N
    python bench/data_efficiency.py CORPUS --seeds 1 --size small      # small from 400K (need_small: the rule)
    python bench/data_efficiency.py --report                           # the tables, no training

Every N has its own data folder under --out (data-N<bytes>; N = 100K is the headline's own bench/out/data, and its
single models are the headline's). At each (N, model size, seed) single models of 1, 2 and 4 epochs are trained and a
model of twice the longest length is added while the longest is the best on fitness (reproduce.single_curve); the
baseline of seed S at N is the (size, epochs) best on fitness: mini of seed S, small of seed S where it was trained,
else small of seed 1. Val is only reported. Runs are cached, resumed and never redone as bench/reproduce.py's.
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import eval as ev  # noqa: E402
import reproduce as rp  # noqa: E402

# -----------------------------------------------------------------------------------------------------
train_sizes = (100_000, 200_000, 400_000, 800_000, 1_600_000, 3_200_000)  # N: bytes of train; 100K is the headline's
first_lengths = (1, 2, 4)          # epochs at every N > 100K, doubled while the longest is the best on fitness
smallest_n = {"mini": 100_000, "small": 400_000}  # model sizes, and the smallest N each is trained at
small_always = (400_000, 800_000)  # small beyond these only where a method's loss needs it (need_small)
method_budgets = (64, 128, 256)    # epochs: q0 and the naive ensemble at each (bench/reproduce.py's headline runs)
# -----------------------------------------------------------------------------------------------------


def data_dir(out, corpus, n):
    """The prepared data of N train bytes: the headline's own at 100K, else out/data-N<n> (prepared once)."""
    return out / "data" if n == rp.train_tokens else rp.prepare(corpus, out / f"data-N{n}", n)


def prefix(n, size):
    """Run names of the baseline at (N, size): the headline's own single models at 100K bytes with mini."""
    return "single" if (n, size) == (rp.train_tokens, "mini") else f"single-{size}-N{n}"


def train_baseline(out, corpus, seed, n, size):
    """Train (or reuse) the single models of one (N, size, seed) -> [(epochs, val, fitness)]."""
    if (n, size) == (rp.train_tokens, "mini"):
        return rp.single_curve(out, seed)
    return rp.single_curve(out, seed, first_lengths, prefix(n, size), data_dir(out, corpus, n), model_size=size)


def measured(out, seed, n, size):
    """[(epochs, val, fitness)] of the finished single models of one (N, size, seed), shortest first; never trains."""
    points = []
    for d in (out / "runs").glob(f"{prefix(n, size)}-E*-s{seed}"):
        if m := rp.finished(out, d.name):
            rows, F, V = m
            points.append((int(d.name.rsplit("-E", 1)[1].split("-s")[0]), float(-V[0].mean()), float(-F[0].mean())))
    return sorted(points)


def finished_curve(points, n, size):
    """Whether the single models of one (N, size, seed) are the rule's whole curve: every first length trained and the
    longest trained not the best on fitness (single_curve would add twice it; at 128 it stops). An unfinished curve
    (a run killed, or still training) is not a point of the baseline: its best so far is not the rule's best."""
    lengths = rp.single_lengths if (n, size) == (rp.train_tokens, "mini") else first_lengths
    return set(lengths) <= {p[0] for p in points} and not rp.wants_longer(points)


def size_points(out, seed, n, size):
    """(seed, [(epochs, val, fitness)]) of the finished curve (finished_curve) at (N, size) that seed S's baseline
    reads: its own; for small, seed 1's where seed S has none. (None, []) where there is none."""
    for s in dict.fromkeys((seed, 1) if size == "small" else (seed,)):
        if n >= smallest_n[size] and (points := measured(out, s, n, size)) and finished_curve(points, n, size):
            return s, points
    return None, []


def baseline_table(out, seed):
    """Seed S's data-rich baseline: {N: dict(size, epochs, val, fitness, seed)}, at each N the single model best on
    fitness over its epochs and the sizes trained there (size_points)."""
    table = {}
    for n in train_sizes:
        cands = []
        for size in smallest_n:
            s, points = size_points(out, seed, n, size)
            if points:
                E, val, fit = min(points, key=lambda p: p[2])
                cands.append(dict(size=size, epochs=E, val=val, fitness=fit, seed=s))
        if cands:
            table[n] = min(cands, key=lambda c: c["fitness"])
    return table


def method_losses(out, seed):
    """Val loss of each method of the 100K-byte data at each budget measured: {label: val} from the headline suite's
    results (bench/reproduce.py: the best single model, the naive ensemble's first budget / E* members, q0's prior over
    the population of that budget)."""
    res = rp.load_results(out)
    losses = {}
    if h := res.get("headline", {}).get(str(seed)):
        best = min(h["single"], key=lambda p: p[2])
        losses[f"best single model ({best[0]} epochs)"] = best[1]
    for b in method_budgets:
        h = res.get(f"headline{rp.budget_tag(b)}", {}).get(str(seed))
        if h:
            losses[f"naive ensemble at {b} ({h['ensemble_size']} x {h['best_single_epochs']} epochs)"] = h["target"]
            losses[f"q0 at {b} epochs (prior over all)"] = rp.loss_at(h["q0"], b)
    return losses


def efficiency(out, seed):
    """{label: (val, efficiency or None)} of every method against seed S's baseline (eval.data_efficiency)."""
    table = [(n, r["val"]) for n, r in baseline_table(out, seed).items()]
    return {label: (loss, ev.data_efficiency(loss, table, rp.train_tokens) if table else None)
            for label, loss in method_losses(out, seed).items()}


def need_small(out, n, seed, seeds=rp.seeds):
    """The pre-registered rule (BENCHMARKS.md 1j) for small at N. Seed 1: at 400K and 800K always; at a larger N only if
    some method's loss is below its seed's baseline at N / 2 (the point at N then bounds the segment that loss falls
    in). Another seed: only where small is a seed's baseline at N and N bounds the segment of one of that seed's
    methods' losses: where small decides the curve."""
    tables = [(baseline_table(out, s), list(method_losses(out, s).values())) for s in seeds]
    if seed == 1:
        return n in small_always or any(n // 2 in t and any(x < t[n // 2]["val"] for x in losses) for t, losses in tables)
    return any(n in t and t[n]["size"] == "small" and any(bounds(t, n, x) for x in losses) for t, losses in tables)


def bounds(table, n, loss):
    """Whether N is an end of a segment of the baseline's curve that `loss` falls in."""
    ns = sorted(table)
    return any(n in (lo, hi) and table[hi]["val"] <= loss <= table[lo]["val"] for lo, hi in zip(ns, ns[1:]))


def report(out, seeds=rp.seeds):
    if not (out / "runs").is_dir():
        sys.exit(f"{out} holds no runs: train first (the commands at the top of bench/data_efficiency.py)")
    results = {}
    for seed in seeds:
        table, eff = baseline_table(out, seed), efficiency(out, seed)
        if not table:  # said, not skipped in silence: a report with no line looks like a report of nothing
            print(f"seed {seed}: no finished baseline curve yet (python bench/data_efficiency.py CORPUS --seeds {seed})")
            continue
        results[seed] = dict(baseline=table, efficiency=eff)
        print(f"\nseed {seed}: the data-rich baseline, single models on N bytes (each size: the epochs best on fitness, of "
              "those trained); the baseline is the size best on fitness")
        print("| N (bytes) | " + " | ".join(f"{size}: E (of) / fitness / val" for size in smallest_n) + " | baseline val |")
        print("|---|" + "---|" * (len(smallest_n) + 1))
        for n in train_sizes:
            cells = []
            for size in smallest_n:
                s, points = size_points(out, seed, n, size)
                E, val, fit = min(points, key=lambda p: p[2]) if points else (None, None, None)
                started = measured(out, seed, n, size) if E is None and n >= smallest_n[size] else []
                cells.append(f"unfinished ({', '.join(str(p[0]) for p in started)} trained)" if started else
                             "-" if E is None else f"{E} ({', '.join(str(p[0]) for p in points)}) / {fit:.4f} / {val:.4f}"
                             + ("" if s == seed else f" (seed {s})"))
            r = table.get(n)
            print(f"| {n:,} | " + " | ".join(cells) + " | " + ("-" if r is None else f"{r['val']:.4f} ({r['size']})") + " |")
        print(f"\nseed {seed}: data efficiency (the baseline's N at the method's val loss / {rp.train_tokens:,} bytes)")
        print(f"| method (on {rp.train_tokens:,} bytes) | val | equivalent N | efficiency |\n|---|---|---|---|")
        for label, (loss, e) in eff.items():
            off = "off the table: " + ("worse than its first point" if loss > table[min(table)]["val"] else
                                       f"better than every point (> {max(table) / rp.train_tokens:g}x)")
            print(f"| {label} | {loss:.4f} | " + (off if e is None else f"{e * rp.train_tokens:,.0f}") + " | " +
                  ("-" if e is None else f"{e:.2f}x") + " |")
    (out / "data_efficiency.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(rp.seeds))
    ap.add_argument("--size", choices=tuple(smallest_n), default="mini")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(train_sizes), help="the N to train, smallest first")
    args = ap.parse_args()
    args.out, corpus = rp.from_root(args.out), rp.corpus_arg(args.corpus)
    os.chdir(ROOT)
    for seed in args.seeds:
        for n in sorted(args.tokens):
            if n < smallest_n[args.size]:
                continue
            if args.size == "small" and not need_small(args.out, n, seed):
                print(f"small at N = {n:,}, seed {seed}: not needed by the rule (need_small)", flush=True)
                continue
            train_baseline(args.out, corpus, seed, n, args.size)
    report(args.out)


if __name__ == "__main__":
    if (out := rp.report_out()) is not None:
        report(out)
    else:
        main()
