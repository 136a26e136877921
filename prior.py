"""
Learned prior over a q0 population (Primitive 3): a weighting of the members, fit on the held-out
fitness split; at an inference budget of K members, the K that greedy forward selection picks, weighted by the
same fit on those K alone (select).

    min_w  f(w) = mean_t -log sum_i w_i p_i(y_t),   w on the simplex,   p_i(y_t) = exp(L[i, t])

f is convex in w, so the exact EM update finds the optimum with no learning rate; the reference's
AdamW-on-softmax-logits fit runs beside it when asked (eval.py --compare_adamw). It needs only each member's
log-probability of the true token, which eval.py writes to RUN/scores/{name}.{split}.npy.
Nothing here ever reads the val split: that is the test set. Arrays in, weights out: this file imports
nothing of the project. The score files are memory-mapped and every sum over tokens runs over blocks of
chunk_tokens tokens in float64, so host memory is O(M x chunk_tokens), whatever N (480 members x 10M tokens
would be ~40 GB per float64 (M, N) copy); plain in-RAM (M, N) arrays work as well.

The maths runs on numpy arrays, or on torch tensors of the backend's device (a GPU: the same functions, their
blocks on the device; `backend`), with the same results to rounding (~1e-12 nats).

A library, not a script: eval.py owns RUN/prior.json (fit_prior's dict, written once and kept while it is current
for the run's members), so there is one writer of it:
    python eval.py runs/RUN                               # score, fit the prior (EM) -> RUN/prior.json, report
    python eval.py runs/RUN --method adamw                # the reference's fit instead
    python eval.py runs/RUN --compare_adamw               # EM's weights, AdamW's fit beside them in prior.json
"""
import hashlib
import json
import mmap
import time
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
method = "em"            # em | adamw: whose weights go into prior.json (fit_prior(compare=True) runs both)
selection = "greedy"     # K members (select): greedy: greedy's K, weights refit on them (chosen on fitness, BENCHMARKS
                         # 1f) | top: the full fit's K heaviest, renormalised (the paper's); recorded in prior.json
split = "fitness"        # the only split a prior is fit on; val is the test set
em_iters = 5000          # cap on EM's passes over L after the first; each: an exp and two matrix-vector products
em_tol = 1e-9            # EM stops once a step lowers the objective by less (nats/token)
em_gap = 1e-7            # ... or once its certificate says it is this close to the optimum (nats/token)
em_accelerate = True     # SQUAREM steps (fit_em): the same optimum in 9-18x fewer passes; False: plain EM
adamw_lr = 0.5           # reference: AdamW on alpha, w = softmax(alpha), lr 0.5
adamw_steps = 300        # reference: 300 full-batch steps
adamw_clip = 1.0         # reference: gradient-norm clip
chunk_tokens = 2**16     # tokens per float64 block of the maths: ~M x 0.5 MiB per block (480 members: 240 MiB)
hold_bytes = 2**31       # a fit holds exp(L) (float64) when it fits in this, so its passes skip the read and the exp
backend = "auto"         # auto: torch on CUDA when present, else numpy | numpy | cuda | cpu (torch on CPU tensors)
# -----------------------------------------------------------------------------

# --- loading -----------------------------------------------------------------

def score_path(run_dir, name, split):
    """Where eval.py writes member `name`'s log-probs of the true token on `split`."""
    return Path(run_dir) / "scores" / f"{name}.{split}.npy"


class Scores:
    """L, shape (M, N), L[i, t] = log p_i(y_t), without holding it: one 1-D array per member, a read-only memmap of
    its score file (or a row of an in-RAM array). Picking members (L[idx], L[:k]) reads nothing; the maths reads L
    `chunk` tokens at a time as float64 blocks (blocks), so it needs O(M x chunk) memory whatever N is."""

    def __init__(self, rows):
        self.rows = list(rows)
        self.shape = (len(self.rows), len(self.rows[0]) if self.rows else 0)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        """L[i]: member i's (N,) float64 log-probs; L[rows] (slice, indices or mask): those members, nothing read;
        L[rows, tokens]: a copy of those tokens in RAM (a sub-sample, such as bench/reproduce.py's cross-fit halves)."""
        if isinstance(key, tuple):
            rows, tokens = key
            return Scores(np.asarray(r)[tokens] for r in self[rows].rows)
        if isinstance(key, (int, np.integer)):
            return Scores([self.rows[key]]).block(0, self.shape[1])[0]
        return Scores(self.rows[i] for i in np.arange(len(self))[key])

    def block(self, start, stop, device=None):
        """L[:, start:stop] as a new float64 array, (M, stop - start); with a torch device, a float64 tensor there
        (moved in the files' float32 and widened on the device: half the bytes over the bus)."""
        wide = device is None or any(np.asarray(r[:0]).dtype == np.float64 for r in self.rows)
        out = np.empty((len(self), stop - start), dtype=np.float64 if wide else np.float32)
        for i, row in enumerate(self.rows):
            out[i] = row[start:stop]
            if isinstance(row.base, mmap.mmap):  # unmap the pages just read (they stay in the page cache): mapped
                row.base.madvise(mmap.MADV_DONTNEED)  # pages count in RSS until evicted, which would reach M x N x 4 B
        return out if device is None else torch.from_numpy(out).to(device).double()

    def blocks(self, chunk=None, device=None):
        """L in consecutive float64 blocks of `chunk` tokens (chunk_tokens by default; the last one may be shorter)."""
        chunk, n = chunk or chunk_tokens, self.shape[1]
        for start in range(0, n, chunk):
            yield self.block(start, min(start + chunk, n), device)

    def mean(self, axis=1):
        """Each member's mean log-prob over tokens, (M,): the only reduction callers need (kept: one read of L)."""
        assert axis in (1, -1), "Scores.mean averages over tokens only"
        if getattr(self, "_sums", None) is None:
            self._sums = sum(b.sum(axis=1) for b in self.blocks())
        return self._sums / self.shape[1]

    def __array__(self, dtype=None, copy=None):
        """All of L in RAM as one (M, N) array: small runs and tests only."""
        return np.stack([np.asarray(r, dtype=dtype or np.float64) for r in self.rows])


def as_scores(L):
    """Scores as they are; an (M, N) array (or nested list) as Scores over its rows, no copy."""
    return L if isinstance(L, Scores) else Scores(np.atleast_2d(np.asarray(L)))


def open_scores(run_dir, names, split):
    """The members' score files as Scores (M, N), memory-mapped: nothing is held in RAM (one NaN check reads them
    chunk by chunk). The files hold float32 log p (float16 also reads). log p, not p: p = e^-300 underflows, log p
    does not. float32 rounds each log p by <= 6e-8 relative (2e-7 nats at log p = -3), and a logsumexp moves by at
    most the largest change among its terms, so a mixture loss computed from them in float64 is off by at most
    6e-8 x max_i |log p_i(t)| per token, ~1e-6 nats: far below the 1e-4 nats reported. float64 files would double
    the disk and the reads for nothing."""
    paths = [score_path(run_dir, n, split) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} score file(s) missing, the first {missing[0]}; "
                                f"run `python eval.py {run_dir} --score` first")
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    shapes = {n: a.shape for n, a in zip(names, arrays)}
    if any(a.ndim != 1 for a in arrays) or len({a.shape for a in arrays}) > 1:
        raise ValueError(f"score files for split {split!r} must be 1-D and of equal length (all "
                         f"members scored on the same positions), got {shapes}; "
                         f"re-run `python eval.py {run_dir} --score`")
    L = Scores(arrays)
    if np.isnan(L.mean()).any():  # a NaN anywhere makes its member's sum NaN; the means are kept, so one read
        raise ValueError(f"NaN in score files for split {split!r}; re-run `python eval.py {run_dir} --score`")
    return L


# --- the backend and the objective --------------------------------------------

def device():
    """Where the maths runs: None for numpy, else the torch device (`backend`)."""
    if backend == "numpy" or (backend == "auto" and not torch.cuda.is_available()):
        return None
    return torch.device("cuda" if backend == "auto" else backend)


def _xp(x):
    return torch if torch.is_tensor(x) else np  # the one switch: numpy and torch share every call made below


def _like(a, x):
    """A numpy array `a` as float64 where block `x` lives (a tensor on its device, or numpy as is)."""
    return torch.as_tensor(a, dtype=torch.float64, device=x.device) if torch.is_tensor(x) else a


def _numpy(x):
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def progress(items, total, what, log=None, every=10.0):
    """The items, and a line `what | i/total (pct) | elapsed | eta` through log() every `every` seconds and after the
    last: the one progress line of every long step (a fit, the val mixtures, greedy, the budget curve)."""
    t0 = last = time.time()
    for i, item in enumerate(items, 1):
        yield item
        now = time.time()
        if log and (now - last >= every or i == total):
            last = now
            log(f"{what} | {i}/{total} ({100 * i / total:5.1f}%) | {now - t0:7.1f} s | eta {(now - t0) / i * (total - i):7.1f} s")


def _shifted_probs(block):
    """p_i(t) / max_j p_j(t) = exp(L[i,t] - c_t), c_t = max_j L[j,t], in place on a float64 block: the logsumexp
    trick. Every column's best member gets 1, so nothing that matters underflows, and any mixture is
    log sum_i w_i p_i(t) = c_t + log (w @ P)_t, a matrix-vector product."""
    xp = _xp(block)
    c = xp.amax(block, 0)  # (c,)
    c = xp.where(xp.isfinite(c), c, 0.0)  # a column every member gives p=0 stays at -inf below
    block -= c
    return xp.exp(block, out=block), c  # (M, c), (c,)


class Probs:
    """L as the maths reads it: blocks (P, c) of `chunk` tokens, P = exp(L - c) (_shifted_probs), on the backend's
    device. Held when M x N x 8 B <= hold_bytes (a fit's hundreds of passes then pay the read, the float64 copy and
    the exp once, and each pass is two matrix-vector products), else made again from L at every pass (O(M x chunk)
    memory). probs[rows] keeps c: any c_t gives the same mixture, c_t + log (w @ P)_t, while the terms that matter do
    not underflow (members within ~700 nats of the best at every token: always, for log-probs of a language model)."""

    def __init__(self, L, chunk=None, hold=False, held=None):
        self.L, self.chunk = as_scores(L), chunk
        self.shape = self.L.shape
        if held is None and hold and self.shape[0] * self.shape[1] * 8 <= hold_bytes:
            held = list(self._make())
        self.held = held

    def _make(self):
        return (_shifted_probs(b) for b in self.L.blocks(self.chunk, device()))

    def __iter__(self):
        return iter(self.held) if self.held is not None else self._make()

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        """The members `rows` (a slice of rows is a view of held blocks; indices copy them)."""
        held = None if self.held is None else [(P[rows], c) for P, c in self.held]
        return Probs(self.L[rows], self.chunk, held=held)

    @property
    def blocks(self):
        return -(-self.shape[1] // (self.chunk or chunk_tokens))


def as_probs(L, chunk=None, hold=False):
    """Probs as they are; scores (Scores, an array) as Probs, held if `hold` and they fit."""
    return L if isinstance(L, Probs) else Probs(L, chunk, hold)


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
        Wd = _like(W, P) if Wd is None else Wd
        with np.errstate(divide="ignore"):
            total = total + (c + _xp(P).log(Wd @ P)).sum(axis=1)  # (Q,)
    return -_numpy(total) / L.shape[1]


def mixture_nll(L, w, chunk=None):
    """Mean over tokens of -log sum_i w_i p_i(t), by logsumexp over members in float64, one chunk of tokens at a
    time (mixture_nlls with one mixture). Members of zero weight are never read."""
    return float(mixture_nlls(L, [w], chunk)[0])


def objective_and_ratios(L, w, chunk=None):
    """f(w) = mean_t -log p_w(t), p_w(t) = sum_i w_i p_i(t), and g_i = mean_t p_i(t) / p_w(t), in one read of L.
    g is minus the gradient of f over w; EM's update is w_i <- w_i g_i, and sum_i w_i g_i = 1."""
    L, f, g = as_probs(L, chunk), 0.0, 0.0
    for P, c in L:  # (M, c), (c,)
        pw = _like(w, P) @ P  # (c,) mixture prob of the true token, / exp(c_t)
        f -= (c + _xp(P).log(pw)).sum()
        g = g + P @ (1.0 / pw)
    return float(f) / L.shape[1], _numpy(g) / L.shape[1]


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


# --- using the weights, and the baselines ------------------------------------

def mixture(w, k):
    """The k heaviest members of one weighting (ties go to the earlier index), weights renormalised to sum 1,
    w_i / sum_{j in top k} w_j: the top K of the full fit, the rule before select (a baseline, bench/k_select.py)."""
    w = np.asarray(w, dtype=np.float64)
    idx = np.argsort(-w, kind="stable")[:k]
    return idx, w[idx] / w[idx].sum()


def digest_of(prior_json):
    """sha256 of a prior.json's content but its own "sha256" key, as JSON text with sorted keys (what is on disk)."""
    text = json.dumps({k: v for k, v in prior_json.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def select(L, k, order=None, method=method, w=None, chunk=None, log=None):
    """The mixture at inference budget k, as every consumer of the prior uses it (eval.py's K table, the student, the
    mixture teacher, tools/): the first k members of greedy forward selection (greedy_select, or `order` when it was
    run already: its every prefix is the greedy one), their weights fit by `method` on those k alone; k >= M: every
    member, the full fit (w, when the caller has it already). -> (member indices in the order picked, weights).
    selection = "top": mixture() of the full fit, the paper's rule.
    Why not the full fit's top k (mixture): the full fit weights a member by what it adds to all the others, so its
    top k are not the k that work best alone together, and a near-tie between two weights swaps a member. On fitness,
    cross-fitted (bench/k_select.py, BENCHMARKS 1f), greedy's k with their weights refit were 0.005-0.011 nats better
    at K = 2-8 on both seeds (K = 1: as good or better), and at K = M/2 within 0.002 of the best rule."""
    if selection == "top" or k >= len(L):  # the full fit's: reads L only when w is not given
        w = FITS[method](as_probs(L, chunk, hold=True))[0] if w is None else w
        return (np.arange(len(L)), w) if k >= len(L) else mixture(w, k)  # "top": the paper's rule, one switch away
    L = as_probs(L, chunk, hold=True)
    idx = np.asarray(order[:k] if order is not None and len(order) >= k else greedy_select(L, k, log=log))
    return idx, FITS[method](L[idx])[0]


def members_at(prior_json, k, run_dir=None):
    """The mixture at budget k of a prior.json dict, as [(name, weight), ...] in the order picked: its per_k entry
    (select's, written by fit_prior), K past the population all of it. A K that prior.json does not hold is select()
    on the run's fitness scores (run_dir, eval.py's score files): the same rule, so the same answer it would store.
    This is the one reader of a mixture from prior.json."""
    names, per_k = prior_json["members"], prior_json["per_k"]
    k = min(k, len(names))
    if str(k) in per_k:
        return list(zip(per_k[str(k)]["members"], per_k[str(k)]["weights"]))
    if run_dir is None:
        raise ValueError(f"prior.json holds the mixtures at K = {', '.join(per_k)}; K = {k} is chosen from the run's "
                         f"fitness scores: pass its run folder")
    idx, w = select(open_scores(run_dir, names, split), k, method=prior_json["method"])
    return [(names[i], float(x)) for i, x in zip(idx, w)]


def uniform_last(M, k):
    """The last k members in training order (the newest), to be averaged uniformly."""
    return np.arange(M - k, M)


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
            xp = _xp(P)
            if not chosen:
                totals.append(xp.zeros_like(P[0]))
            else:
                totals[j] += P[chosen[-1]]  # the chosen members' sum, added in the order picked
            size = P.shape[0] * P.shape[1]
            buf = xp.empty_like(P).reshape(-1) if buf is None or len(buf) < size else buf
            x = buf[:size].reshape(P.shape)
            with np.errstate(divide="ignore"):
                score = score + xp.log(xp.add(P, totals[j], out=x), out=x).sum(axis=1)
        rest = np.array([i for i in range(M) if i not in chosen])
        chosen.append(int(rest[np.argmax(_numpy(score)[rest])]))  # argmax: first candidate wins a tie
    return np.array(chosen)


def ks_for(M):
    """Inference budgets to report: K = 1, 2, 4, ... below M, and M itself."""
    if M < 1:
        raise ValueError("need at least one member")
    ks = [1 << i for i in range(int(M).bit_length()) if 1 << i < M]
    return ks + [M]


def fit_line(what, L, info):
    """One line for a fit: passes, objective, certificate (EM's), seconds."""
    gap = f" | gap {info['gap']:.1e}" if "gap" in info else ""
    return (f"{what} | {L.shape[0]} members x {L.shape[1]:,} tokens | {info['iterations']:4d} passes | "
            f"objective {info['objective']:.6f}{gap} | {info['seconds']:7.1f} s")


def fit_prior(names, L_fitness, method=method, compare=False, log=None):
    """Everything prior.json holds: the fitted weights, select's mixture for each K in ks_for(M) (per_k), the
    uniform-over-last-K and greedy (its members, uniform) baselines at the same K (same layout, so eval.py can score all
    of them on val alike), and under "compare" each fit run: `method`'s, or with compare=True every fit in FITS
    (EM vs AdamW: 300 more passes). Fit on the fitness split only; log() gets a line per fit and greedy's progress."""
    names, L = list(names), as_probs(L_fitness, hold=True)
    M = len(names)
    assert len(L) == M, f"{M} names but L has {len(L)} rows"
    if method not in FITS:
        raise ValueError(f"method must be one of {list(FITS)}, got {method!r}")
    fits = {}
    for m in FITS if compare else [method]:
        fits[m] = FITS[m](L)
        if log:
            log(fit_line(f"prior fit | {m}", L, fits[m][1]))
    w = fits[method][0]
    ks = ks_for(M)
    greedy = greedy_select(L, ks[-2] if len(ks) > 1 else 1, log=log)  # at K = M greedy is every member
    uniform = lambda idx: (idx, np.full(len(idx), 1.0 / len(idx)))
    per_k = [select(L, k, greedy, method, w) for k in ks]
    if log and selection == "greedy":
        log(f"prior | {method} refit on greedy's first K members, K = {', '.join(map(str, ks[:-1]))}")
    tables = {"per_k": per_k, "uniform_last": [uniform(uniform_last(M, k)) for k in ks],
              "greedy": [uniform(greedy[:k] if k < M else np.arange(k)) for k in ks]}
    W = np.zeros((3 * len(ks), M))  # every entry's weights over all members, one row each: one pass for their losses
    for q, (idx, wk) in enumerate(x for t in tables.values() for x in t):
        W[q, idx] = wk
    nll = iter(mixture_nlls(L, W))
    entry = lambda idx, wk: {"members": [names[i] for i in idx], "weights": [float(x) for x in wk],
                             "fitness_nll": float(next(nll))}
    entries = {t: {str(k): entry(*x) for k, x in zip(ks, rows)} for t, rows in tables.items()}
    return {
        "method": method,
        "selection": selection,
        "split": split,
        "num_tokens": int(L.shape[1]),
        "members": names,
        "objective_fitness": fits[method][1]["objective"],
        "weights": {n: float(x) for n, x in zip(names, w)},
        "per_k": entries["per_k"],
        "baselines": {"uniform_last": entries["uniform_last"], "greedy": entries["greedy"]},
        "compare": {m: {key: info[key] for key in ("objective", "seconds", "iterations")}
                    for m, (_, info) in fits.items()},
    }
