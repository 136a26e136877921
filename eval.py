"""
eval.py: score every member of a q0 population once, fit the learned prior, and report.

    python eval.py runs/quickstart                        # CPU or 1 GPU (auto): score, fit the prior, report
    python eval.py runs/RUN --method adamw                # the prior by the reference's AdamW fit instead of EM
    python eval.py runs/RUN --score                       # score only (resumes: scored members are skipped)
    python eval.py runs/A runs/B runs/C --out runs/cmp    # one comparison table (+ runs/cmp/compare.json)
    python eval.py runs/RUN --logit_avg 4                 # logit vs probability averaging, top 4 (tools/sample.py)
    python eval.py runs/RUN --downstream hellaswag arc_easy tests/fixtures/mc_tiny.jsonl   # tools/downstream.py
    python eval.py runs/RUN --sample "def main(" --k 4    # text from the top-4 mixture (tools/sample.py)
    torchrun --standalone --nproc_per_node=8 eval.py runs/RUN --score            # members split over 8 GPUs
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 eval.py runs/RUN --score              # 40 GPUs
    python eval.py runs/RUN                               # then, on one process: prior and reports

Scoring writes RUN/scores/{name}.{split}.npy = log p_i(y_t | y_<t) of the true token at every scored position
of fitness and val (common.eval_windows windows), with its sha256 beside it (a file that no longer matches is scored
again) and, in RUN/scores/{name}.json, the sha256 of the member file it came from (a member retrained since is
scored again): member i on rank i % world, one model in memory at a time.
Everything after that is arithmetic on the cached (M, N) arrays L (prior.py), with p_i(t) = exp(L[i, t]):
    ensemble loss(w) = mean_t -log sum_i w_i p_i(t)      (probability averaging, prior.mixture_nll)
for the prior's K members (prior.members_at: greedy's K, weights refit), uniform over all, uniform over the last K
and greedy's K averaged uniformly. Weights,
K and every selection come from the fitness split only; val is the test set and is only ever reported. RUN/prior.json
(the prior's weights and per-K selections) is written here only, and kept while it is current for the run's members.
The extras that need the members' full distributions (K models at once) live in tools/, imported only for their flags.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import prior
from common import (UserError, array_intact, current_config, eval_windows, init_distributed, load_member, member_sha256,
                    pick_device, read_json, read_manifest, save_array, score_windows, write_json)
from prepare_data import load_split

# -----------------------------------------------------------------------------
device = "auto"          # auto (cuda > mps > cpu) | cuda | mps | cpu
dtype = "float32"        # new score files: float32 | float16 (half the disk, ~1e-3 relative rounding)
eval_tokens = 0          # tokens scored per split (0 = the whole split); a file of another length is rescored
batch_size = 16          # windows (or choices) per forward pass
prior_method = None      # em | adamw: prior.json refit if it holds the other; None: a current prior.json as is, else em
compare_adamw = False    # also fit the prior by AdamW (300 passes) and report it beside EM (prior.json "compare")
curve_every = 32         # budget curve: every budget up to this many, else ~curve_points log-spaced ones and the last
curve_points = 24
curve_gap = 1e-9         # the curve's EM fits run to this certificate (tol 0): warm and cold agree to ~1e-7 nats on val
curve_floor = 1e-4       # warm start: mass spread over every member (EM never revives a zero weight)
sample_k = 4             # --sample: members mixed (the prior's mixture at K)
max_new_tokens = 200     # --sample: tokens generated
temperature = 1.0        # --sample: each member's softmax(z / temperature), then mixed
seed = 1337              # --sample: multinomial generator
# -----------------------------------------------------------------------------

# Slowrun convention (FineWeb, GPT-2 tokenizer): best nanochat val loss by training tokens
SLOWRUN_TABLE = [(200e6, 3.703), (400e6, 3.370), (600e6, 3.200), (800e6, 3.123), (1e9, 3.046), (2e9, 2.892)]


def eval_env(kind):
    """Device, world size and rank for scoring. Process group only under torchrun (WORLD_SIZE > 1): nccl on CUDA,
    gloo on CPU."""
    dev = pick_device(kind)
    world, rank = init_distributed(dev)
    return dict(world=world, rank=rank, device=dev)


def planned_members(cfg):
    """Members the run of this config holds once finished: q0 and chain num_trajectories x num_cycles, ensemble
    ensemble_size, single and student one. Fewer in the manifest: the run is unfinished (a track still training,
    stopped, or never started), which its config says without reading any checkpoint."""
    if cfg["mode"] in ("q0", "chain"):
        return cfg["num_trajectories"] * cfg["num_cycles"]
    return cfg["ensemble_size"] if cfg["mode"] == "ensemble" else 1


def open_run(run_dir, max_tokens=0, exclude=()):
    """Config, manifest (training order; minus the members named in `exclude`), the fitness and val tokens and their
    windows, checked against the run; the members planned and found (planned_members)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} not found: train one first (python q0.py <config> --out_dir={run})")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} missing: {run} is not a run folder of train.py or q0.py (train into it with --out_dir={run})")
    record = read_json(config_path, "run record", "restore it from the run, or train again into a new folder")
    cfg, rows = current_config(record), read_manifest(run)  # with its resumes: a run extended on resume plans more members
    excluded = [r["name"] for r in rows if r["name"] in exclude]
    rows = [r for r in rows if r["name"] not in exclude]
    if not rows:
        raise UserError(f"--exclude leaves no member of {run}", status=2)
    out = dict(dir=run, cfg=cfg, rows=rows, names=[r["name"] for r in rows], excluded=excluded, seq_len=cfg["seq_len"],
               eval_tokens=max_tokens, planned=planned_members(cfg), found=len(rows) + len(excluded))
    for split in ("fitness", "val"):
        try:
            tokens, meta = load_split(cfg["data_dir"], split)
        except UserError as e:
            raise UserError(f"{run} was trained on {cfg['data_dir']}: {e}") from None
        if record.get("data", {}).get(split, meta["sha256"]) != meta["sha256"]:
            raise UserError(f"{cfg['data_dir']}/{split}.bin differs from the data {run} was trained on (sha256 in "
                            f"{config_path}): restore that data, or re-run prepare_data.py with the flags that made it")
        windows = eval_windows(tokens, cfg["seq_len"], max_tokens)
        out[split] = dict(tokens=tokens, meta=meta, windows=windows, n=sum(e - s - 1 for s, e in windows))
    return out


def eval_write(write, *args):
    """common's writer write(*args) (save_array, write_json), with eval.py's advice when the disk is full or a write
    fails: common's says to re-run with --resume=True, the trainers' flag; eval.py has none, and a rerun of the same
    command continues by itself (what is scored is kept)."""
    try:
        return write(*args)
    except UserError as e:
        raise UserError(str(e).replace("re-run with --resume=True", "re-run the same eval.py command (what is already "
                                       "scored is kept)"), e.status) from None


def member_path(run, name):
    return run["dir"] / next(r for r in run["rows"] if r["name"] == name)["path"]


def record_path(run_dir, name):
    """RUN/scores/{name}.json: which member file (its sha256) the score files of `name` were computed from."""
    return Path(run_dir) / "scores" / f"{name}.json"


def scored_from(run_dir, name):
    """The member sha256 recorded when `name` was last scored; None without a readable record."""
    try:
        return json.loads(record_path(run_dir, name).read_text())["member_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    model, ckpt = load_member(path, dev, fix, expected=next(r for r in run["rows"] if r["name"] == name))
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


def score_split(model, split, dev, size=batch_size):
    """One member's score file: log p(y_t | y_<t) at every scored position of a split, in window order: (N,) float32."""
    return score_windows(model, split["tokens"], split["windows"], dev, size).numpy()


def scored(path, n):
    """True when a score file is complete: a readable 1-D array of n entries that matches the sha256 written beside
    it (save_array writes that second, so a killed write never counts). One that does not match is named and scored
    again: a score file is a cache, recomputed from its member."""
    intact = array_intact(path)
    if intact is False:
        print(f"warning: score file {path} does not match its sha256 ({path}.sha256): corrupted on disk; scoring it "
              f"again", file=sys.stderr, flush=True)
    return bool(intact) and np.load(path, mmap_mode="r").shape == (n,)


def peak_memory(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def score_run(run, env, out_dtype=dtype, size=batch_size):
    """Score every member not yet scored, or scored from another member file than today's (member i on rank
    i % world); returns the names scored and skipped."""
    dev, world, rank, d = env["device"], env["world"], env["rank"], run["dir"]
    (d / "scores").mkdir(exist_ok=True)
    shas = {name: member_sha256(member_path(run, name)) for name in run["names"]}
    todo = {}
    for name in run["names"]:
        todo[name] = [s for s in ("fitness", "val") if not scored(prior.score_path(d, name, s), run[s]["n"])]
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
        for split in todo[name]:
            scores = score_split(model, run[split], dev, size).astype(out_dtype)
            if not np.isfinite(scores).all():  # never a NaN score file: it would poison every mixture with it
                bad = int((~np.isfinite(scores)).sum())
                raise UserError(f"member {name} gives non-finite log-probs on {split} ({bad:,} of {len(scores):,} tokens, "
                                f"{out_dtype}): {member_fix(run, name, retrain=False)}")
            eval_write(save_array, scores, prior.score_path(d, name, split))
        eval_write(write_json, dict(member=str(member_path(run, name).relative_to(d)), member_sha256=shas[name]),
                   record_path(d, name))
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
    """A mixture [(name, weight), ...] (prior.members_at, or a prior.json entry's members and weights zipped) as a
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
    """The run's (M, N) scores of `split` (prior.open_scores: memory-mapped, training order); a missing or bad file is
    a UserError naming the command that rescores it."""
    try:
        return prior.open_scores(run["dir"], run["names"], split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def log(line):
    """A progress line of the report's arithmetic (prior fits, greedy, the budget curve, the val pass), as it happens."""
    print(line, flush=True)


def write_prior(path, names, L_fitness, method=prior.method, member_sha256=None, compare=False):
    """Fit the prior for these members (rows of L_fitness, in training order) and write it: the one writer of
    prior.json. member_sha256 ({name: sha256 of the member file scored}) is recorded in it when given, and the
    file's own sha256 always (current_prior refits a prior.json changed on disk)."""
    pj = prior.fit_prior(names, L_fitness, method, compare, log=log)
    if member_sha256 is not None:
        pj["member_sha256"] = {n: member_sha256[n] for n in names}
    pj["sha256"] = prior.digest_of(pj)
    eval_write(write_json, pj, path)
    return pj


def current_prior(run_dir, names, L_fitness, method=None, member_sha256=None, compare=False):
    """RUN/prior.json as it is when it is intact (its content matches the sha256 in it) and the prior of exactly these
    members (same names in training order, same member files when member_sha256 is given, same fitness tokens: its
    K=1 loss still matches the scores) and, if `method` is given, holds that method's weights (with `compare`, every
    fit of prior.FITS under "compare"); otherwise fit it (with
    `method`, default em) and write it. -> (prior, None when kept, else why it was refit)."""
    path, L = Path(run_dir) / "prior.json", prior.as_probs(L_fitness)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        why = "there was no readable prior.json"
    elif "sha256" not in old:
        why = "prior.json holds no sha256 of its content (written before eval.py kept one)"
    elif old["sha256"] != prior.digest_of(old):
        why = "prior.json changed on disk since eval.py wrote it (its content no longer matches its sha256)"
    elif old.get("members") != list(names):
        why = "prior.json was fit on other members"
    elif member_sha256 is not None and "member_sha256" not in old:
        why = "prior.json does not record the member files it was fit on"
    elif member_sha256 is not None and old["member_sha256"] != {n: member_sha256[n] for n in names}:
        changed = [n for n in names if old["member_sha256"].get(n) != member_sha256[n]]
        why = f"member(s) {', '.join(changed)} changed since prior.json was fit"
    elif old.get("num_tokens") != L.shape[1] or abs(old["per_k"]["1"]["fitness_nll"] - prior.mixture_nll(
            L, [float(n == old["per_k"]["1"]["members"][0]) for n in names])) > 1e-9:
        why = "the fitness scores changed since prior.json was fit"
    elif old.get("selection") != prior.selection:
        why = (f"prior.json picks its K members by {old.get('selection', 'the top K of the full fit')!r}, this code by "
               f"{prior.selection!r} (prior.select)")
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
    for n in prior.progress(sizes, len(sizes), "budget curve | prior refit at budget", log):
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


def evaluate_run(run, method=prior_method, compare=compare_adamw):
    """The prior (RUN/prior.json when current for these members, else fit on fitness and written by
    current_prior), then every val-loss report of the module docstring -> (report dict, the prior.json dict). The score
    files stay memory-mapped: every loss below is read in chunks of tokens (prior.chunk_tokens), never stacked in RAM,
    and every val loss of the report (the K table, its baselines, the budget curve) comes from one pass over val."""
    names, rows, d = run["names"], run["rows"], run["dir"]
    L_fit, L_val = run_scores(run, "fitness"), run_scores(run, "val")
    fit_loss, val_loss = -L_fit.mean(1), -L_val.mean(1)  # (M,) per-member losses
    P_fit = prior.as_probs(L_fit, hold=True)  # exp(L) of fitness, held for every fit below when it fits
    pj, refit_why = current_prior(d, names, P_fit, method, {n: scored_from(d, n) for n in names}, compare)
    method = pj["method"]  # the budget curve refits with the method of the weights in use
    baseline = lambda kind, k: zip(*(pj["baselines"][kind][str(k)][key] for key in ("members", "weights")))
    ks = [int(k) for k in pj["per_k"]]
    mixes = {}  # (table, key) -> weights over all members; their val losses all in one pass over L_val below
    for k in ks:
        mixes["prior", k] = weights_of(names, prior.members_at(pj, k))
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
               score_dtype=str(np.load(prior.score_path(d, names[0], "val"), mmap_mode="r").dtype), selection="fitness",
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
    if "logit_avg" in rep:
        la = rep["logit_avg"]
        print(f"logit vs probability averaging, prior top {la['k']} ({', '.join(la['members'])}), same weights: "
              f"val {la['logit_avg_val']:.4f} (logit avg) vs {la['prob_avg_val']:.4f} (prob avg)")
    for d in rep.get("downstream", []):
        print(f"downstream {d['benchmark']} ({d['questions']} questions) |   acc | acc_norm")
        for who, r in d["results"].items():
            print(f"  {who:<28} | {r['acc']:.3f} | {r['acc_norm']:.3f}")
    if "sample" in rep:
        print(f"sample (prior top {rep['sample']['k']}):\n{rep['sample']['prompt']}{rep['sample']['text']}")


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rep, path):
    """RUN/eval.png when matplotlib is installed: val loss against K and against the budget."""
    plt = pyplot()
    if plt is None:
        return False
    e, c = rep["ensemble"], rep["budget_curve"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("prior", "uniform_last", "greedy"):
        a.plot(e["ks"], [e[key][k] for k in e["ks"]], marker="o", label=key)
    a.axhline(e["uniform_all"], ls="--", c="gray", label="uniform all")
    a.set(xscale="log", xlabel="K members", ylabel="val loss", title=rep["run"])
    for key in ("prior_val", "uniform_val", "best_member_val"):
        b.plot([x["budget_epochs"] for x in c], [x[key] for x in c], marker="o", label=key)
    b.set(xlabel="budget (epochs)", ylabel="val loss")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def own(rep):
    """A run's own number: the single model's val, the naive ensemble's uniform average, the population's prior."""
    return rep["summary"][{"single": "best_member_val", "ensemble": "uniform_val"}.get(rep["mode"], "prior_val")]


def plot_comparison(reps, path):
    """compare.png when matplotlib is installed: each population's prior val against the epoch budget (its budget
    curve, log x), each baseline's own val (own) as a point at its budget."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reps:
        if r["mode"] in ("q0", "chain"):
            c = r["budget_curve"]
            ax.plot([x["budget_epochs"] for x in c], [x["prior_val"] for x in c], marker="o", ms=3,
                    label=f"{r['run']} ({r['mode']}: learned prior over the members so far; {own(r):.4f})")
        else:
            ax.plot([r["budget_epochs"]], [own(r)], marker="s", ms=8, ls="none",
                    label=f"{r['run']} ({r['mode']}, {r['num_members']} member{'s' * (r['num_members'] > 1)}; {own(r):.4f})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="budget (epochs of the training data)", ylabel="val loss (nats/token)",
           title="val loss against the epoch budget")
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
        eval_write(write_json, [{k: r[k] for k in keys} for r in reps], Path(out) / "compare.json")
    png = Path(out or reps[0]["run"]) / "compare.png"
    if plot_comparison(reps, png):
        print(f"wrote {png}")


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by q0.py or train.py")
    p.add_argument("--score", action="store_true", help="score the members only (no prior, no reports)")
    p.add_argument("--exclude", default="", help="comma-separated members to leave out (an unreadable one, say)")
    p.add_argument("--device", default=device)
    p.add_argument("--dtype", default=dtype, choices=("float32", "float16"))
    p.add_argument("--eval_tokens", type=int, default=eval_tokens, help="tokens per split (0 = all)")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--method", default=prior_method, choices=("em", "adamw"))
    p.add_argument("--compare_adamw", action="store_true", default=compare_adamw,
                   help="also fit the prior by AdamW (300 passes) and report it beside EM")
    p.add_argument("--downstream", nargs="+", default=[], help="hellaswag arc_easy arc_challenge piqa or JSONL files")
    p.add_argument("--logit_avg", type=int, default=0, metavar="K", help="also logit-average the prior's mixture at K")
    p.add_argument("--sample", default=None, metavar="PROMPT")
    p.add_argument("--k", type=int, default=sample_k, help="--sample: members mixed")
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--out", default=None, help="folder for compare.json when several runs are given")
    args = p.parse_args(argv)
    for key, ok, allowed in [("eval_tokens", args.eval_tokens >= 0, ">= 0"), ("batch_size", args.batch_size >= 1, ">= 1"),
                             ("logit_avg", args.logit_avg >= 0, ">= 0"), ("k", args.k >= 1, ">= 1"),
                             ("max_new_tokens", args.max_new_tokens >= 0, ">= 0"), ("temperature", args.temperature > 0, "> 0")]:
        if not ok:  # before any scoring, so a typo costs nothing
            raise UserError(f"--{key} {getattr(args, key)}: must be {allowed}", status=2)
    return args


def main(argv=None):
    reps = []
    try:
        args = parse_args(argv)
        env = eval_env(args.device)
        if prior.backend == "auto":  # the prior's maths where eval.py runs: --device=cpu keeps it off a GPU
            prior.backend = "cuda" if env["device"].type == "cuda" else "numpy"
        exclude = {n.strip() for n in args.exclude.split(",") if n.strip()}
        runs = [open_run(run_dir, args.eval_tokens, exclude) for run_dir in args.runs]
        unknown = exclude - {name for run in runs for name in run["excluded"]}
        if unknown:
            raise UserError(f"--exclude: {', '.join(sorted(unknown))} is not a member of {', '.join(args.runs)}", status=2)
        for run in runs:  # every rank scores every run first, so no rank waits at a barrier through the reports
            run["scored_now"] = score_run(run, env, args.dtype, args.batch_size)["scored"]
        for run in runs if not args.score and env["rank"] == 0 else []:  # only rank 0 reports
            rep, pj = evaluate_run(run, args.method, args.compare_adamw)
            dev = env["device"]
            if args.logit_avg:
                from tools.sample import logit_average  # the extras load only for their flags
                rep["logit_avg"] = logit_average(run, pj, args.logit_avg, dev)
            rep["downstream"] = []
            if args.downstream:
                from tools.downstream import downstream
                rep["downstream"] = [downstream(run, pj, rep["best_member"]["name"], spec, dev) for spec in args.downstream]
            if args.sample is not None:
                from tools.sample import sample
                text = sample(run, pj, args.sample, args.k, dev, args.max_new_tokens, args.temperature, args.seed)[0]
                rep["sample"] = dict(prompt=args.sample, k=min(args.k, rep["num_members"]), temperature=args.temperature,
                                     seed=args.seed, text=text)
            print_report(rep)
            eval_write(write_json, rep, run["dir"] / "eval.json")
            png = plot(rep, run["dir"] / "eval.png")
            print(f"wrote {run['dir']}/{'prior.json, ' if rep['prior_refit'] else ''}eval.json"
                  f"{', eval.png' if png else ' (no matplotlib: no eval.png)'}")
            reps.append(rep)
        if len(reps) > 1:
            print_comparison(reps, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.status)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return reps


if __name__ == "__main__":
    main()
