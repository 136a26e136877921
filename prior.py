"""
Learned prior over a q0 population (Primitive 3): one weighting of all members, fit on the
held-out fitness split, reused for every inference budget K (keep the top K, renormalise).

    min_w  f(w) = mean_t -log sum_i w_i p_i(y_t),   w on the simplex,   p_i(y_t) = exp(L[i, t])

f is convex in w, so the exact EM update finds the optimum with no learning rate; the reference's
AdamW-on-softmax-logits fit is run beside it for comparison. It needs only each member's
log-probability of the true token, which eval.py writes to RUN/scores/{name}.{split}.npy.
Nothing here ever reads the val split: that is the test set.

Launch (the fit is a few (M, N) matrix-vector products, so CPU is enough; no GPU, no torchrun):
    python eval.py runs/RUN --score                       # per-member log-probs, both splits
    python prior.py runs/RUN                              # EM fit -> runs/RUN/prior.json
    python prior.py runs/RUN --method adamw               # the reference's fit instead
    python prior.py runs/RUN --members a,b,c --out prior_abc.json   # a sub-population
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
method = "em"            # em | adamw: whose weights go into prior.json (both always run and compared)
split = "fitness"        # the only split a prior is fit on; val is the test set
em_iters = 5000          # EM iteration cap; each is two (M, N) matrix-vector products
em_tol = 1e-9            # EM stops once an iteration lowers the objective by less (nats/token)
adamw_lr = 0.5           # reference: AdamW on alpha, w = softmax(alpha), lr 0.5
adamw_steps = 300        # reference: 300 full-batch steps
adamw_clip = 1.0         # reference: gradient-norm clip
out_name = "prior.json"  # written inside the run folder
# -----------------------------------------------------------------------------

# --- loading -----------------------------------------------------------------

def score_path(run_dir, name, split):
    """Where eval.py writes member `name`'s log-probs of the true token on `split`."""
    return Path(run_dir) / "scores" / f"{name}.{split}.npy"


def load_scores(run_dir, names, split):
    """Stack the members' log-prob arrays into L, shape (M, N), float64 (the .npy may be fp16)."""
    paths = [score_path(run_dir, n, split) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} score file(s) missing, first: {missing[0]} "
                                f"(all: {missing}); run `python eval.py {run_dir} --score` first")
    arrays = [np.load(p) for p in paths]
    shapes = {n: a.shape for n, a in zip(names, arrays)}
    if any(a.ndim != 1 for a in arrays) or len({a.shape for a in arrays}) > 1:
        raise ValueError(f"score files for split {split!r} must be 1-D and of equal length (all "
                         f"members scored on the same positions), got {shapes}; "
                         f"re-run `python eval.py {run_dir} --score`")
    L = np.stack(arrays).astype(np.float64)  # (M, N)
    if np.isnan(L).any():
        raise ValueError(f"NaN in score files for split {split!r}; re-run `python eval.py {run_dir} --score`")
    return L


# --- the objective -----------------------------------------------------------

def _shifted_probs(L):
    """p_i(t) / max_j p_j(t) = exp(L[i,t] - c_t), c_t = max_j L[j,t]: the logsumexp trick done once.
    Every column's best member gets 1, so nothing that matters underflows, and any mixture is
    log sum_i w_i p_i(t) = c_t + log (w @ P)_t, one matrix-vector product instead of an exp per step."""
    c = L.max(axis=0)  # (N,)
    c = np.where(np.isfinite(c), c, 0.0)  # a column every member gives p=0 stays at -inf below
    return np.exp(L - c), c  # (M, N), (N,)


def mixture_nll(L, w):
    """Mean over tokens of -log sum_i w_i p_i(t), by logsumexp over members; zero weights allowed."""
    with np.errstate(divide="ignore"):
        x = np.log(np.asarray(w, dtype=np.float64))[:, None] + L  # (M, N) log w_i p_i(t)
    m = x.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return float(-(m + np.log(np.exp(x - m).sum(axis=0))).mean())


def fit_em(L, iters=em_iters, tol=em_tol):
    """Exact EM for the mixture weights, from uniform:
        r_it = w_i p_i(t) / sum_j w_j p_j(t)      (responsibility of member i for token t)
        w_i <- mean_t r_it = w_i * mean_t p_i(t) / p_w(t)
    Each step never raises f (EM is a minorise-maximise method) and keeps w on the simplex.
    g_i = mean_t p_i(t)/p_w(t) also certifies the fit: f(w) - min f <= log max_i g_i (Jensen),
    reported as info["gap"]. Stops when f drops by less than tol in an iteration, or after iters."""
    t0 = time.time()
    P, c = _shifted_probs(L)
    M, N = P.shape
    w = np.full(M, 1.0 / M)
    pw = w @ P  # (N,) mixture prob of the true token, / exp(c_t)
    history, it = [float(-(c + np.log(pw)).mean())], 0
    for it in range(1, iters + 1):
        g = P @ (1.0 / pw) / N  # (M,)
        w = w * g
        w /= w.sum()  # exact maths keeps sum 1; this only stops rounding drift
        pw = w @ P
        history.append(float(-(c + np.log(pw)).mean()))
        if history[-2] - history[-1] < tol:
            break
    gap = float(np.log((P @ (1.0 / pw) / N).max()))
    info = dict(iterations=it, objective=history[-1], seconds=time.time() - t0, gap=gap, history=history)
    return w, info


def fit_adamw(L, lr=adamw_lr, steps=adamw_steps, clip=adamw_clip):
    """The reference's fit: w = softmax(alpha), alpha = 0 at start, full-batch AdamW
    (weight_decay=0) on f(softmax(alpha)) = mean_t -log sum_i w_i p_i(t), grad-norm clip `clip`."""
    t0 = time.time()
    P, c = _shifted_probs(L)
    P, c = torch.from_numpy(P), torch.from_numpy(c)
    alpha = torch.zeros(P.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = []
    for _ in range(steps):
        loss = -(c + torch.log(torch.softmax(alpha, 0) @ P)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([alpha], clip)
        opt.step()
        history.append(loss.item())
    w = torch.softmax(alpha.detach(), 0).numpy()
    info = dict(iterations=steps, objective=mixture_nll(L, w), seconds=time.time() - t0, history=history)
    return w, info


# --- using the weights, and the baselines ------------------------------------

def top_k(w, k):
    """The k heaviest members (ties go to the earlier index) and their weights renormalised to sum 1."""
    w = np.asarray(w, dtype=np.float64)
    idx = np.argsort(-w, kind="stable")[:k]
    return idx, w[idx] / w[idx].sum()


def uniform_last(M, k):
    """The last k members in training order (the newest), to be averaged uniformly."""
    return np.arange(M - k, M)


def greedy_select(L, k):
    """Caruana-style forward selection on the fitness split, without replacement: start empty; each
    step adds the member whose inclusion gives the lowest mixture_nll of the uniform average over the
    selected set. Returns member indices in the order picked, so every prefix is the greedy k' < k."""
    P, c = _shifted_probs(L)
    M = P.shape[0]
    chosen, total = [], np.zeros(P.shape[1])  # total: sum of the chosen members' shifted probs (N,)
    for _ in range(min(k, M)):
        rest = np.array([i for i in range(M) if i not in chosen])
        with np.errstate(divide="ignore"):
            score = np.log(total + P[rest]).mean(axis=1)  # same /n for every candidate, so ignore it
        chosen.append(int(rest[np.argmax(score)]))  # argmax: first candidate wins a tie
        total += P[chosen[-1]]
    return np.array(chosen)


def ks_for(M):
    """Inference budgets to report: K = 1, 2, 4, ... below M, and M itself."""
    if M < 1:
        raise ValueError("need at least one member")
    ks = [1 << i for i in range(int(M).bit_length()) if 1 << i < M]
    return ks + [M]


def fit_prior(names, L_fitness, method=method):
    """Everything prior.json holds: the fitted weights, the top-K mixtures for each K in ks_for(M),
    the uniform-over-last-K and greedy baselines at the same K (same layout, so eval.py can score all
    of them on val alike), and EM vs AdamW. Fit on the fitness split only."""
    names, L = list(names), np.asarray(L_fitness, dtype=np.float64)
    assert L.shape[0] == len(names), f"{len(names)} names but L has {L.shape[0]} rows"
    fits = {"em": fit_em(L), "adamw": fit_adamw(L)}
    if method not in fits:
        raise ValueError(f"method must be one of {list(fits)}, got {method!r}")
    w = fits[method][0]
    ks = ks_for(len(names))
    greedy = greedy_select(L, ks[-2] if len(ks) > 1 else 1)  # at K = M greedy is every member

    def entry(idx, weights):
        full = np.zeros(len(names))
        full[idx] = weights
        return {"members": [names[i] for i in idx], "weights": [float(x) for x in weights],
                "fitness_nll": mixture_nll(L, full)}

    def uniform(idx):
        return entry(idx, np.full(len(idx), 1.0 / len(idx)))

    return {
        "method": method,
        "split": split,
        "num_tokens": int(L.shape[1]),
        "members": names,
        "objective_fitness": fits[method][1]["objective"],
        "weights": {n: float(x) for n, x in zip(names, w)},
        "per_k": {str(k): entry(*top_k(w, k)) for k in ks},
        "baselines": {
            "uniform_last": {str(k): uniform(uniform_last(len(names), k)) for k in ks},
            "greedy": {str(k): uniform(greedy[:k] if k < len(names) else np.arange(k)) for k in ks},
        },
        "compare": {m: {key: info[key] for key in ("objective", "seconds", "iterations")}
                    for m, (_, info) in fits.items()},
    }


# --- writing and the command line --------------------------------------------

def write_json_atomic(path, obj):
    """Temp file in the same folder, fsync, os.replace: a killed write leaves the old file or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_prior(path, names, L_fitness, method=method):
    """Fit the prior for these members (rows of L_fitness, in training order) and write it to path."""
    prior = fit_prior(names, L_fitness, method)
    write_json_atomic(path, prior)
    return prior


def report(prior, top=10):
    """The short table the CLI prints: both fits, the per-K losses, the heaviest members."""
    print(f"prior | {len(prior['members'])} members | {prior['num_tokens']:,} {prior['split']} tokens "
          f"| weights from {prior['method']}")
    print("fit   | nll (nats/tok) | iters |     s")
    for m, r in prior["compare"].items():
        print(f"{m:<5} | {r['objective']:14.6f} | {r['iterations']:5d} | {r['seconds']:5.2f}")
    print("    K | prior nll | greedy nll | last-K nll")
    b = prior["baselines"]
    for k, e in prior["per_k"].items():
        print(f"{k:>5} | {e['fitness_nll']:9.4f} | {b['greedy'][k]['fitness_nll']:10.4f} "
              f"| {b['uniform_last'][k]['fitness_nll']:10.4f}")
    heaviest = sorted(prior["weights"].items(), key=lambda kv: -kv[1])[:top]
    print("top weights: " + ", ".join(f"{n} {x:.3f}" for n, x in heaviest))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fit the learned prior of a q0 run on its fitness split.")
    ap.add_argument("run_dir", help="run folder with a manifest and scores/ (from eval.py --score)")
    ap.add_argument("--method", default=method, choices=["em", "adamw"], help="whose weights to save")
    ap.add_argument("--members", default=None, help="comma-separated subset of member names")
    ap.add_argument("--out", default=out_name, help="output file name, inside run_dir")
    args = ap.parse_args(argv)
    from train import read_manifest  # lazy: the maths above must import without train.py
    names = [row["name"] for row in read_manifest(args.run_dir)]  # training order
    if args.members:
        wanted = [n.strip() for n in args.members.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--members: not in {args.run_dir}'s manifest: {unknown}")
        names = [n for n in names if n in wanted]  # keep training order: uniform_last relies on it
    L = load_scores(args.run_dir, names, split)
    prior = write_prior(Path(args.run_dir) / args.out, names, L, args.method)
    report(prior)
    print(f"wrote {Path(args.run_dir) / args.out}")
    return prior


if __name__ == "__main__":
    main()
