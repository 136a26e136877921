"""
prior.py: the learned prior over a q0 population (primitive 3). Its weights are fit on the held-out fitness split;
at an inference budget of K members, the K that greedy forward selection picks or the fit's K heaviest, whichever
mixture is better on fitness, weighted by the same fit on those K alone (select). With p_i(y_t) = exp(L[i, t])
member i's probability of the true token (scores.py):

    min_w  f(w) = mean_t -log sum_i w_i p_i(y_t),   w on the simplex

f is convex in w, so the exact EM update finds the optimum with no learning rate (fit_em); the reference's
AdamW-on-softmax-logits fit is fit_adamw. Arrays (or scores.Scores, on their device) in, weights out: nothing here
reads a file, and nothing here ever sees the val split, the test set. eval.py fits, writes and reads RUN/prior.json.
"""
import time

import numpy as np
import torch

from scores import as_probs, like, progress, to_numpy, xp

# -----------------------------------------------------------------------------
method = "em"            # em | adamw: whose weights go into prior.json (eval.py --compare_adamw runs both)
selection = "greedy|top"  # K members (select): greedy|top: greedy's K or the full fit's K heaviest, whichever is better
                         # on fitness, weights refit | top: the K heaviest, renormalised (the paper's); in prior.json
split = "fitness"        # the only split a prior is fit on; val is the test set
em_iters = 5000          # cap on EM's passes over L after the first; each: an exp and two matrix-vector products
em_tol = 1e-9            # EM stops once a step lowers the objective by less (nats/token)
em_gap = 1e-7            # ... or once its certificate says it is this close to the optimum (nats/token)
em_accelerate = True     # SQUAREM steps (fit_em): the same optimum in 9-18x fewer passes; False: plain EM
adamw_lr = 0.5           # reference: AdamW on alpha, w = softmax(alpha), lr 0.5
adamw_steps = 300        # reference: 300 full-batch steps
adamw_clip = 1.0         # reference: gradient-norm clip
# -----------------------------------------------------------------------------


def mixture_nlls(L, W, chunk=None, log=None, what="mixtures"):
    """Mean over tokens of -log sum_i W_qi p_i(t) for each row q of W (Q, M), in one read of L: per block of tokens
    c_t + log (W @ P)_qt. Members no mixture weights are never read (their terms are exactly 0), so a top-K mixture
    reads K rows; the K table, its baselines and the budget curve are one pass over val together."""
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))  # (Q, M)
    L = as_probs(L, chunk)
    keep = np.flatnonzero(W.any(axis=0))
    if len(keep) < len(L):
        L, W = L[keep], W[:, keep]
    total, Wd = 0.0, None
    for P, c in progress(L, L.blocks, f"{what} | {len(W)} x {len(keep)} members x {L.shape[1]:,} tokens", log):
        Wd = like(W, P) if Wd is None else Wd
        with np.errstate(divide="ignore"):
            total = total + (c + xp(P).log(Wd @ P)).sum(axis=1)  # (Q,)
    return -to_numpy(total) / L.shape[1]


def mixture_nll(L, w, chunk=None):
    """Mean over tokens of -log sum_i w_i p_i(t), by logsumexp over members in float64, one chunk of tokens at a
    time (mixture_nlls with one mixture). Members of zero weight are never read."""
    return float(mixture_nlls(L, [w], chunk)[0])


def objective_and_ratios(L, w, chunk=None):
    """f(w) = mean_t -log p_w(t), p_w(t) = sum_i w_i p_i(t), and g_i = mean_t p_i(t) / p_w(t), in one read of L.
    g is minus the gradient of f over w; EM's update is w_i <- w_i g_i, and sum_i w_i g_i = 1."""
    L, f, g = as_probs(L, chunk), 0.0, 0.0
    for P, c in L:  # (M, c), (c,)
        pw = like(w, P) @ P  # (c,) mixture prob of the true token, / exp(c_t)
        f -= (c + xp(P).log(pw)).sum()
        g = g + P @ (1.0 / pw)
    return float(f) / L.shape[1], to_numpy(g) / L.shape[1]


def fit_em(L, iters=em_iters, tol=em_tol, gap=em_gap, accelerate=em_accelerate, chunk=None, w0=None):
    """Exact EM for the mixture weights, from uniform (or from w0, every entry > 0: EM never revives a zero):
        r_it = w_i p_i(t) / sum_j w_j p_j(t)      (responsibility of member i for token t)
        w_i <- mean_t r_it = w_i * mean_t p_i(t) / p_w(t) = w_i g_i
    Each step never raises f (EM is a minorise-maximise method) and keeps w on the simplex.
    g also certifies the fit: f(w) - min f <= log max_i g_i (Jensen), reported as info["gap"].
    EM's steps shrink as small weights fade (thousands of passes at 64 members), so by default each step is a
    SQUAREM step (Varadhan & Roland 2008, scheme S3): two EM steps w -> w1 -> w2, r = w1 - w, v = w2 - 2 w1 + w,
        a = -|r| / |v|,   w' = w - 2a r + a^2 v      (a = -1 gives w2; a is halved towards -1 until w' >= 0)
    then one EM step from w'; it is kept only if its objective is below w2's, else w2 is. So f never rises, as in
    EM, and it reaches the optimum in 9-18x fewer passes on our populations (BENCHMARKS 4).
    Stops when the gap is below `gap`, when a step lowers f by less than tol, or after iters passes over L."""
    t0 = time.time()
    L = as_probs(L, chunk, hold=True)
    w = np.full(len(L), 1.0 / len(L)) if w0 is None else np.asarray(w0, dtype=np.float64) / np.sum(w0)
    f, g = objective_and_ratios(L, w)
    history, passes = [f], 0

    def em_step(w, g):  # -> (f, g, w) one EM step on; one pass over L
        w = w * g
        w /= w.sum()  # exact maths keeps sum 1; this only stops rounding drift
        return (*objective_and_ratios(L, w), w)

    while passes < iters and np.log(g.max()) > gap:
        new = _, g1, w1 = em_step(w, g)
        passes += 1
        if accelerate and passes + 1 <= iters:
            new = f2, _, w2 = em_step(w1, g1)
            passes += 1
            r, v = w1 - w, w2 - 2 * w1 + w
            if passes + 2 <= iters and np.linalg.norm(v) > 0:
                a = -np.linalg.norm(r) / np.linalg.norm(v)
                for _ in range(30):
                    w_x = w - 2 * a * r + a * a * v
                    if a >= -1 or w_x.min() >= 0:
                        break
                    a = (a - 1) / 2
                if a < -1 and w_x.min() >= 0:
                    w_x /= w_x.sum()
                    tried = em_step(w_x, objective_and_ratios(L, w_x)[1])
                    passes += 2
                    new = tried if tried[0] < f2 else new
        f, g, w = new
        history.append(f)
        if history[-2] - history[-1] < tol:
            break
    info = dict(iterations=passes, objective=history[-1], seconds=time.time() - t0, gap=float(np.log(g.max())),
                history=history)
    return w, info


def fit_adamw(L, lr=adamw_lr, steps=adamw_steps, clip=adamw_clip, chunk=None):
    """The reference's fit: w = softmax(alpha), alpha = 0 at start, full-batch AdamW (weight_decay=0) on
    f(softmax(alpha)) = mean_t -log sum_i w_i p_i(t), grad-norm clip `clip`. The gradient comes from the same
    read of L as EM's: df/dw = -g, so by the softmax Jacobian  df/dalpha_j = w_j (sum_i w_i g_i - g_j)."""
    t0 = time.time()
    L = as_probs(L, chunk, hold=True)
    alpha = torch.zeros(len(L), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = []
    for _ in range(steps):
        w = torch.softmax(alpha.detach(), 0).numpy()
        f, g = objective_and_ratios(L, w)
        alpha.grad = torch.from_numpy(w * (w @ g - g))
        torch.nn.utils.clip_grad_norm_([alpha], clip)
        opt.step()
        history.append(f)
    w = torch.softmax(alpha.detach(), 0).numpy()
    info = dict(iterations=steps, objective=mixture_nll(L, w), seconds=time.time() - t0, history=history)
    return w, info


FITS = {"em": fit_em, "adamw": fit_adamw}  # every fit by the name prior.json records (--method); fit(L) -> (w, info)


def mixture(w, k):
    """The k heaviest members of one weighting (ties go to the earlier index), weights renormalised to sum 1,
    w_i / sum_{j in top k} w_j: the top K of the full fit, the rule before select (a baseline, bench/k_select.py)."""
    w = np.asarray(w, dtype=np.float64)
    idx = np.argsort(-w, kind="stable")[:k]
    return idx, w[idx] / w[idx].sum()


def select(L, k, order=None, method=method, w=None, chunk=None, log=None):
    """The mixture at inference budget k, as every consumer of the prior uses it (eval.py's K table, the student, the
    mixture teacher, tools/), of two candidate sets of k members: the first k of greedy forward selection
    (greedy_select, or `order` when it was run already: its every prefix is the greedy one) and the full fit's k
    heaviest (w, that fit, when the caller has it); each with its weights fit by `method` on those k alone, the one
    whose mixture is better on L (fitness; greedy's on a tie). k >= M: every member, the full fit. -> (member
    indices in the order picked, weights). selection = "top": mixture() of the full fit, the paper's rule.
    Why both: the full fit weights a member by what it adds to all the others, so its top k are often not the k that
    work best alone together (cross-fitted, greedy's were 0.005-0.011 nats better at K = 2-8: BENCHMARKS 1f), but not
    always (the quick start at K = 8: 0.0025 worse than the paper's rule on fitness). The refit of the heaviest k is
    never worse on fitness than their renormalised weights, so no K is worse than the paper's rule there."""
    if selection == "top" or k >= len(L):  # the full fit's: reads L only when w is not given
        w = FITS[method](as_probs(L, chunk, hold=True))[0] if w is None else w
        return (np.arange(len(L)), w) if k >= len(L) else mixture(w, k)  # "top": the paper's rule, one switch away
    L = as_probs(L, chunk, hold=True)
    w = FITS[method](L)[0] if w is None else w
    greedy = np.asarray(order[:k] if order is not None and len(order) >= k else greedy_select(L, k, log=log))
    heaviest = mixture(w, k)[0]
    fits = [(idx, FITS[method](L[idx])[0]) for idx in ([greedy, heaviest] if set(greedy) != set(heaviest) else [greedy])]
    return min(fits, key=lambda fit: mixture_nll(L[fit[0]], fit[1]))  # min keeps the first (greedy's) on a tie


def greedy_select(L, k, chunk=None, log=None):
    """Caruana-style forward selection on the fitness split, without replacement: start empty; each
    step adds the member whose inclusion gives the lowest mixture_nll of the uniform average over the
    selected set. Returns member indices in the order picked, so every prefix is the greedy k' < k.
    One pass over L per pick (held: no exp), in one reused buffer (a fresh (M, c) array per pick would cost more
    in page faults than the logs)."""
    L = as_probs(L, chunk, hold=True)
    M, chosen, totals, buf = len(L), [], [], None
    for _ in progress(range(min(k, M)), min(k, M), f"greedy | {M} members x {L.shape[1]:,} tokens | pick", log):
        score = 0.0  # sum_t log(sum of the chosen members' and the candidate's shifted probs), every candidate
        for j, (P, _) in enumerate(L):  # same shift c_t for every candidate, so ignore it
            m = xp(P)
            if not chosen:
                totals.append(m.zeros_like(P[0]))
            else:
                totals[j] += P[chosen[-1]]  # the chosen members' sum, added in the order picked
            size = P.shape[0] * P.shape[1]
            buf = m.empty_like(P).reshape(-1) if buf is None or len(buf) < size else buf
            x = buf[:size].reshape(P.shape)
            with np.errstate(divide="ignore"):
                score = score + m.log(m.add(P, totals[j], out=x), out=x).sum(axis=1)
        rest = np.array([i for i in range(M) if i not in chosen])
        chosen.append(int(rest[np.argmax(to_numpy(score)[rest])]))  # argmax: first candidate wins a tie
    return np.array(chosen)


def ks_for(M):
    """Inference budgets to report: K = 1, 2, 4, ... below M, and M itself."""
    if M < 1:
        raise ValueError("need at least one member")
    ks = [1 << i for i in range(int(M).bit_length()) if 1 << i < M]
    return ks + [M]
