"""
scores.py: what the learned prior reads, and where its maths runs. A member's score on a split is its log-probability
of the true token at every scored position, L[i, t] = log p_i(y_t | y_<t):

- the window scorer: every token of a split once, in windows of seq_len + 1 tokens (eval_windows, score_windows);
  train.py's eval, eval.py's score files and the mixture teacher all score this way;
- the score files: RUN/scores/{name}.{split}.npy (float32, a sha256 beside each), opened memory-mapped as one (M, N)
  Scores without holding it in RAM: 480 members x 10M tokens would be ~40 GB per float64 copy;
- Probs: L as prior.py's fits read it, blocks of exp(L - max) of chunk_tokens tokens in float64, held in memory when
  they fit (hold_bytes), else made again at every pass;
- the backend: numpy, or torch tensors on a device (a GPU: the same maths on its blocks, equal to rounding, ~1e-12
  nats); a Scores carries its device, so every fit of it runs there.
"""
import mmap
import time
from pathlib import Path

import numpy as np
import torch

import runtime
import store

# -----------------------------------------------------------------------------
chunk_tokens = 2**16     # tokens per float64 block of the maths: ~M x 0.5 MiB per block (480 members: 240 MiB)
hold_bytes = 2**31       # a fit holds exp(L) (float64) when it fits in this, so its passes skip the read and the exp
# -----------------------------------------------------------------------------


# --- the window scorer ---------------------------------------------------------
def eval_windows(tokens, seq_len, max_tokens=0):
    """Non-overlapping windows of T+1 tokens over a split (stride T): every token after the first is scored once."""
    n = len(tokens) if not max_tokens else min(len(tokens), max_tokens + 1)
    return [(s, min(s + seq_len + 1, n)) for s in range(0, n - 1, seq_len)]


def window_batches(tokens, windows, batch_size, device):
    """Consecutive windows of equal length, batch_size at a time, as (B, T+1) int64 rows; order is kept."""
    i = 0
    while i < len(windows):
        n, j = windows[i][1] - windows[i][0], i
        while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == n:
            j += 1
        yield torch.from_numpy(np.stack([tokens[s:e] for s, e in windows[i:j]]).astype(np.int64)).to(device)
        i = j


@torch.no_grad()
def score_windows(model, tokens, windows, device, batch_size=16):
    """log p(y_t | y_<t) of every scored token of `windows` (eval_windows), in window order: (N,) float32 on the CPU."""
    was_training, out = model.training, []
    model.eval()
    for x in window_batches(tokens, windows, batch_size, device):
        with runtime.autocast(device):
            out.append(model(x[:, :-1], x[:, 1:]).float().flatten().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# --- the score files -----------------------------------------------------------
def score_path(run_dir, name, split):
    """Where eval.py writes member `name`'s log-probs of the true token on `split`."""
    return Path(run_dir) / "scores" / f"{name}.{split}.npy"


def record_path(run_dir, name):
    """RUN/scores/{name}.json, eval.py's record of member `name`'s scores: the member file they came from (its
    sha256) and each split's score digest, so a score file copied under another member's name (with the sha256
    beside it) is not taken for this member's."""
    return Path(run_dir) / "scores" / f"{name}.json"


def read_record(run_dir, name):
    """The record of `name`'s scores (record_path), or {} without a readable one."""
    try:
        record = store.load_json(record_path(run_dir, name))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def cached(run_dir, name, split, n=None):
    """-> (True, None) when member `name`'s score file of `split` is complete (save_array writes the digest beside
    it second, so a killed write never counts), matches that digest, is the one eval.py recorded for this member,
    and (n given) holds n scores; else (False, why)."""
    path = score_path(run_dir, name, split)
    intact = store.array_intact(path)
    if intact is None:
        return False, "is missing or unfinished"
    if not intact:
        return False, f"does not match its sha256 ({path.name}.sha256): it changed on disk"
    if read_record(run_dir, name).get("scores", {}).get(split) != Path(f"{path}.sha256").read_text().strip():
        return False, (f"is not the one recorded for member {name} in {record_path(run_dir, name)} (copied from "
                       f"another member, or scored before records held the scores' digests)")
    if n is not None and np.load(path, mmap_mode="r").shape != (n,):
        return False, f"holds another number of scores than the {n:,} of this split"
    return True, None


class Scores:
    """L, shape (M, N), L[i, t] = log p_i(y_t), without holding it: one 1-D array per member, a read-only memmap of
    its score file (or a row of an in-RAM array). Picking members (L[idx], L[:k]) reads nothing; the maths reads L
    `chunk` tokens at a time as float64 blocks (blocks), so it needs O(M x chunk) memory whatever N is. `device`: where
    the blocks go (None: numpy; a torch device: float64 tensors there)."""

    def __init__(self, rows, device=None):
        self.rows, self.device = list(rows), device
        self.shape = (len(self.rows), len(self.rows[0]) if self.rows else 0)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        """L[i]: member i's (N,) float64 log-probs; L[rows] (slice, indices or mask): those members, nothing read;
        L[rows, tokens]: a copy of those tokens in RAM (a sub-sample, such as bench/reproduce.py's cross-fit halves)."""
        if isinstance(key, tuple):
            rows, tokens = key
            return Scores((np.asarray(r)[tokens] for r in self[rows].rows), self.device)
        if isinstance(key, (int, np.integer)):
            return Scores([self.rows[key]]).block(0, self.shape[1])[0]
        return Scores((self.rows[i] for i in np.arange(len(self))[key]), self.device)

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

    def blocks(self, chunk=None):
        """L in consecutive float64 blocks of `chunk` tokens (chunk_tokens by default; the last one may be shorter)."""
        chunk, n = chunk or chunk_tokens, self.shape[1]
        for start in range(0, n, chunk):
            yield self.block(start, min(start + chunk, n), self.device)

    def mean(self, axis=1):
        """Each member's mean log-prob over tokens, (M,): the only reduction callers need (kept: one read of L)."""
        assert axis in (1, -1), "Scores.mean averages over tokens only"
        if getattr(self, "_sums", None) is None:
            self._sums = sum(b.sum(axis=1) for b in Scores(self.rows).blocks())  # numpy: a few sums
        return self._sums / self.shape[1]

    def __array__(self, dtype=None, copy=None):
        """All of L in RAM as one (M, N) array: small runs and tests only."""
        return np.stack([np.asarray(r, dtype=dtype or np.float64) for r in self.rows])


def as_scores(L):
    """Scores as they are; an (M, N) array (or nested list) as Scores over its rows (numpy), no copy."""
    return L if isinstance(L, Scores) else Scores(np.atleast_2d(np.asarray(L)))


def open_scores(run_dir, names, split, device=None, check=False):
    """The members' score files as Scores (M, N), memory-mapped: nothing is held in RAM (one NaN check reads them
    chunk by chunk). The files hold float32 log p (float16 also reads). log p, not p: p = e^-300 underflows, log p
    does not. float32 rounds each log p by <= 6e-8 relative (2e-7 nats at log p = -3), and a logsumexp moves by at
    most the largest change among its terms, so a mixture loss computed from them in float64 is off by at most
    6e-8 x max_i |log p_i(t)| per token, ~1e-6 nats: far below the 1e-4 nats reported. float64 files would double
    the disk and the reads for nothing. check=True (a reader that did not just score them: the student, tools/):
    each file is also hashed against its digest and its record (cached), so a changed or copied one is refused."""
    paths = [score_path(run_dir, n, split) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} score file(s) missing, the first {missing[0]}; "
                                f"run `python eval.py {run_dir} --score` first")
    for name, path in zip(names, paths) if check else ():
        ok, why = cached(run_dir, name, split)
        if not ok:
            raise ValueError(f"score file {path} {why}; re-run `python eval.py {run_dir}`, which scores it again")
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    shapes = {n: a.shape for n, a in zip(names, arrays)}
    if any(a.ndim != 1 for a in arrays) or len({a.shape for a in arrays}) > 1:
        raise ValueError(f"score files for split {split!r} must be 1-D and of equal length (all "
                         f"members scored on the same positions), got {shapes}; "
                         f"re-run `python eval.py {run_dir} --score`")
    L = Scores(arrays, device)
    if np.isnan(L.mean()).any():  # a NaN anywhere makes its member's sum NaN; the means are kept, so one read
        raise ValueError(f"NaN in score files for split {split!r}; re-run `python eval.py {run_dir} --score`")
    return L


# --- the backend: numpy, or torch on a device ----------------------------------------
def backend_device(kind="auto", device=None):
    """Where the maths runs: None for numpy, else a torch device. auto: torch on `device` when it is CUDA (eval.py's
    own device), numpy otherwise."""
    if kind == "numpy" or (kind == "auto" and (device is None or torch.device(device).type != "cuda")):
        return None
    return torch.device(device if kind == "auto" else kind)


def xp(x):
    """numpy or torch, whichever block x is: the one switch, as numpy and torch share every call made on blocks."""
    return torch if torch.is_tensor(x) else np


def like(a, x):
    """A numpy array `a` as float64 where block `x` lives (a tensor on its device, or numpy as is)."""
    return torch.as_tensor(a, dtype=torch.float64, device=x.device) if torch.is_tensor(x) else a


def to_numpy(x):
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


def shifted_probs(block):
    """p_i(t) / max_j p_j(t) = exp(L[i,t] - c_t), c_t = max_j L[j,t], in place on a float64 block: the logsumexp
    trick. Every column's best member gets 1, so nothing that matters underflows, and any mixture is
    log sum_i w_i p_i(t) = c_t + log (w @ P)_t, a matrix-vector product."""
    x = xp(block)
    c = x.amax(block, 0)  # (c,)
    c = x.where(x.isfinite(c), c, 0.0)  # a column every member gives p=0 stays at -inf below
    block -= c
    return x.exp(block, out=block), c  # (M, c), (c,)


class Probs:
    """L as the maths reads it: blocks (P, c) of `chunk` tokens, P = exp(L - c) (shifted_probs), on L's device.
    Held when M x N x 8 B <= hold_bytes (a fit's hundreds of passes then pay the read, the float64 copy and
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
        return (shifted_probs(b) for b in self.L.blocks(self.chunk))

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
