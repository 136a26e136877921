"""
bench/k_select.py: which K members, with which weights, for an inference budget K? (issue 26, item 3.) Four rules,
each judged on fitness tokens it was not fit on (cross-fitted), never on val:

    top-K by weight   fit the prior on the whole population (prior.fit_em), keep its K heaviest, renormalise
                      (prior.mixture: what eval.py, the student and the mixture teacher use today)
    top-K refit       the same K members, their weights fit again on those K alone (EM on K rows)
    greedy            forward selection (prior.greedy_select): add the member that lowers the uniform average's
                      loss most, K times; uniform weights
    greedy refit      greedy's K members, EM weights on them

Cross-fit: the fitness tokens are cut into blocks of `block` tokens (default one held-out piece, 2048 bytes: the
blocks are then different text), even blocks fit and odd ones score, then the other way round; the token-weighted
mean of the two scores is the rule's cross-fitted loss at K. Val is reported beside it with each rule fit on all of
fitness (what a user would ship), never chosen on.

    python eval.py RUN --score                                   # first: RUN/scores/{name}.{fitness,val}.npy
    python bench/k_select.py bench/out/runs/q0-s1 bench/out/runs/q0-s2
    python bench/k_select.py RUN --budget 64                      # the population as it stood at 64 epochs
    python bench/k_select.py RUN --authors                        # prior.select against the authors' rule (issue 39)

--authors: at each K, the mixture prior.select ships (eval.py's K table, the student, tools/) against the authors'
rule (qlabs-eng/slowrun unlimited/gradient_select.py: AdamW on softmax logits, 300 steps at lr 0.5, clip 1, the K
heaviest renormalised; here prior.fit_adamw, from alpha = 0 where the reference adds 1e-4 noise), both fit on all of
fitness: the fitness loss (the split both select on) and val.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import prior  # noqa: E402
from reproduce import fold_halves, heldout_piece_tokens, members  # noqa: E402


def top_weight(F, k):
    return prior.mixture(prior.fit_em(F)[0], k)


def refit(F, idx):
    """(idx, EM weights fit on those members alone)."""
    return idx, prior.fit_em(F[idx])[0]


def greedy(F, k):
    idx = prior.greedy_select(F, k)[:k]
    return idx, np.full(len(idx), 1.0 / len(idx))


def authors(F, k):
    return prior.mixture(prior.fit_adamw(F)[0], k)


RULES = {"top-K by weight": top_weight, "top-K refit": lambda F, k: refit(F, top_weight(F, k)[0]),
         "greedy": greedy, "greedy refit": lambda F, k: refit(F, greedy(F, k)[0])}


def crossfit(F, rule, k, block=heldout_piece_tokens):
    """Token-weighted mean over the two folds of the loss on one fold of the mixture `rule` picks on the other."""
    total = n = 0
    for a, b in fold_halves(F.shape[1], block):
        idx, w = rule(np.ascontiguousarray(F[:, a]), k)
        total, n = total + prior.mixture_nll(np.ascontiguousarray(F[idx][:, b]), w) * len(b), n + len(b)
    return total / n


def table(run_dir, budget=None, block=heldout_piece_tokens):
    """{K: {rule: (cross-fitted fitness, val)}} for K in prior.ks_for(M), the whole population at K = M left out."""
    rows, F, V = members(Path(run_dir), budget=budget)
    F, V = np.asarray(F, dtype=np.float64), np.asarray(V, dtype=np.float64)
    out = {}
    for k in prior.ks_for(len(rows))[:-1]:
        out[k] = {}
        for name, rule in RULES.items():
            idx, w = rule(F, k)
            out[k][name] = (crossfit(F, rule, k, block), prior.mixture_nll(V[idx], w))
    return len(rows), out


def against_authors(run_dir, budget=None):
    """{K: ((authors' fitness, val), (prior.select's fitness, val))} at K = 1, 2, 4, ... below the population."""
    rows, F, V = members(Path(run_dir), budget=budget)
    F, V = np.asarray(F, dtype=np.float64), np.asarray(V, dtype=np.float64)
    w = prior.fit_em(F)[0]
    out = {}
    for k in prior.ks_for(len(rows))[:-1]:
        cells = []
        for idx, wk in (authors(F, k), prior.select(F, k, w=w)):
            cells.append((prior.mixture_nll(F[idx], wk), prior.mixture_nll(V[idx], wk)))
        out[k] = cells
    return len(rows), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--budget", type=float, default=None, help="the members that existed at this many epochs")
    ap.add_argument("--block", type=int, default=heldout_piece_tokens, help="tokens per cross-fitting block")
    ap.add_argument("--authors", action="store_true", help="prior.select against the authors' rule, in-sample fitness")
    args = ap.parse_args()
    if args.authors:
        for run_dir in args.runs:
            M, t = against_authors(run_dir, args.budget)
            print(f"\n{run_dir} ({M} members{'' if args.budget is None else f' at {args.budget:g} epochs'}), "
                  f"selection {prior.selection!r}: fitness / val\n| K | the authors' rule | prior.select | fitness "
                  f"difference (select - authors) |\n|---|---|---|---|")
            for k, ((fa, va), (fs, vs)) in t.items():
                print(f"| {k} | {fa:.5f} / {va:.5f} | {fs:.5f} / {vs:.5f} | {fs - fa:+.5f} |")
        return
    wins, gaps = {r: 0 for r in RULES}, {r: [] for r in RULES}
    for run_dir in args.runs:
        M, t = table(run_dir, args.budget, args.block)
        print(f"\n{run_dir} ({M} members{'' if args.budget is None else f' at {args.budget:g} epochs'}): "
              f"fitness cross-fitted (blocks of {args.block}) / val (fit on all of fitness)")
        print("| K | " + " | ".join(RULES) + " | best on fitness |\n|---|" + "---|" * (len(RULES) + 1))
        for k, cells in t.items():
            best = min(cells, key=lambda r: cells[r][0])
            wins[best] += 1
            for r in RULES:
                gaps[r].append(cells[r][0] - cells[best][0])
            print(f"| {k} | " + " | ".join(f"{f:.4f} / {v:.4f}" for f, v in cells.values()) + f" | {best} |")
    print("\n| rule | best at (run, K) pairs | mean fitness excess over the best rule (nats/token) | worst |")
    print("|---|---|---|---|")
    for r in RULES:
        print(f"| {r} | {wins[r]} of {len(gaps[r])} | {np.mean(gaps[r]):.5f} | {np.max(gaps[r]):.5f} |")


if __name__ == "__main__":
    main()
