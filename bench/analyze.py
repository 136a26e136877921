"""
bench/analyze.py: does chain distillation make members better, or only more alike? And is a teacher handing on
memorised text? Arithmetic on the score arrays eval.py caches, plus (if asked) a few members scored on train.

    python eval.py runs/RUN --score                                # first: RUN/scores/{name}.{fitness,val}.npy
    python bench/analyze.py runs/RUN [runs/RUN2 ...]                # member tables + one comparison table
    python bench/analyze.py runs/A runs/B --train_tokens 20000      # + train vs val NLL, last snapshot of each track
    python bench/analyze.py runs/A --last_k 4                       # + diversity gain of the last 4 members
    python bench/analyze.py runs/A --budgets 64 128 256             # only: where the curve bends, by budget
    python bench/analyze.py runs/A --fitness_vs_val data/other      # + does fitness predict val across members
                                                                    #   (and data/other's fitness split: another text)
    python bench/analyze.py runs/A --dropout_gap 32000              # only: val NLL with the residual dropout off
                                                                    #   (how every score is taken) and on

Everything printed is markdown, to paste into BENCHMARKS.md. With L[i, t] = log p_i(y_t | y_<t) (member i, val
token t), NLL_i = mean_t -L[i, t] and weights w on the simplex (uniform unless said otherwise):
    mixture NLL(w)     = mean_t -log sum_i w_i exp(L[i, t])                              (prior.mixture_nll)
    diversity gain(w)  = sum_i w_i NLL_i - mixture NLL(w)
                       = mean_t [ log sum_i w_i p_i(t) - sum_i w_i log p_i(t) ]  >= 0     (Jensen: log is concave)
  so  mixture NLL = weighted mean member NLL - diversity gain: a population gets better because its members get
  better, or because they disagree more. The gain is 0 iff every member gives every true token the same prob.
    consecutive corr(i) = Pearson_t( L[i, t], L[prev(i), t] ),  prev(i) = i's track's snapshot at cycle(i) - 1
  (for a distilled member that is its teacher), averaged over distilled and over undistilled members apart.
    train gap(i)        = val NLL_i - train NLL_i,  train NLL on the first N tokens of the train split (eval_windows)
  A member that has memorised its training text scores it far better than val; its soft targets on training
  windows are then close to the one-hot label, so its student learns little from it beyond the label.
    dropout gap(i)      = val NLL_i, dropout off - val NLL_i, dropout on (train mode; mean of 3 draws)
  Every score is taken with dropout off (eval mode). A member trained with residual dropout that scores far better
  with it on has come to depend on the noise: its eval-mode score is not the model it trained (BENCHMARKS.md 1j).

The prior column is EM on the fitness split (prior.fit_em); val is only reported. Nothing is written except the
score caches RUN/analysis/{name}.{split}-{sha8}.npy: not RUN/scores/, since eval.py only ever reads fitness and
val there but tests and tools expect exactly two files per member in it.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prior  # noqa: E402
import scores  # noqa: E402
import store  # noqa: E402
from config import UserError  # noqa: E402
from scores import eval_windows  # noqa: E402
from store import load_member, load_split, read_manifest, save_array  # noqa: E402

# -----------------------------------------------------------------------------------------------------
train_tokens = 0     # --train_tokens: tokens of the train split scored per member (0 = skip that table)
last_k = 0           # --last_k: also the diversity gain of the last k members (0 = skip)
# -----------------------------------------------------------------------------------------------------


# --- the maths on (M, N) arrays ------------------------------------------------------------------------

def pearson(a, b):
    """Pearson correlation of two 1-D arrays; nan when either is constant (no spread, nothing to correlate)."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def previous_snapshot(rows):
    """{i: j} where member j is the snapshot of member i's track one cycle earlier (rows: manifest order)."""
    where = {(r["track"], r["cycle"]): j for j, r in enumerate(rows)}
    return {i: where[(r["track"], r["cycle"] - 1)] for i, r in enumerate(rows) if (r["track"], r["cycle"] - 1) in where}


def consecutive_correlation(L, rows):
    """Correlation of each member's per-token log-probs with its predecessor's -> dict(per_member={i: (j, r)},
    distilled=mean r, undistilled=mean r, and the counts behind each mean; nan where no member qualifies)."""
    per = {i: (j, pearson(L[i], L[j])) for i, j in previous_snapshot(rows).items()}
    out = dict(per_member=per)
    for key, want in (("distilled", True), ("undistilled", False)):
        rs = [r for i, (_, r) in per.items() if (rows[i].get("teacher") is not None) == want]
        out[key], out[f"n_{key}"] = (float(np.mean(rs)) if rs else float("nan")), len(rs)
    return out


def diversity_gain(L, w=None, k=None):
    """sum_i w_i NLL_i - mixture NLL(w) (module docstring), >= 0. w: weights over L's rows (uniform if None);
    k: only the last k rows (the newest members), with their weights renormalised."""
    L = np.asarray(L, dtype=np.float64)
    w = np.full(len(L), 1.0 / len(L)) if w is None else np.asarray(w, dtype=np.float64)
    if k:
        L, w = L[-k:], w[-k:]
    w = w / w.sum()
    return float(w @ -L.mean(axis=1) - prior.mixture_nll(L, w))


# --- one run ---------------------------------------------------------------------------------------------

def load_run(run_dir):
    """Manifest rows (training order), names and the cached (M, N) fitness and val log-prob arrays."""
    rows = read_manifest(run_dir)
    names = [r["name"] for r in rows]
    return rows, names, scores.open_scores(run_dir, names, "fitness"), scores.open_scores(run_dir, names, "val")


def member_table(run_dir):
    """One dict per member: name, track, cycle, teacher (None when undistilled), distilled, val and fitness NLL,
    and the val correlation with its predecessor (nan for a track's first snapshot)."""
    rows, names, L_fit, L_val = load_run(run_dir)
    corr = consecutive_correlation(L_val, rows)["per_member"]
    return [dict(name=n, track=r["track"], cycle=r["cycle"], teacher=r.get("teacher"),
                 distilled=r.get("teacher") is not None, val=float(-L_val[i].mean()), fitness=float(-L_fit[i].mean()),
                 corr_prev=corr[i][1] if i in corr else float("nan")) for i, (n, r) in enumerate(zip(names, rows))]


def run_summary(run_dir, k=last_k):
    """The comparison row of one run (see compare)."""
    rows, names, L_fit, L_val = load_run(run_dir)
    M = len(names)
    nll_val, nll_fit = -L_val.mean(axis=1), -L_fit.mean(axis=1)
    distilled = np.array([r.get("teacher") is not None for r in rows])
    mean_of = lambda mask: float(nll_val[mask].mean()) if mask.any() else float("nan")
    corr = consecutive_correlation(L_val, rows)
    w_prior, _ = prior.fit_em(L_fit)  # fit on fitness only: val stays the test set
    out = dict(run=Path(run_dir).name, members=M, n_distilled=int(distilled.sum()), mean_val=float(nll_val.mean()),
               best_val=float(nll_val[np.argmin(nll_fit)]),  # the member best on fitness, as eval.py picks it
               distilled_val=mean_of(distilled), undistilled_val=mean_of(~distilled),
               corr_distilled=corr["distilled"], corr_undistilled=corr["undistilled"],
               gain=diversity_gain(L_val), uniform_val=prior.mixture_nll(L_val, np.full(M, 1.0 / M)),
               prior_val=prior.mixture_nll(L_val, w_prior))
    if k:
        out["gain_last_k"] = diversity_gain(L_val, k=min(k, M))
    return out


def by_budget(run_dir, budgets):
    """Where a population's curve bends: for the members that existed at each budget (manifest budget_epochs <= b),
    the prior (EM on their fitness) split as  mixture NLL(w) = sum_i w_i NLL_i - diversity gain(w)  on val, beside the
    member best on fitness and the mean of the newest quarter -> one dict per budget."""
    rows, names, L_fit, L_val = load_run(run_dir)
    out = []
    for b in budgets:
        idx = [i for i, r in enumerate(rows) if r["budget_epochs"] <= b]
        F, V = np.asarray(L_fit[idx]), np.asarray(L_val[idx], dtype=np.float64)
        w, _ = prior.fit_em(F)
        nll = -V.mean(axis=1)
        out.append(dict(budget=b, members=len(idx), prior_val=prior.mixture_nll(V, w), weighted_member=float(w @ nll),
                        gain=diversity_gain(V, w), best_on_fitness=float(nll[np.argmax(F.mean(axis=1))]),
                        newest_quarter=float(nll[-max(1, len(idx) // 4):].mean())))
    return out


def last_of_each_track(rows):
    """Names of each track's last snapshot (highest cycle), in track order."""
    last = {}
    for r in rows:
        if r["track"] not in last or r["cycle"] > last[r["track"]]["cycle"]:
            last[r["track"]] = r
    return [last[t]["name"] for t in sorted(last)]


def score_members(run_dir, names, data_dir, split, max_tokens, device="cpu"):
    """Per-token log-probs of members `names` on the first max_tokens of `split` in `data_dir` (eval_windows windows,
    one model in memory at a time), cached in RUN/analysis/{name}.{split}-{sha8}.npy -> (M, N) float64."""
    import eval as ev  # lazy: importing it pulls in torch.distributed, and the maths above needs none of it
    run_dir = Path(run_dir)
    seq_len = json.loads((run_dir / "config.json").read_text())["config"]["seq_len"]
    tokens, meta = load_split(data_dir, split)
    windows = dict(tokens=tokens, windows=eval_windows(tokens, seq_len, max_tokens))
    n = sum(e - s - 1 for s, e in windows["windows"])
    rows = {r["name"]: r for r in read_manifest(run_dir)}
    (run_dir / "analysis").mkdir(exist_ok=True)
    out = []
    for name in names:
        path = run_dir / "analysis" / f"{name}.{split}-{meta['sha256'][:8]}.npy"
        if store.array_intact(path) and np.load(path, mmap_mode="r").shape == (n,):  # same data (sha in the name),
            # same length: the same windows
            out.append(np.load(path))
            continue
        model, _ = load_member(run_dir / rows[name]["path"], device, expected=rows[name])
        out.append(ev.score_split(model, windows, torch.device(device)))
        save_array(out[-1], path)
        del model
    return np.stack(out).astype(np.float64)


def train_vs_heldout(run_dir, names, max_tokens, device="cpu"):
    """Score members `names` on the first max_tokens of the train split -> one dict per member: name, teacher,
    train, val and gap = val - train NLL."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    data_dir = record["config"]["data_dir"]
    tokens, meta = load_split(data_dir, "train")
    if record.get("data", {}).get("train", meta["sha256"]) != meta["sha256"]:
        raise ValueError(f"{data_dir}/train.bin is not the data {run_dir} was trained on (sha256 in config.json)")
    L_train = score_members(run_dir, names, data_dir, "train", max_tokens, device)
    L_val = scores.open_scores(run_dir, names, "val")
    rows = {r["name"]: r for r in read_manifest(run_dir)}
    out = []
    for i, name in enumerate(names):
        out.append(dict(name=name, teacher=rows[name].get("teacher"), tokens=L_train.shape[1],
                        train=float(-L_train[i].mean()), val=float(-L_val[i].mean())))
        out[-1]["gap"] = out[-1]["val"] - out[-1]["train"]
    return out


def spearman(a, b):
    """Rank correlation (no ties expected among members' mean losses)."""
    rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)
    return pearson(rank(np.asarray(a)), rank(np.asarray(b)))


def fitness_predicts_val(run_dir, other_data_dir=None, other_tokens=50_000):
    """Across a run's members: how well the fitness NLL predicts the val NLL (Pearson, Spearman, the val rank of the
    member that is best on fitness) and the val loss of the prior fit on it, for the run's own fitness split and, if
    given, for the fitness split of another data folder (for example whole documents: a different text)."""
    rows = read_manifest(run_dir)
    names = [r["name"] for r in rows]
    V = scores.open_scores(run_dir, names, "val")
    val = -V.mean(axis=1)
    fits = {"fitness": scores.open_scores(run_dir, names, "fitness")}
    if other_data_dir:
        fits[f"fitness of {Path(other_data_dir).name}"] = score_members(run_dir, names, other_data_dir, "fitness", other_tokens)
    val_rank = np.argsort(np.argsort(val))
    out = []
    for k, L in fits.items():
        f = -L.mean(axis=1)
        out.append(dict(run=Path(run_dir).name, split=k, members=len(names), pearson=pearson(f, val),
                        spearman=spearman(f, val), rank_of_fitness_best=int(val_rank[np.argmin(f)]) + 1,
                        mean_gap=float((f - val).mean()), prior_val=prior.mixture_nll(V, prior.fit_em(L)[0])))
    return out


# --- tables ------------------------------------------------------------------------------------------------

def fmt(x, digits=4):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def markdown(header, body):
    """A markdown table; a column of numbers (and "–") is right-aligned, so the decimals line up when rendered."""
    number = lambda c: re.fullmatch(r"[-–+0-9.,() ]+", str(c)) is not None
    align = ["---:" if body and all(number(row[j]) for row in body) else "---" for j in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def member_markdown(run_dir):
    return markdown(["member", "track", "cycle", "teacher", "val NLL", "fitness NLL", "corr prev (val)"],
                    [[m["name"], m["track"], m["cycle"], m["teacher"] or "–", fmt(m["val"]), fmt(m["fitness"]),
                      fmt(m["corr_prev"])] for m in member_table(run_dir)])


class DropoutOn(torch.nn.Module):
    """A block's residual dropout that stays on in eval mode, so the member is scored by eval's own scorer with it."""
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return torch.nn.functional.dropout(x, self.p, training=True)


def dropout_gap(run_dir, names, max_tokens, draws=3, device="cpu"):
    """Val NLL of members `names` on the first max_tokens of val: with every block's residual dropout off (eval mode,
    as every score is taken), on (as they trained) and on in the first block only; "on" is the mean over `draws`
    dropout draws (seeds 0, 1, ...) -> one dict per member: name, off, on, first, gap = off - on."""
    import eval as ev  # lazy, as in score_members
    run, dev = ev.open_run(run_dir, max_tokens), torch.device(device)
    out = []
    for name in names:
        model = ev.load(run, name, dev)

        def nll(dropping):  # the blocks whose dropout is on
            kept = [block.drop for block in dropping]
            for block in dropping:
                block.drop = DropoutOn(block.drop.p)
            means = []
            for draw in range(draws if dropping else 1):
                torch.manual_seed(draw)
                means.append(-ev.score_split(model, run["val"], dev, size=16).astype(np.float64).mean())
            for block, drop in zip(dropping, kept):
                block.drop = drop
            return float(np.mean(means))
        out.append(dict(name=name, off=nll([]), on=nll(list(model.blocks)), first=nll(list(model.blocks)[:1])))
        out[-1]["gap"] = out[-1]["off"] - out[-1]["on"]
    return out


def compare(run_dirs, train_tokens=train_tokens, k=last_k, other=None):
    """One markdown table, a row per run (val NLL in nats/token; corr = consecutive correlation; gain = diversity
    gain, uniform weights); with other (a data folder, or "" for none) whether fitness predicts val across members;
    then, with train_tokens > 0, train vs val NLL of each track's last snapshot."""
    runs = [run_summary(d, k) for d in run_dirs]
    header = ["run", "members (distilled)", "mean member val", "best val (by fitness)", "distilled val",
              "undistilled val", "corr distilled", "corr undistilled", "gain all", *([f"gain last {k}"] if k else []),
              "uniform val", "prior val"]
    text = markdown(header, [[s["run"], f"{s['members']} ({s['n_distilled']})", fmt(s["mean_val"]), fmt(s["best_val"]),
                              fmt(s["distilled_val"]), fmt(s["undistilled_val"]), fmt(s["corr_distilled"]),
                              fmt(s["corr_undistilled"]), fmt(s["gain"]), *([fmt(s["gain_last_k"])] if k else []),
                              fmt(s["uniform_val"]), fmt(s["prior_val"])] for s in runs])
    if other is not None:
        body = [[r["run"], r["split"], r["members"], fmt(r["pearson"], 3), fmt(r["spearman"], 3),
                 f"{r['rank_of_fitness_best']} of {r['members']}", fmt(r["mean_gap"]), fmt(r["prior_val"])]
                for d in run_dirs for r in fitness_predicts_val(d, other or None)]
        text += "\n\n" + markdown(["run", "selection split", "members", "Pearson (fitness, val)", "Spearman",
                                    "val rank of the fitness-best member", "mean fitness - val",
                                    "val of the prior fit on it"], body)
    if train_tokens > 0:
        body = []
        for d in run_dirs:
            names = last_of_each_track(read_manifest(d))
            body += [[Path(d).name, r["name"], r["teacher"] or "–", f"{r['tokens']:,}", fmt(r["train"]), fmt(r["val"]),
                      fmt(r["gap"])] for r in train_vs_heldout(d, names, train_tokens)]
        text += "\n\n" + markdown(["run", "member", "teacher", "train tokens", "train NLL", "val NLL", "gap (val - train)"],
                                  body)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders scored by `python eval.py RUN --score`")
    p.add_argument("--train_tokens", type=int, default=train_tokens, help="train tokens to score per member (0 = skip)")
    p.add_argument("--last_k", type=int, default=last_k, help="also the diversity gain of the last K members")
    p.add_argument("--fitness_vs_val", nargs="?", const="", default=None, metavar="DATA_DIR",
                   help="also: does fitness predict val across members (and DATA_DIR's fitness split, if given)")
    p.add_argument("--dropout_gap", type=int, default=0, metavar="TOKENS", help="only: each track's last snapshot's "
                   "val NLL on the first TOKENS val tokens with the residual dropout off, on, and on in block 0 only")
    p.add_argument("--budgets", type=float, nargs="+", help="only: each run's population at these epoch budgets, "
                   "the prior's val split into weighted member NLL and diversity gain (where the curve bends)")
    args = p.parse_args(argv)
    try:
        if args.dropout_gap:
            body = [[Path(d).name, r["name"], fmt(r["off"]), fmt(r["on"]), fmt(r["first"]), fmt(r["gap"])] for d in args.runs
                    for r in dropout_gap(d, last_of_each_track(read_manifest(d)), args.dropout_gap)]
            print(markdown(["run", "member", "val, dropout off (as scored)", "dropout on (as trained)",
                            "on in block 0 only", "gap (off - on)"], body))
            return
        if args.budgets:
            for d in args.runs:
                body = [[fmt(r["budget"], 0), r["members"], *(fmt(r[k]) for k in ("prior_val", "weighted_member", "gain",
                         "best_on_fitness", "newest_quarter"))] for r in by_budget(d, args.budgets)]
                print(f"### {d}\n\n" + markdown(["budget", "members", "val, prior", "prior-weighted member val",
                                                   "diversity gain", "member best on fitness", "newest quarter"], body))
            return
        for d in args.runs:
            print(f"### {d}\n\n{member_markdown(d)}\n")
        print(compare(args.runs, args.train_tokens, args.last_k, args.fitness_vs_val))
    except (FileNotFoundError, ValueError, UserError) as e:  # missing scores name the eval.py command to run
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
