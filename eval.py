"""
eval.py: score every member of a run once, fit the learned prior, and report.

    python eval.py runs/quickstart                        # CPU or 1 GPU (auto): score, fit the prior, report
    python eval.py runs/RUN --method=adamw                # the prior by the reference's AdamW fit instead of EM
    python eval.py runs/RUN --score                       # score only (resumes: scored members are skipped)
    python eval.py runs/A runs/B runs/C --out=runs/cmp    # one comparison table (+ runs/cmp/compare.json)
    torchrun --standalone --nproc_per_node=8 eval.py runs/RUN --score            # members split over 8 GPUs
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 eval.py runs/RUN --score              # 40 GPUs
    python eval.py runs/RUN                               # then, on one process: prior and reports

Scoring writes RUN/scores/{name}.{split}.npy = log p_i(y_t | y_<t) of the true token at every scored position
of fitness and val (scores.eval_windows windows), with its sha256 beside it (a file that no longer matches is scored
again) and, in RUN/scores/{name}.json, the sha256 of the member file it came from (a member retrained since is
scored again): member i on rank i % world, one model in memory at a time.
Everything after that is arithmetic on the cached (M, N) arrays L (scores.py, prior.py), p_i(t) = exp(L[i, t]):
    ensemble loss(w) = mean_t -log sum_i w_i p_i(t)      (probability averaging, prior.mixture_nll)
for the prior's K members (members_at: prior.select's K, weights refit), uniform over all, uniform over the last K
and greedy's K averaged uniformly. Weights, K and every selection come from the fitness split only; val is the test
set and is only ever reported. RUN/prior.json (the prior's weights and per-K selections) is written and read here
only (write_prior, read_prior, members_at), and kept while it is current for the run's members. What needs the
members' full distributions (K models at once) is in tools/, which call this file: downstream.py, sample.py.
"""
import hashlib
import importlib.util
import json
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import config
import prior
import runtime
import scores
import store
from config import UserError, current_config


# -----------------------------------------------------------------------------
@dataclass
class EvalConfig:
    runs: tuple = ()                 # run folders written by train.py, q0.py, student.py or variants.py
    score: bool = False              # score the members only (no prior, no reports)
    exclude: str = ""                # comma-separated members to leave out (an unreadable one, say)
    device: str = "auto"             # auto (cuda > mps > cpu) | cuda | mps | cpu
    dtype: str = "float32"           # new score files: float32 | float16 (half the disk, ~1e-3 relative rounding)
    eval_tokens: int = 0             # tokens scored per split (0 = the whole split); a file of another length is rescored
    batch_size: int = 16             # windows (or choices) per forward pass
    method: str = "auto"             # em | adamw: prior.json refit if it holds the other; auto: a current one as is, else em
    compare_adamw: bool = False      # also fit the prior by AdamW (300 passes) and report it beside EM (prior.json "compare")
    backend: str = "auto"            # the prior's maths: auto (torch on the device when it is CUDA, else numpy) | numpy | cuda | cpu
    out: str = ""                    # folder for compare.json and compare.png when several runs are given ("": the first run's)
    status: bool = False             # only say where each run is (per track: step, cycle, members, last val, eta); reads
                                     # the run folder only, writes nothing: works while it trains
    ARGS = "runs"                    # not a key: the plain arguments are the run folders


curve_every = 32         # budget curve: every budget up to this many, else ~curve_points log-spaced ones and the last
curve_points = 24
curve_gap = 1e-9         # the curve's EM fits run to this certificate (tol 0): warm and cold agree to ~1e-7 nats on val
curve_floor = 1e-4       # warm start: mass spread over every member (EM never revives a zero weight)
# -----------------------------------------------------------------------------

# Slowrun convention (FineWeb, GPT-2 tokenizer): best nanochat val loss by training tokens
SLOWRUN_TABLE = [(200e6, 3.703), (400e6, 3.370), (600e6, 3.200), (800e6, 3.123), (1e9, 3.046), (2e9, 2.892)]


def planned_members(cfg):
    """Members the run of this config holds once finished: q0 and chain num_trajectories x num_cycles, ensemble
    ensemble_size, single and student one. Fewer in the manifest: the run is unfinished (a track still training,
    stopped, or never started), which its config says without reading any checkpoint."""
    if cfg["mode"] in ("q0", "chain"):
        return cfg["num_trajectories"] * cfg["num_cycles"]
    return cfg["ensemble_size"] if cfg["mode"] == "ensemble" else 1


def open_run(run_dir, max_tokens=0, exclude=(), device=None):
    """Config, manifest (training order; minus the members named in `exclude`), the fitness and val tokens and their
    windows, checked against the run; the members planned and found (planned_members); `device`, where the prior's
    maths runs (scores.backend_device)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} not found: train one first (python q0.py <config> --out_dir={run})")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} missing: {run} is not a run folder of train.py or q0.py (train into it with --out_dir={run})")
    record = runtime.read_record(run)  # an unreadable one is rebuilt from the run's checkpoints
    cfg, rows = current_config(record), store.read_manifest(run)  # with its resumes: a run extended on resume plans more members
    excluded = [r["name"] for r in rows if r["name"] in exclude]
    rows = [r for r in rows if r["name"] not in exclude]
    if not rows:
        raise UserError(f"--exclude leaves no member of {run}", status=2)
    out = dict(dir=run, cfg=cfg, rows=rows, names=[r["name"] for r in rows], excluded=excluded, seq_len=cfg["seq_len"],
               eval_tokens=max_tokens, planned=planned_members(cfg), found=len(rows) + len(excluded), device=device)
    for split in ("fitness", "val"):
        try:
            tokens, meta = store.load_split(cfg["data_dir"], split)
        except UserError as e:
            raise UserError(f"{run} was trained on {cfg['data_dir']}: {e}") from None
        if record.get("data", {}).get(split, meta["sha256"]) != meta["sha256"]:
            raise UserError(f"{cfg['data_dir']}/{split}.bin differs from the data {run} was trained on (sha256 in "
                            f"{config_path}): restore that data, or re-run prepare_data.py with the flags that made it")
        windows = scores.eval_windows(tokens, cfg["seq_len"], max_tokens)
        out[split] = dict(tokens=tokens, meta=meta, windows=windows, n=sum(e - s - 1 for s, e in windows))
    return out


def member_path(run, name):
    return run["dir"] / next(r for r in run["rows"] if r["name"] == name)["path"]


def scored_from(run_dir, name):
    """The member sha256 recorded when `name` was last scored (scores.read_record); None without one."""
    return scores.read_record(run_dir, name).get("member_sha256")


def member_fix(run, name, retrain=True):
    """What to do about a member eval.py cannot use; retraining is left out where it would save the same file."""
    track = next(r for r in run["rows"] if r["name"] == name)["track"]
    return (f"leave it out with `python eval.py {run['dir']} --exclude {name}`" + (
        f", or retrain its track: delete {run['dir'] / ('track' + str(track))} and re-run the training command with "
        f"--resume=True" if retrain else ""))


def load(run, name, dev):
    """Member `name` as a model in eval mode, refused (one line naming the file and member_fix) when its file is
    missing, unreadable, not its sha256, holds a NaN or inf weight, or was trained on other tokens than the run's."""
    path, fix = member_path(run, name), member_fix(run, name)
    if not path.is_file():
        raise UserError(f"member file {path} (manifest of {run['dir']}) is missing: {fix}")
    model, ckpt = store.load_member(path, dev, fix, expected=next(r for r in run["rows"] if r["name"] == name))
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # saved that way (its sha256 matches): every score of it would be NaN
        raise UserError(f"member file {path} holds non-finite weights ({len(bad)} of {len(ckpt['model'])} tensors, "
                        f"the first {bad[0]}), saved so (its sha256 matches): {member_fix(run, name, retrain=False)}")
    meta, mine = run["val"]["meta"], ckpt["data"]
    if ((mine["tokenizer"], mine["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"])
            or model.cfg.vocab_size < meta["vocab_size"]):  # a token past the model's vocab would crash the forward
        raise UserError(f"{path} was trained with tokenizer {mine['tokenizer']} (vocab {mine['vocab_size']}, model vocab "
                        f"{model.cfg.vocab_size}), but {run['cfg']['data_dir']} holds {meta['tokenizer']} tokens (vocab "
                        f"{meta['vocab_size']}): point config.json's data_dir at its data")
    return model


def score_split(model, split, dev, size=EvalConfig.batch_size):
    """One member's score file: log p(y_t | y_<t) at every scored position of a split, in window order: (N,) float32."""
    return scores.score_windows(model, split["tokens"], split["windows"], dev, size).numpy()


def scored(run, name, split):
    """True when member `name`'s score file of `split` can be used as it is (scores.cached: complete, its sha256,
    recorded for this member, this split's length). One that cannot is named when it exists and is scored again: a
    score file is a cache, recomputed from its member."""
    ok, why = scores.cached(run["dir"], name, split, run[split]["n"])
    if not ok and scores.score_path(run["dir"], name, split).exists() and "missing" not in why:
        print(f"warning: score file {scores.score_path(run['dir'], name, split)} {why}; scoring it again",
              file=sys.stderr, flush=True)
    return ok


def peak_memory(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def score_run(run, env, out_dtype=EvalConfig.dtype, size=EvalConfig.batch_size):
    """Score every member not yet scored, or scored from another member file than today's (member i on rank
    i % world); returns the names scored and skipped."""
    dev, world, rank, d = env["device"], env["world"], env["rank"], run["dir"]
    (d / "scores").mkdir(exist_ok=True)
    shas = {name: store.member_sha256(member_path(run, name)) for name in run["names"]}
    todo = {}
    for name in run["names"]:
        todo[name] = [s for s in ("fitness", "val") if not scored(run, name, s)]
        was = scored_from(d, name)
        if len(todo[name]) < 2 and was != shas[name]:  # cached scores of another member file: both splits again
            if rank == 0:
                why = ("its member file is missing or unreadable" if shas[name] is None else
                       "there is no record of the member file they came from" if was is None else
                       f"{member_path(run, name)} changed since (sha256 {shas[name][:12]}, scored from {was[:12]})")
                print(f"member {name}: cached scores not used, {why}; scoring it again", flush=True)
            todo[name] = ["fitness", "val"]
    mine = [n for i, n in enumerate(run["names"]) if i % world == rank and todo[n]]
    if rank == 0:
        print(f"scoring {run['dir']}: {len(run['names'])} members, {sum(not t for t in todo.values())} already scored, "
              f"{sum(bool(t) for t in todo.values())} to score on {world} rank(s) | fitness {run['fitness']['n']:,} + val "
              f"{run['val']['n']:,} tokens each (eval_tokens={run['eval_tokens'] or 'all'}, seq_len {run['seq_len']}, {out_dtype})")
    for name in mine:
        t0 = time.time()
        model = load(run, name, dev)  # one model in memory at a time
        record = dict(member=str(member_path(run, name).relative_to(d)), member_sha256=shas[name],
                      scores=scores.read_record(d, name).get("scores", {}))
        for split in todo[name]:
            lp = score_split(model, run[split], dev, size).astype(out_dtype)
            if not np.isfinite(lp).all():  # never a NaN score file: it would poison every mixture with it
                bad = int((~np.isfinite(lp)).sum())
                raise UserError(f"member {name} gives non-finite log-probs on {split} ({bad:,} of {len(lp):,} tokens, "
                                f"{out_dtype}): {member_fix(run, name, retrain=False)}")
            store.save_array(lp, scores.score_path(d, name, split))
            record["scores"][split] = store.digest(lp)  # what the sha256 beside it holds
        store.write_json(record, scores.record_path(d, name))
        del model
        n = sum(run[s]["n"] for s in todo[name])
        dt = time.time() - t0
        print(f"  rank {rank} | {name} | {'+'.join(todo[name])} | {n:,} tokens | {dt:6.2f} s | {n / dt:10,.0f} tok/s | "
              f"peak mem {peak_memory(dev):,.0f} MiB", flush=True)
    if world > 1:
        dist.barrier()
    return dict(scored=[n for n in run["names"] if todo[n]], skipped=[n for n in run["names"] if not todo[n]])


# -----------------------------------------------------------------------------
# reports: arithmetic on the cached arrays

def weights_of(names, mix):
    """A mixture [(name, weight), ...] (members_at, or a prior.json entry's members and weights zipped) as a
    weight vector over all members, zeros elsewhere."""
    w = np.zeros(len(names))
    for n, x in mix:
        w[names.index(n)] = x
    return w


def data_efficiency(loss, table, seen_tokens):
    """Slowrun's data efficiency: the tokens a baseline needs to reach `loss` / the tokens the method saw. table =
    [(tokens, the baseline's best val loss at that many tokens)], read piecewise-linearly in tokens: the first point
    of the curve at `loss`. None off the table (a loss above its first point, or below every point): never
    extrapolated."""
    (n, l), *rest = sorted(table)
    if loss > l:
        return None
    for n1, l1 in rest:
        if loss >= min(l, l1):  # the segment from (n, l) to (n1, l1) reaches it
            return float(n if l == l1 or loss >= l else n + (n1 - n) * (l - loss) / (l - l1)) / seen_tokens
        n, l = n1, l1
    return float(n) / seen_tokens if loss == l else None


def slowrun_efficiency(loss):
    """Tokens a nanochat baseline needs to reach `loss` (SLOWRUN_TABLE, piecewise-linear) / 100M; None off the table."""
    return data_efficiency(loss, SLOWRUN_TABLE, 100e6)


def is_slowrun(meta):
    return meta["tokenizer"] == "gpt2" and "fineweb" in f"{meta['source']} {meta['source_detail']}".lower()


def run_scores(run, split):
    """The run's (M, N) scores of `split` (scores.open_scores: memory-mapped, training order, on the run's backend
    device); a missing or bad file is a UserError naming the command that rescores it."""
    try:  # score_run has just checked every file (scored): no second hash here
        return scores.open_scores(run["dir"], run["names"], split, run.get("device"))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def log(line):
    """A progress line of the report's arithmetic (prior fits, greedy, the budget curve, the val pass), as it happens."""
    print(line, flush=True)


# -----------------------------------------------------------------------------
# RUN/prior.json: fit and written (write_prior, current_prior), read (read_prior, members_at), here only
def digest_of(prior_json):
    """sha256 of a prior.json's content but its own "sha256" key, as JSON text with sorted keys (what is on disk)."""
    text = json.dumps({k: v for k, v in prior_json.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
    idx, w = prior.select(scores.open_scores(run_dir, names, prior.split, check=True), k, method=prior_json["method"])
    return [(names[i], float(x)) for i, x in zip(idx, w)]


def uniform_last(M, k):
    """The last k members in training order (the newest), to be averaged uniformly."""
    return np.arange(M - k, M)


def fit_line(what, L, info):
    """One line for a fit: passes, objective, certificate (EM's), seconds."""
    gap = f" | gap {info['gap']:.1e}" if "gap" in info else ""
    return (f"{what} | {L.shape[0]} members x {L.shape[1]:,} tokens | {info['iterations']:4d} passes | "
            f"objective {info['objective']:.6f}{gap} | {info['seconds']:7.1f} s")


def fit_prior(names, L_fitness, method=prior.method, compare=False, log=None):
    """Everything prior.json holds: the fitted weights, select's mixture for each K in ks_for(M) (per_k), the
    uniform-over-last-K and greedy (its members, uniform) baselines at the same K (same layout, so eval.py can score all
    of them on val alike), and under "compare" each fit run: `method`'s, or with compare=True every fit in prior.FITS
    (EM vs AdamW: 300 more passes). Fit on the fitness split only; log() gets a line per fit and greedy's progress."""
    names, L = list(names), scores.as_probs(L_fitness, hold=True)
    M = len(names)
    assert len(L) == M, f"{M} names but L has {len(L)} rows"
    if method not in prior.FITS:
        raise ValueError(f"method must be one of {list(prior.FITS)}, got {method!r}")
    fits = {}
    for m in prior.FITS if compare else [method]:
        fits[m] = prior.FITS[m](L)
        if log:
            log(fit_line(f"prior fit | {m}", L, fits[m][1]))
    w = fits[method][0]
    ks = prior.ks_for(M)
    greedy = prior.greedy_select(L, ks[-2] if len(ks) > 1 else 1, log=log)  # at K = M greedy is every member
    uniform = lambda idx: (idx, np.full(len(idx), 1.0 / len(idx)))
    per_k = [prior.select(L, k, greedy, method, w) for k in ks]
    if log and prior.selection != "top":
        log(f"prior | {method} refit on greedy's first K members or the fit's K heaviest, the better on fitness, "
            f"K = {', '.join(map(str, ks[:-1]))}")
    tables = {"per_k": per_k, "uniform_last": [uniform(uniform_last(M, k)) for k in ks],
              "greedy": [uniform(greedy[:k] if k < M else np.arange(k)) for k in ks]}
    W = np.zeros((3 * len(ks), M))  # every entry's weights over all members, one row each: one pass for their losses
    for q, (idx, wk) in enumerate(x for t in tables.values() for x in t):
        W[q, idx] = wk
    nll = iter(prior.mixture_nlls(L, W))
    entry = lambda idx, wk: {"members": [names[i] for i in idx], "weights": [float(x) for x in wk],
                             "fitness_nll": float(next(nll))}
    entries = {t: {str(k): entry(*x) for k, x in zip(ks, rows)} for t, rows in tables.items()}
    return {
        "method": method,
        "selection": prior.selection,
        "split": prior.split,
        "num_tokens": int(L.shape[1]),
        "members": names,
        "objective_fitness": fits[method][1]["objective"],
        "weights": {n: float(x) for n, x in zip(names, w)},
        "per_k": entries["per_k"],
        "baselines": {"uniform_last": entries["uniform_last"], "greedy": entries["greedy"]},
        "compare": {m: {key: info[key] for key in ("objective", "seconds", "iterations")}
                    for m, (_, info) in fits.items()},
    }


def read_prior(run_dir, what="prior"):
    """RUN/prior.json as eval.py wrote it, refused when its content no longer matches the sha256 stored in it (for the
    readers that use it as it is: the student's teachers, the export; eval.py refits a stale one instead)."""
    run, path = Path(run_dir), Path(run_dir) / "prior.json"
    pj = store.read_json(path, what, f"write it with python eval.py {run}")
    if pj.get("sha256") != digest_of(pj):
        raise UserError(f"{path} does not match the sha256 eval.py stored in it (changed on disk): re-run python "
                        f"eval.py {run}, which refits it, then this command")
    return pj


def check_fit_on(run_dir, pj, names):
    """UserError unless each member file is the one prior.json was fit on (the sha256 stored in the file against the
    one prior.json recorded): a member retrained or replaced since would stand in the mixture for another model."""
    for name in names:
        path = Path(run_dir) / "members" / f"{name}.pt"
        if store.member_sha256(path) != pj.get("member_sha256", {}).get(name):
            raise UserError(f"member {name} ({path}) changed since {Path(run_dir) / 'prior.json'} was fit: re-run "
                            f"python eval.py {run_dir}, which rescores and refits, then this command")


def write_prior(path, names, L_fitness, method=prior.method, member_sha256=None, compare=False):
    """Fit the prior for these members (rows of L_fitness, in training order) and write it: the one writer of
    prior.json. member_sha256 ({name: sha256 of the member file scored}) is recorded in it when given, and the
    file's own sha256 always (current_prior refits a prior.json changed on disk)."""
    pj = fit_prior(names, L_fitness, method, compare, log=log)
    if member_sha256 is not None:
        pj["member_sha256"] = {n: member_sha256[n] for n in names}
    pj["sha256"] = digest_of(pj)
    store.write_json(pj, path)
    return pj


def current_prior(run_dir, names, L_fitness, method=None, member_sha256=None, compare=False):
    """RUN/prior.json as it is when it is intact (its content matches the sha256 in it) and the prior of exactly these
    members (same names in training order, same member files when member_sha256 is given, same fitness tokens: its
    K=1 loss still matches the scores) and, if `method` is given, holds that method's weights (with `compare`, every
    fit of prior.FITS under "compare"); otherwise fit it (with `method`, default em) and write it. -> (prior, None
    when kept, else why it was refit)."""
    path, L = Path(run_dir) / "prior.json", scores.as_probs(L_fitness)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        why = "there was no readable prior.json"
    elif old.get("sha256") != digest_of(old):
        why = "prior.json changed on disk since eval.py wrote it (its content no longer matches its sha256)"
    elif old.get("members") != list(names):
        why = "prior.json was fit on other members"
    elif member_sha256 is not None and old.get("member_sha256") != {n: member_sha256[n] for n in names}:
        changed = [n for n in names if old.get("member_sha256", {}).get(n) != member_sha256[n]]
        why = f"member(s) {', '.join(changed)} changed since prior.json was fit"
    elif old.get("num_tokens") != L.shape[1] or abs(old["per_k"]["1"]["fitness_nll"] - prior.mixture_nll(
            L, [float(n == old["per_k"]["1"]["members"][0]) for n in names])) > 1e-9:
        why = "the fitness scores changed since prior.json was fit"
    elif old.get("selection") != prior.selection:
        why = f"prior.json picks its K members by {old.get('selection')!r}, this code by {prior.selection!r} (prior.select)"
    elif method not in (None, old.get("method")):
        why = f"prior.json holds {old.get('method')} weights, {method} asked for"
    elif compare and set(old.get("compare", {})) != set(prior.FITS):
        why = f"prior.json compares {', '.join(old.get('compare', {}))} only, --compare_adamw asked for every fit"
    else:
        return old, None
    return write_prior(path, names, L, method or prior.method, member_sha256,
                       compare), why


def curve_budgets(budgets, every=curve_every, points=curve_points):
    """The budgets the curve reports: all of them up to `every`, else ~`points` log-spaced ones, the first and the last
    among them (96 budgets: 20), so a 480-member run costs ~20 fits, not 96."""
    if len(budgets) <= every:
        return list(budgets)
    return [budgets[i - 1] for i in np.unique(np.geomspace(1, len(budgets), points).round().astype(int))]


def budget_curve(P_fit, sizes, method, warm=True, last=None, log=None):
    """The prior refit on the population as it existed at each budget: the first n members for n in `sizes` (rows
    are in budget order), on the fitness split (P_fit: prior.Probs of all members) -> one weight vector (n,) each.
    `last`: the weights of all members (prior.json's), used as they are. EM runs to the certificate curve_gap and,
    with `warm`, starts from the previous budget's weights (a population only grows): old weights x n_old / n, each
    new member 1/n, then curve_floor of the mass spread evenly; cold, from uniform. AdamW (--method adamw) is the
    reference's 300 steps from alpha = 0 at every budget: its answer depends on its start, so it is never warm."""
    ws, w = [], None
    for n in scores.progress(sizes, len(sizes), "budget curve | prior refit at budget", log):
        if last is not None and n == len(P_fit):
            w = np.asarray(last, dtype=np.float64)
        elif method == "em":
            w0 = None if w is None or not warm else np.append(w * len(w) / n, np.full(n - len(w), 1 / n))
            w0 = None if w0 is None else (1 - curve_floor) * w0 + curve_floor / n
            w, _ = prior.fit_em(P_fit[:n], tol=0.0, gap=curve_gap, w0=w0)
        else:
            w, _ = prior.FITS[method](P_fit[:n])
        ws.append(w)
    return ws


def evaluate_run(run, method="auto", compare=False):
    """The prior (RUN/prior.json when current for these members, else fit on fitness and written by
    current_prior), then every val-loss report of the module docstring -> (report dict, the prior.json dict). The score
    files stay memory-mapped: every loss below is read in chunks of tokens (prior.chunk_tokens), never stacked in RAM,
    and every val loss of the report (the K table, its baselines, the budget curve) comes from one pass over val."""
    names, rows, d = run["names"], run["rows"], run["dir"]
    L_fit, L_val = run_scores(run, "fitness"), run_scores(run, "val")
    fit_loss, val_loss = -L_fit.mean(1), -L_val.mean(1)  # (M,) per-member losses
    P_fit = scores.as_probs(L_fit, hold=True)  # exp(L) of fitness, held for every fit below when it fits
    pj, refit_why = current_prior(d, names, P_fit, None if method == "auto" else method,
                                  {n: scored_from(d, n) for n in names}, compare)
    method = pj["method"]  # the budget curve refits with the method of the weights in use
    baseline = lambda kind, k: zip(*(pj["baselines"][kind][str(k)][key] for key in ("members", "weights")))
    ks = [int(k) for k in pj["per_k"]]
    mixes = {}  # (table, key) -> weights over all members; their val losses all in one pass over L_val below
    for k in ks:
        mixes["prior", k] = weights_of(names, members_at(pj, k))
        for kind in ("uniform_last", "greedy"):
            mixes[kind, k] = weights_of(names, baseline(kind, k))
    mixes["uniform_all", None] = np.full(len(names), 1 / len(names))
    every_budget = sorted({r["budget_epochs"] for r in rows})
    budgets = curve_budgets(every_budget)
    sizes = [sum(r["budget_epochs"] <= b for r in rows) for b in budgets]
    last = [pj["weights"][n] for n in names]
    for b, n, w in zip(budgets, sizes, budget_curve(P_fit, sizes, method, last=last, log=log)):
        mixes["curve_prior", b] = np.pad(w, (0, len(names) - n))
        mixes["curve_uniform", b] = np.pad(np.full(n, 1 / n), (0, len(names) - n))
    val = dict(zip(mixes, prior.mixture_nlls(L_val, list(mixes.values()), log=log, what="val mixtures")))
    ensemble = dict(ks=ks, **{kind: {k: float(val[kind, k]) for k in ks} for kind in ("prior", "uniform_last", "greedy")},
                    uniform_all=float(val["uniform_all", None]))
    curve = []  # the population as it existed at each budget; the prior refit on its fitness scores
    for b, n in zip(budgets, sizes):
        best = int(np.argmin(fit_loss[:n]))
        curve.append(dict(budget_epochs=b, members=n, prior_val=float(val["curve_prior", b]),
                          uniform_val=float(val["curve_uniform", b]), best_member=names[best],
                          best_member_val=float(val_loss[best])))
    best = int(np.argmin(fit_loss))
    members = [dict(name=n, track=r["track"], cycle=r["cycle"], budget_epochs=r["budget_epochs"], fitness=float(fit_loss[i]),
                    val=float(val_loss[i]), weight=pj["weights"][n]) for i, (n, r) in enumerate(zip(names, rows))]
    rep = dict(run=str(d), mode=run["cfg"]["mode"], num_members=len(names), budget_epochs=max(r["budget_epochs"] for r in rows),
               members_planned=run["planned"], members_found=run["found"], scored_now=run.get("scored_now"),
               eval_tokens=run["eval_tokens"], num_tokens={s: run[s]["n"] for s in ("fitness", "val")},
               score_dtype=str(np.load(scores.score_path(d, names[0], "val"), mmap_mode="r").dtype), selection="fitness",
               prior_method=method, prior_refit=refit_why, prior_compare=pj["compare"], weights=pj["weights"], members=members,
               best_member=dict(name=names[best], val=float(val_loss[best])), ensemble=ensemble, budget_curve=curve,
               budget_curve_budgets=f"{len(budgets)} of {len(every_budget)} budgets" + (
                   " (log-spaced and the last)" if len(budgets) < len(every_budget) else ""),
               summary=dict(best_member_val=float(val_loss[best]), uniform_val=ensemble["uniform_all"],
                            prior_val=ensemble["prior"][ks[-1]]))
    if is_slowrun(run["val"]["meta"]):  # the Slowrun convention is defined for FineWeb + GPT-2 tokens only
        losses = {"best member": rep["best_member"]["val"], "uniform all": ensemble["uniform_all"],
                  **{f"prior K={k}": v for k, v in ensemble["prior"].items()}}
        rep["slowrun_efficiency"] = {k: dict(val=v, efficiency=slowrun_efficiency(v)) for k, v in losses.items()}
    return rep, pj


def run_state(rep):
    """The first line's verdict: is the run finished, and were the members read now or all scores cached?"""
    found, planned, now = rep["members_found"], rep["members_planned"], rep["scored_now"]
    state = (f"UNFINISHED: {found} of {planned} planned members (continue its training with --resume=True)"
             if found < planned else "finished")
    if now is not None:
        cached = rep["num_members"] - len(now)
        state += " | scores: " + ("all from the cache" if not now else "all scored now" if not cached else
                                  f"{len(now)} scored now, {cached} from the cache")
    return state


def print_report(rep):
    print(f"\n== {rep['run']} | {rep['mode']} | {rep['num_members']} members | budget {rep['budget_epochs']:g} epochs | "
          f"fitness {rep['num_tokens']['fitness']:,} + val {rep['num_tokens']['val']:,} tokens ({rep['score_dtype']}) | "
          f"{run_state(rep)} ==")
    print("member       track cycle budget  fitness      val   weight")
    for m in rep["members"]:
        print(f"{m['name']:<12} {m['track']:5d} {m['cycle']:5d} {m['budget_epochs']:6g} {m['fitness']:8.4f} {m['val']:8.4f} "
              f"{m['weight']:8.4f}")
    why = rep.get("prior_refit")
    print(f"prior: {rep['prior_method']} weights, " + (f"fitted and written to prior.json ({why})" if why else
                                                         "read from prior.json (current for these members)"))
    e = rep["ensemble"]
    print(f"ensemble val loss (probability average; weights, K and selection from fitness; {rep['prior_method']} prior)")
    print("    K |       prior | uniform last-K | greedy, uniform")
    for k in e["ks"]:
        print(f"{k:5d} | {e['prior'][k]:11.4f} | {e['uniform_last'][k]:14.4f} | {e['greedy'][k]:15.4f}")
    print(f"uniform over all {rep['num_members']}: {e['uniform_all']:.4f} | best member on fitness "
          f"{rep['best_member']['name']}: {rep['best_member']['val']:.4f}")
    if len(rep["prior_compare"]) > 1:
        print("prior fits compared on fitness: " + " | ".join(f"{m} objective {c['objective']:.6f} ({c['iterations']} "
                                                               f"passes, {c['seconds']:.1f} s)" for m, c in rep["prior_compare"].items()))
    print(f"val loss against epoch budget (population with budget_epochs <= b; prior refit on fitness; "
          f"{rep['budget_curve_budgets']})")
    print("budget | members | prior (K=all) |  uniform | best member (on fitness)")
    for c in rep["budget_curve"]:
        print(f"{c['budget_epochs']:6g} | {c['members']:7d} | {c['prior_val']:13.4f} | {c['uniform_val']:8.4f} | "
              f"{c['best_member_val']:.4f} {c['best_member']}")
    if "slowrun_efficiency" in rep:
        print("Slowrun data efficiency (nanochat val-loss-by-tokens table, piecewise-linear; tokens to match / 100M)")
        for k, v in rep["slowrun_efficiency"].items():
            eff = f"{v['efficiency']:.1f}x" if v["efficiency"] is not None else "off the table"
            print(f"  {k:<14} val {v['val']:.4f} -> {eff}")


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MODE_WORDS = {"q0": "q0", "chain": "q0 with chain distillation", "single": "one model", "ensemble": "naive ensemble",
              "student": "student"}
LOSS_AXIS = "val loss (nats/token; lower is better)"
BUDGET_AXIS = "budget (epochs of the training data)"


def plot(rep, path):
    """RUN/eval.png when matplotlib is installed: val loss against K (members in the mixture) and against the epoch
    budget, each line named in words. One member has neither to show: the picture says so and gives its val loss."""
    plt = pyplot()
    if plt is None:
        return False
    n = rep["num_members"]
    where = f"{rep['run']}: {MODE_WORDS.get(rep['mode'], rep['mode'])}, {f'{n} members, ' * (n > 1)}" \
            f"{rep['budget_epochs']:g} epochs"
    if n == 1:
        fig = plt.figure(figsize=(8, 2.5))
        fig.text(0.5, 0.5, f"{where}\nval loss {rep['best_member']['val']:.4f} nats/token\n\nOne member: no mixture over K "
                 f"and no budget curve to draw.\nCompare it with other runs: python eval.py RUN_A RUN_B (compare.png)",
                 ha="center", va="center", fontsize=11)
    else:
        e, c = rep["ensemble"], rep["budget_curve"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.5))
        prior_label = "learned prior at K: greedy's K or the fit's K heaviest, the better, refit on fitness"
        for key, color, label in (("prior", "C0", prior_label),
                                  ("greedy", "C2", "greedy's K members, equal weights"),
                                  ("uniform_last", "C1", "the last K members, equal weights")):
            a.plot(e["ks"], [e[key][k] for k in e["ks"]], marker="o", c=color, label=label)
        a.axhline(e["uniform_all"], ls="--", c="gray", label=f"all {n} members, equal weights")
        a.set_xscale("log", base=2)
        a.set_xticks(e["ks"], [str(k) for k in e["ks"]])
        a.minorticks_off()
        a.set(xlabel="K (members in the mixture)", ylabel=LOSS_AXIS, title="val loss against K")
        for key, color, label in (("prior_val", "C0", "learned prior over the members so far"),
                                  ("uniform_val", "gray", "the members so far, equal weights"),
                                  ("best_member_val", "C3", "best member so far (picked on fitness)")):
            b.plot([x["budget_epochs"] for x in c], [x[key] for x in c], marker="o", ms=4, c=color, label=label)
        b.set(xlabel=BUDGET_AXIS, ylabel=LOSS_AXIS, title="val loss against the epoch budget")
        for ax in (a, b):  # legends under the panels: never over a line
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        fig.suptitle(where)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def read_rows(run_dir, track):
    """The rows of track<i>/log.jsonl as it is (a torn or damaged line skipped): read while the run trains."""
    rows = []
    for line in (Path(run_dir) / f"track{track}" / "log.jsonl").read_bytes().splitlines() if (
            Path(run_dir) / f"track{track}" / "log.jsonl").exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def tracks_of(cfg):
    """The number of tracks a run's config plans: its trajectories, its ensemble's members, or one."""
    return cfg["num_trajectories"] if "num_trajectories" in cfg else cfg["ensemble_size"] if cfg["mode"] == "ensemble" else 1


def plot_training(run, path):
    """RUN/train.png when matplotlib is installed: the training loss (its CE part where a teacher made it a mixture),
    the LR multiplier and the WD multiplier (the logged lr and wd over the config's base: the schedule, q0's sawtooth)
    against epochs, one panel each, every track, a point per log row, each member saved a dotted line at its epoch."""
    plt, cfg = pyplot(), run["cfg"]
    rows = {t: [r for r in read_rows(run["dir"], t) if r.get("kind") == "train"] for t in range(tracks_of(cfg))}
    if plt is None or not any(rows.values()):
        return False
    panels = [("loss", 1.0, "training loss: CE (nats/token)"), ("lr", cfg["muon_lr"], "LR multiplier (x muon_lr)")]
    panels += [("wd", cfg["weight_decay"], "WD multiplier (x weight_decay)")] if cfg["weight_decay"] else []
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, base, label) in zip(axes[:, 0], panels):
        for t, track in rows.items():
            value = lambda r: r.get("ce", r["loss"]) if key == "loss" else r[key] / base  # CE: a distilled loss is not
            ax.plot([r["epoch"] for r in track], [value(r) for r in track], lw=1, marker=".", ms=3, label=f"track {t}")
        for m in run["rows"]:
            ax.axvline(m["epochs"], color=f"C{m['track']}", ls=":", lw=0.6, alpha=0.6)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"{run['dir']}: training, dotted lines at the members saved")
    axes[-1, 0].set_xlabel("epochs of the training data (each track's own)")
    if len(rows) > 1:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def own(rep):
    """A run's own number: the single model's val, the naive ensemble's uniform average, the population's prior."""
    return rep["summary"][{"single": "best_member_val", "ensemble": "uniform_val"}.get(rep["mode"], "prior_val")]


def plot_comparison(reps, path):
    """compare.png when matplotlib is installed: each population's prior val against the epoch budget (its budget
    curve, log x), each baseline's own val (own) as a point at its budget; the legend says what each number is."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in reps:
        n, budget = r["num_members"], f"{r['budget_epochs']:g} epochs"
        if r["mode"] in ("q0", "chain"):
            c = r["budget_curve"]
            ax.plot([x["budget_epochs"] for x in c], [x["prior_val"] for x in c], marker="o", ms=3,
                    label=f"{r['run']}: {MODE_WORDS[r['mode']]}, learned prior over the members so far "
                          f"({own(r):.4f} at {budget})")
        else:
            what = {"single": "one model", "ensemble": f"naive ensemble: {n} models, equal weights"}.get(
                r["mode"], f"{MODE_WORDS.get(r['mode'], r['mode'])}, {n} member{'s' * (n > 1)}")
            ax.plot([r["budget_epochs"]], [own(r)], marker="s", ms=8, ls="none",
                    label=f"{r['run']}: {what} ({own(r):.4f} at {budget})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.margins(x=0.08)
    ax.set(xlabel=BUDGET_AXIS, ylabel=LOSS_AXIS, title="val loss against the epoch budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def print_comparison(reps, out=None):
    """One row per run; the last column is each method's own number: the single model, the naive ensemble's uniform
    average, the q0 population's prior (all K). Runs of equal budget compare directly; compare.png (plot_comparison)
    goes to `out`, or to the first run's folder."""
    print("\nrun                          | mode     | members | budget | best member val | uniform val | prior val | "
          "its method's val")
    for r in reps:
        v = r["summary"]
        print(f"{r['run'][-28:]:<28} | {r['mode']:<8} | {r['num_members']:7d} | {r['budget_epochs']:6g} | "
              f"{v['best_member_val']:15.4f} | {v['uniform_val']:11.4f} | {v['prior_val']:9.4f} | {own(r):16.4f}")
    population = [r for r in reps if r["mode"] in ("q0", "chain")]
    baselines = [r for r in reps if r["mode"] in ("single", "ensemble")]
    for p in population:
        same = [b for b in baselines if b["budget_epochs"] == p["budget_epochs"]]
        if same:
            best = min(same, key=own)
            print(f"{p['run']} ({p['mode']}, prior) vs the best baseline of the same {p['budget_epochs']:g}-epoch budget "
                  f"({best['run']}, {best['mode']}): {own(p) - own(best):+.4f} nats ({'better' if own(p) < own(best) else 'worse'})")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        keys = ("run", "mode", "num_members", "budget_epochs", "best_member", "summary")
        store.write_json([{k: r[k] for k in keys} for r in reps], Path(out) / "compare.json")
    png = Path(out or reps[0]["run"]) / "compare.png"
    if plot_comparison(reps, png):
        print(f"wrote {png}")


# -----------------------------------------------------------------------------

def status(run_dir):
    """Where a run is, read from its folder alone (config.json, each track's log and manifest, the lock's holder):
    per track its step, cycle, members saved, last val and eta; then the run's members and eta. Writes nothing."""
    run = Path(run_dir)
    try:
        record = store.load_json(run / "config.json")
    except (OSError, ValueError) as e:
        raise UserError(f"{run / 'config.json'} cannot be read ({config.one_line(e)}): not a run folder, or not started "
                        f"(python eval.py {run} rebuilds a damaged one from the checkpoints)") from None
    cfg, lines, left, whole, saved = current_config(record), [], {}, [], {}
    per_track = cfg["num_cycles"] if "num_cycles" in cfg else 1
    for t in range(tracks_of(cfg)):
        rows = read_rows(run, t)
        train = [r for r in rows if r.get("kind") == "train"]
        val = next((r for r in reversed(rows) if r.get("kind") == "eval"), None)
        try:
            saved[t] = len(store.load_json(run / f"track{t}" / "manifest.json")["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            saved[t] = 0
        lock = run / f"track{t}" / "lock"
        holder = lock.read_text().split() if lock.exists() else []  # "pid N on HOST", kept by the trainer
        alive = len(holder) == 4 and holder[3] == socket.gethostname() and store.pid_alive(int(holder[1]))
        state = (f"training (pid {holder[1]})" if alive else "finished" if saved[t] == per_track else
                 "stopped" if train else "not started")
        if not train:
            lines.append(f"track {t} | {state} | members {saved[t]}/{per_track}")
            continue
        last = train[-1]
        spe = last["step"] / last["epoch"]
        total = per_track * round(cfg["epochs_per_cycle"] * spe) if "num_cycles" in cfg else max(1, round(cfg["epochs"] * spe))
        left[t], whole = (total - last["step"]) * last["ms"] / 1000, whole + [total * last["ms"] / 1000]
        cycle = f" | cycle {last['cycle']}/{per_track}" if "cycle" in last else ""
        seen = f" | val {val['val']:.4f} (step {val['step']})" if val else ""
        lines.append(f"track {t} | step {last['step']}/{total} ({100 * last['step'] / total:.1f}%){cycle} | members "
                     f"{saved[t]}/{per_track}{seen} | eta {runtime.duration(left[t])} | {state}")
    todo = sum(left.values()) + (len(saved) - len(left)) * max(whole, default=0)  # a track not started: a whole one
    groups = min((record.get("provenance") or [{}])[-1].get("world_size") or 1, len(saved))  # tracks train in parallel
    return "\n".join([f"status of {run} ({cfg['mode']}, {len(saved)} track(s); read only, nothing written)", *lines,
                      f"run | members {sum(saved.values())}/{len(saved) * per_track} | eta {runtime.duration(todo / groups)}"])


def log_to_tracker(run, rep):
    """The K table and the budget curve to the run's own tracker (its config's `tracker`), as one more tracker run
    ("eval") beside the tracks'; skipped, with a line, where that package is not installed here."""
    kind = run["cfg"].get("tracker", "none")
    if kind == "none":
        return
    if importlib.util.find_spec(kind) is None:
        return print(f"(the run's tracker, {kind}, is not installed here: the report is not mirrored to it)")
    tracker = runtime.tracker_for(kind, run["dir"], "eval")
    e = rep["ensemble"]
    for k in e["ks"]:
        tracker.log(dict(kind="k_table", step=k, prior=e["prior"][k], uniform_last=e["uniform_last"][k], greedy=e["greedy"][k]))
    for c in rep["budget_curve"]:
        tracker.log(dict(kind="budget_curve", step=c["members"], budget_epochs=c["budget_epochs"], prior_val=c["prior_val"],
                         uniform_val=c["uniform_val"], best_member_val=c["best_member_val"]))
    tracker.close()


def evaluate(cfg):
    """Score every run (all ranks), then on rank 0 fit or read each prior and print and write each report (eval.json,
    eval.png) and, for several runs, the comparison -> ([(run, report, prior.json dict), ...] on rank 0, env).
    tools/ call this, then use what it returns."""
    if not cfg.runs:
        raise UserError("give one or more run folders: python eval.py RUN [RUN ...]", status=2)
    if cfg.status:
        return print("\n\n".join(status(run_dir) for run_dir in cfg.runs)) or [], None
    dev = runtime.pick_device(cfg.device)
    world, rank = runtime.init_distributed(dev)
    env = dict(world=world, rank=rank, device=dev)
    exclude = {n.strip() for n in cfg.exclude.split(",") if n.strip()}
    device = scores.backend_device(cfg.backend, dev)  # where the prior's maths runs: numpy unless on a GPU
    runs = [open_run(run_dir, cfg.eval_tokens, exclude, device) for run_dir in cfg.runs]
    unknown = exclude - {name for run in runs for name in run["excluded"]}
    if unknown:
        raise UserError(f"--exclude: {', '.join(sorted(unknown))} is not a member of {', '.join(cfg.runs)}", status=2)
    for run in runs:  # every rank scores every run first, so no rank waits at a barrier through the reports
        run["scored_now"] = score_run(run, env, cfg.dtype, cfg.batch_size)["scored"]
    done = []
    for run in runs if not cfg.score and rank == 0 else []:  # only rank 0 reports
        rep, pj = evaluate_run(run, cfg.method, cfg.compare_adamw)
        print_report(rep)
        store.write_json(rep, run["dir"] / "eval.json")
        png = plot(rep, run["dir"] / "eval.png") and plot_training(run, run["dir"] / "train.png")
        log_to_tracker(run, rep)
        print(f"wrote {run['dir']}/{'prior.json, ' if rep['prior_refit'] else ''}eval.json"
              f"{', eval.png, train.png' if png else ' (no matplotlib: no eval.png, no train.png)'}")
        done.append((run, rep, pj))
    if len(done) > 1:
        print_comparison([rep for _, rep, _ in done], cfg.out or None)
    return done, env


def main(argv=None):
    with runtime.session(sys.argv[1:] if argv is None else argv, EvalConfig, __doc__) as cfg:
        return [rep for _, rep, _ in evaluate(cfg)[0]]


if __name__ == "__main__":
    main()
