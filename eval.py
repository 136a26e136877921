"""
eval.py: score every member of a q0 population once, fit the learned prior, and report.

    python eval.py runs/quickstart                        # CPU or 1 GPU (auto): score, fit the prior, report
    python eval.py runs/RUN --method adamw                # the prior by the reference's AdamW fit instead of EM
    python eval.py runs/RUN --score                       # score only (resumes: scored members are skipped)
    python eval.py runs/A runs/B runs/C --out runs/cmp    # one comparison table (+ runs/cmp/compare.json)
    python eval.py runs/RUN --logit_avg 4                 # logit vs probability averaging, prior's top 4
    python eval.py runs/RUN --downstream hellaswag arc_easy tests/fixtures/mc_tiny.jsonl
    python eval.py runs/RUN --sample "def main(" --k 4    # text from the 4-member mixture
    torchrun --standalone --nproc_per_node=8 eval.py runs/RUN --score            # members split over 8 GPUs
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 eval.py runs/RUN --score              # 40 GPUs
    python eval.py runs/RUN                               # then, on one process: prior and reports

Scoring writes RUN/scores/{name}.{split}.npy = log p_i(y_t | y_<t) of the true token at every scored position
of fitness and val (common.eval_rows windows), with its sha256 beside it (a file that no longer matches is scored
again): member i on rank i % world, one model in memory at a time.
Everything after that is arithmetic on the cached (M, N) arrays L (prior.py), with p_i(t) = exp(L[i, t]):
    ensemble loss(w) = mean_t -log sum_i w_i p_i(t)      (probability averaging, prior.mixture_nll)
for the prior's top-K, uniform over all, uniform over the last K and greedy selection. Weights, K and every
selection come from the fitness split only; val is the test set and is only ever reported. RUN/prior.json (the
prior's weights and per-K selections) is written here only, and kept while it is current for the run's members.
"""
import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import model as gpt
import prior
from common import (UserError, array_intact, autocast, eval_rows, init_distributed, load_member, pick_device, read_json,
                    read_manifest, save_array, score_windows, window_batches, write_json)
from prepare_data import load_split, tokenizer_for_meta

# -----------------------------------------------------------------------------
device = "auto"          # auto (cuda > mps > cpu) | cuda | mps | cpu
dtype = "float32"        # new score files: float32 | float16 (half the disk, ~1e-3 relative rounding)
eval_tokens = 0          # tokens scored per split (0 = the whole split); a file of another length is rescored
batch_size = 16          # windows (or choices) per forward pass
logits_floats = 2**26    # --logit_avg: cap on the B x T x V logits held at once (256 MiB in fp32)
prior_method = None      # em | adamw: prior.json refit if it holds the other; None: a current prior.json as is, else em
sample_k = 4             # --sample: members mixed (the prior's top K)
max_new_tokens = 200     # --sample: tokens generated
temperature = 1.0        # --sample: each member's softmax(z / temperature), then mixed
seed = 1337              # --sample: multinomial generator
# -----------------------------------------------------------------------------

# Slowrun convention (FineWeb, GPT-2 tokenizer): best nanochat val loss by training tokens
SLOWRUN_TABLE = [(200e6, 3.703), (400e6, 3.370), (600e6, 3.200), (800e6, 3.123), (1e9, 3.046), (2e9, 2.892)]


def setup_distributed(kind):
    """Process group only under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    dev = pick_device(kind)
    world, rank = init_distributed(dev)
    return dict(world=world, rank=rank, device=dev)


def open_run(run_dir, max_tokens=0, exclude=()):
    """Config, manifest (training order; minus the members named in `exclude`), the fitness and val tokens and their
    windows, checked against the run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} not found: train one first (python q0.py <config> --out_dir={run})")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} missing: {run} is not a run folder of train.py or q0.py (train into it with --out_dir={run})")
    record = read_json(config_path, "run record", "restore it from the run, or train again into a new folder")
    cfg, rows = record["config"], read_manifest(run)
    excluded = [r["name"] for r in rows if r["name"] in exclude]
    rows = [r for r in rows if r["name"] not in exclude]
    if not rows:
        raise UserError(f"--exclude leaves no member of {run}", status=2)
    out = dict(dir=run, cfg=cfg, rows=rows, names=[r["name"] for r in rows], excluded=excluded, seq_len=cfg["seq_len"],
               eval_tokens=max_tokens)
    for split in ("fitness", "val"):
        try:
            tokens, meta = load_split(cfg["data_dir"], split)
        except UserError as e:
            raise UserError(f"{run} was trained on {cfg['data_dir']}: {e}") from None
        if record.get("data", {}).get(split, meta["sha256"]) != meta["sha256"]:
            raise UserError(f"{cfg['data_dir']}/{split}.bin differs from the data {run} was trained on (sha256 in "
                            f"{config_path}): restore that data, or re-run prepare_data.py with the flags that made it")
        windows = eval_rows(tokens, cfg["seq_len"], max_tokens)
        out[split] = dict(tokens=tokens, meta=meta, windows=windows, n=sum(e - s - 1 for s, e in windows))
    return out


def load(run, name, dev):
    row = next(r for r in run["rows"] if r["name"] == name)
    path = run["dir"] / row["path"]
    fix = (f"leave it out with `python eval.py {run['dir']} --exclude {name}`, or retrain its track: delete "
           f"{run['dir'] / ('track' + str(row['track']))} and re-run the training command with --resume=True")
    if not path.is_file():
        raise UserError(f"member file {path} (manifest of {run['dir']}) is missing: {fix}")
    model, ckpt = load_member(path, dev, fix, expected=row)
    meta, mine = run["val"]["meta"], ckpt["data"]
    if ((mine["tokenizer"], mine["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"])
            or model.cfg.vocab_size < meta["vocab_size"]):  # a token past the model's vocab would crash the forward
        raise UserError(f"{path} was trained with tokenizer {mine['tokenizer']} (vocab {mine['vocab_size']}, model vocab "
                        f"{model.cfg.vocab_size}), but {run['cfg']['data_dir']} holds {meta['tokenizer']} tokens (vocab "
                        f"{meta['vocab_size']}): point config.json's data_dir at its data")
    return model


def token_logprobs(model, split, dev, size=batch_size):
    """log p(y_t | y_<t) at every scored position of a split, in window order: (N,) float32."""
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
    """Score every member not yet scored (member i on rank i % world); returns the names scored here and skipped."""
    dev, world, rank = env["device"], env["world"], env["rank"]
    (run["dir"] / "scores").mkdir(exist_ok=True)
    todo = {name: [s for s in ("fitness", "val") if not scored(prior.score_path(run["dir"], name, s), run[s]["n"])]
            for name in run["names"]}
    mine = [n for i, n in enumerate(run["names"]) if i % world == rank and todo[n]]
    if rank == 0:
        print(f"scoring {run['dir']}: {len(run['names'])} members, {sum(not t for t in todo.values())} already scored, "
              f"{sum(bool(t) for t in todo.values())} to score on {world} rank(s) | fitness {run['fitness']['n']:,} + val "
              f"{run['val']['n']:,} tokens each (eval_tokens={run['eval_tokens'] or 'all'}, seq_len {run['seq_len']}, {out_dtype})")
    for name in mine:
        t0 = time.time()
        model = load(run, name, dev)  # one model in memory at a time
        for split in todo[name]:
            save_array(token_logprobs(model, run[split], dev, size).astype(out_dtype), prior.score_path(run["dir"], name, split))
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

def weights_of(names, entry):
    """A prior.json entry {members, weights} as a weight vector over all members (zeros elsewhere)."""
    w = np.zeros(len(names))
    w[[names.index(n) for n in entry["members"]]] = entry["weights"]
    return w


def prior_top_k(rep, k):
    """The prior's k heaviest members: (all names, their indices, renormalised weights, weights over all names)."""
    names = list(rep["weights"])
    idx, w = prior.top_k(np.array([rep["weights"][n] for n in names]), k)
    full = np.zeros(len(names))
    full[idx] = w
    return names, idx, w, full


def slowrun_efficiency(loss):
    """Tokens a nanochat baseline needs to reach `loss` (piecewise-linear in the table) / 100M; None off the table."""
    tokens, losses = zip(*SLOWRUN_TABLE)
    if not losses[-1] <= loss <= losses[0]:
        return None
    return float(np.interp(loss, losses[::-1], tokens[::-1])) / 100e6


def is_slowrun(meta):
    return meta["tokenizer"] == "gpt2" and "fineweb" in f"{meta['source']} {meta['source_detail']}".lower()


def load_scores(run, split):
    try:
        return prior.load_scores(run["dir"], run["names"], split)  # (M, N) memory-mapped, training order
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def write_prior(path, names, L_fitness, method=prior.method):
    """Fit the prior for these members (rows of L_fitness, in training order) and write it: the one writer of
    prior.json."""
    pj = prior.fit_prior(names, L_fitness, method)
    write_json(pj, path)
    return pj


def current_prior(run_dir, names, L_fitness, method=None):
    """RUN/prior.json as it is when it is the prior of exactly these members (same names in training order, same
    fitness tokens: its K=1 loss still matches the scores) and, if `method` is given, holds that method's weights;
    otherwise fit it (with `method`, default em) and write it. -> (prior, None when kept, else why it was refit)."""
    path, L = Path(run_dir) / "prior.json", prior.as_scores(L_fitness)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old is None:
        why = "there was no readable prior.json"
    elif old.get("members") != list(names):
        why = "prior.json was fit on other members"
    elif old.get("num_tokens") != L.shape[1] or abs(old["per_k"]["1"]["fitness_nll"] - prior.mixture_nll(
            L, [float(n == old["per_k"]["1"]["members"][0]) for n in names])) > 1e-9:
        why = "the fitness scores changed since prior.json was fit"
    elif method not in (None, old.get("method")):
        why = f"prior.json holds {old.get('method')} weights, {method} asked for"
    else:
        return old, None
    return write_prior(path, names, L, method or prior.method), why


def evaluate_run(run, method=prior_method):
    """The prior (RUN/prior.json when current for these members, else fit on fitness and written by
    current_prior), then every val-loss report of the module docstring -> dict. The score files stay
    memory-mapped: every loss below is read in chunks of tokens (prior.chunk_tokens), never stacked in RAM."""
    names, rows, d = run["names"], run["rows"], run["dir"]
    L_fit, L_val = load_scores(run, "fitness"), load_scores(run, "val")
    fit_loss, val_loss = -L_fit.mean(1), -L_val.mean(1)  # (M,) per-member losses
    pj, refit_why = current_prior(d, names, L_fit, method)
    method = pj["method"]  # the budget curve refits with the method of the weights in use
    val = lambda entry: prior.mixture_nll(L_val, weights_of(names, entry))
    ks = [int(k) for k in pj["per_k"]]
    ensemble = dict(ks=ks, prior={k: val(pj["per_k"][str(k)]) for k in ks},
                    uniform_last={k: val(pj["baselines"]["uniform_last"][str(k)]) for k in ks},
                    greedy={k: val(pj["baselines"]["greedy"][str(k)]) for k in ks},
                    uniform_all=prior.mixture_nll(L_val, np.full(len(names), 1 / len(names))))
    curve = []  # the population as it existed at each budget; the prior refit on its fitness scores
    for b in sorted({r["budget_epochs"] for r in rows}):
        sub = [i for i, r in enumerate(rows) if r["budget_epochs"] <= b]
        w, _ = getattr(prior, f"fit_{method}")(L_fit[sub])
        best = sub[int(np.argmin(fit_loss[sub]))]
        curve.append(dict(budget_epochs=b, members=len(sub), prior_val=prior.mixture_nll(L_val[sub], w),
                          uniform_val=prior.mixture_nll(L_val[sub], np.full(len(sub), 1 / len(sub))),
                          best_member=names[best], best_member_val=float(val_loss[best])))
    best = int(np.argmin(fit_loss))
    members = [dict(name=n, track=r["track"], cycle=r["cycle"], budget_epochs=r["budget_epochs"], fitness=float(fit_loss[i]),
                    val=float(val_loss[i]), weight=pj["weights"][n]) for i, (n, r) in enumerate(zip(names, rows))]
    rep = dict(run=str(d), mode=run["cfg"]["mode"], num_members=len(names), budget_epochs=max(r["budget_epochs"] for r in rows),
               eval_tokens=run["eval_tokens"], num_tokens={s: run[s]["n"] for s in ("fitness", "val")},
               score_dtype=str(np.load(prior.score_path(d, names[0], "val"), mmap_mode="r").dtype), selection="fitness",
               prior_method=method, prior_refit=refit_why, weights=pj["weights"], members=members,
               best_member=dict(name=names[best], val=float(val_loss[best])), ensemble=ensemble, budget_curve=curve,
               summary=dict(best_member_val=float(val_loss[best]), uniform_val=ensemble["uniform_all"],
                            prior_val=ensemble["prior"][ks[-1]]))
    if is_slowrun(run["val"]["meta"]):  # the Slowrun convention is defined for FineWeb + GPT-2 tokens only
        losses = {"best member": rep["best_member"]["val"], "uniform all": ensemble["uniform_all"],
                  **{f"prior K={k}": v for k, v in ensemble["prior"].items()}}
        rep["slowrun_efficiency"] = {k: dict(val=v, efficiency=slowrun_efficiency(v)) for k, v in losses.items()}
    return rep


def print_report(rep):
    print(f"\n== {rep['run']} | {rep['mode']} | {rep['num_members']} members | budget {rep['budget_epochs']:g} epochs | "
          f"fitness {rep['num_tokens']['fitness']:,} + val {rep['num_tokens']['val']:,} tokens ({rep['score_dtype']}) ==")
    print("member       track cycle budget  fitness      val   weight")
    for m in rep["members"]:
        print(f"{m['name']:<12} {m['track']:5d} {m['cycle']:5d} {m['budget_epochs']:6g} {m['fitness']:8.4f} {m['val']:8.4f} "
              f"{m['weight']:8.4f}")
    why = rep.get("prior_refit")
    print(f"prior: {rep['prior_method']} weights, " + (f"fitted and written to prior.json ({why})" if why else
                                                         "read from prior.json (current for these members)"))
    e = rep["ensemble"]
    print(f"ensemble val loss (probability average; weights, K and selection from fitness; {rep['prior_method']} prior)")
    print("    K | prior top-K | uniform last-K |   greedy")
    for k in e["ks"]:
        print(f"{k:5d} | {e['prior'][k]:11.4f} | {e['uniform_last'][k]:14.4f} | {e['greedy'][k]:8.4f}")
    print(f"uniform over all {rep['num_members']}: {e['uniform_all']:.4f} | best member on fitness "
          f"{rep['best_member']['name']}: {rep['best_member']['val']:.4f}")
    print("val loss against epoch budget (population with budget_epochs <= b; prior refit on fitness)")
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


def plot(rep, path):
    """RUN/eval.png when matplotlib is installed (optional): val loss against K and against the budget."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


def print_comparison(reps, out=None):
    """One row per run; the last column is each method's own number: the single model, the naive ensemble's uniform
    average, the q0 population's prior (all K). Runs of equal budget compare directly."""
    own = lambda r: r["summary"][{"single": "best_member_val", "ensemble": "uniform_val"}.get(r["mode"], "prior_val")]
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
        write_json([{k: r[k] for k in keys} for r in reps], Path(out) / "compare.json")


# -----------------------------------------------------------------------------
# extras that need full distributions: they hold K models at once

@torch.no_grad()
def logit_average(run, rep, k, dev):
    """Val loss of the prior's top K combined two ways, same members and weights:
        logit average   -log softmax(sum_i w_i z_i)[y]   (on the fly; holds K models, B x T x V logits)
        prob average    -log sum_i w_i p_i(y)            (from the cached arrays)"""
    names, idx, w, full = prior_top_k(rep, k)
    models = [load(run, names[i], dev) for i in idx]
    total, rows = 0.0, max(1, min(batch_size, logits_floats // (run["seq_len"] * models[0].cfg.vocab_size)))
    for x in window_batches(run["val"]["tokens"], run["val"]["windows"], rows, dev):
        with autocast(dev):
            z = sum(float(wi) * m(x[:, :-1]) for wi, m in zip(w, models))  # (B, T, V)
        total -= gpt.token_logprobs(z.float(), x[:, 1:]).double().sum().item()
    return dict(k=len(idx), members=[names[i] for i in idx], weights=[float(x) for x in w], logit_avg_val=total / run["val"]["n"],
                prob_avg_val=prior.mixture_nll(load_scores(run, "val"), full))


def hub_questions(name):
    """A hub benchmark as [{context, choices, label}], lm-eval's zero-shot prompts (choices joined with a space)."""
    from datasets import load_dataset  # only here: local files and everything else work without it
    def clean(t):  # lm-eval's hellaswag preprocess: drop WikiHow's [title]/[step] markers
        return re.sub(r"\[.*?\]", "", t.strip().replace(" [title]", ". ")).replace("  ", " ")
    spec = {"hellaswag": ("Rowan/hellaswag", None, "validation", lambda d: dict(
                context=clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
                choices=[clean(c) for c in d["endings"]], label=int(d["label"]))),
            "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", None),
            "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", None),
            "piqa": ("baber/piqa", None, "validation", lambda d: dict(
                context=f"Question: {d['goal']}\nAnswer:", choices=[d["sol1"], d["sol2"]], label=int(d["label"])))}
    path, config, split, convert = spec[name]
    convert = convert or (lambda d: dict(context=f"Question: {d['question']}\nAnswer:", choices=d["choices"]["text"],
                                         label=d["choices"]["label"].index(d["answerKey"])))
    try:
        return [convert(d) for d in load_dataset(path, config, split=split)]
    except Exception as e:
        raise UserError(f"cannot load {name} ({path}) from the hub ({type(e).__name__}: {str(e)[:200]}); offline? "
                        f"write it as JSONL lines {{context, choices, label}} and pass the file instead") from None


def read_questions(spec):
    if spec in ("hellaswag", "arc_easy", "arc_challenge", "piqa"):
        return hub_questions(spec)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--downstream {spec}: neither a benchmark name (hellaswag, arc_easy, arc_challenge, piqa) "
                        f"nor a JSONL file")
    qs = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            q = json.loads(line) if line.strip() else None
        except ValueError:
            q = {}
        ok = isinstance(q, dict) and isinstance(q.get("context"), str) and isinstance(q.get("label"), int)
        if q is not None and not (ok and isinstance(q.get("choices"), list) and 0 <= q["label"] < len(q["choices"])
                                  and all(isinstance(c, str) for c in q["choices"])):
            raise UserError(f"{path}:{i + 1}: each line must be {{\"context\": str, \"choices\": [str, ...], \"label\": int}}")
        qs += [q] if q is not None else []
    if not qs:
        raise UserError(f"{path}: no questions")
    return qs


def choice_sequences(qs, tok, T):
    """Every (question, choice) as BOS + context + continuation ids, left-truncated to T + 1 tokens; the
    continuation is " " + choice unless either side already has the space (lm-eval's target delimiter)."""
    seqs, n_cont, chars, first = [], [], [], []  # per choice; first[q] = index of question q's first choice
    for q in qs:
        ctx = [tok.bos_id] + tok.encode(q["context"])
        first.append(len(seqs))
        for c in q["choices"]:
            cont = c if (not q["context"] or q["context"][-1].isspace() or c[:1].isspace()) else " " + c
            ids = (ctx + tok.encode(cont))[-(T + 1):]
            seqs.append(ids)
            n_cont.append(min(len(tok.encode(cont)), len(ids) - 1))
            chars.append(max(1, len(cont)))
    return seqs, np.array(n_cont), np.array(chars), first


@torch.no_grad()
def continuation_logprobs(model, seqs, n_cont, dev, size=batch_size):
    """One member's log p of every continuation token, all choices concatenated in order: (sum(n_cont),)."""
    out = []
    for b in range(0, len(seqs), size):
        chunk = seqs[b:b + size]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # right padding: causal, so harmless
        for j, ids in enumerate(chunk):
            x[j, :len(ids)] = torch.tensor(ids)
        x = x.to(dev)
        with autocast(dev):
            lp = model(x[:, :-1], x[:, 1:]).float().cpu().numpy()  # (B, L-1): lp[j, t] = log p(ids[t + 1])
        out += [lp[j, len(ids) - 1 - n:len(ids) - 1] for j, (ids, n) in enumerate(zip(chunk, n_cont[b:b + size]))]
    return np.concatenate(out)


def downstream(run, rep, spec, dev):
    """Multiple choice: a choice's score = sum over its tokens of log sum_i w_i p_i(token), after the context
    (choice_sequences). acc = argmax score; acc_norm = argmax score / len(continuation in characters) (lm-eval).
    Each member runs once over every choice; the mixtures for every K reuse those token log-probs."""
    qs = read_questions(spec)
    seqs, n_cont, chars, first = choice_sequences(qs, tokenizer_for_meta(run["val"]["meta"]), run["seq_len"])
    names = list(rep["weights"])
    lp = np.stack([continuation_logprobs(load(run, name, dev), seqs, n_cont, dev) for name in names])  # (M, tokens)
    ends = np.cumsum(n_cont)

    def accuracy(w):
        with np.errstate(divide="ignore"):
            mix = torch.logsumexp(torch.from_numpy(np.log(w)[:, None] + lp), 0).numpy()  # log sum_i w_i p_i, per token
        score = np.array([mix[e - n:e].sum() for e, n in zip(ends, n_cont)])  # (choices,) log p(continuation)
        norm = score / chars
        acc = [0, 0]
        for f, q in zip(first, qs):
            n = len(q["choices"])
            acc[0] += int(np.argmax(score[f:f + n])) == q["label"]
            acc[1] += int(np.argmax(norm[f:f + n])) == q["label"]
        return dict(acc=acc[0] / len(qs), acc_norm=acc[1] / len(qs))

    best = rep["best_member"]["name"]
    res = {f"best member {best}": accuracy(np.eye(len(names))[names.index(best)])}
    res |= {f"prior K={k}": accuracy(prior_top_k(rep, k)[3]) for k in rep["ensemble"]["ks"]}
    return dict(benchmark=spec, questions=len(qs), results=res)


@torch.no_grad()
def sample(run, rep, prompt, k, dev, new_tokens=max_new_tokens, temp=temperature, seed=seed):
    """Sample from the prior's top-K mixture: p = sum_i w_i softmax(z_i / temp), then a seeded multinomial draw.
    Holds K models; no KV cache (each step reruns the last seq_len tokens). -> (text, new token ids)."""
    names, idx, w, _ = prior_top_k(rep, k)
    models = [load(run, names[i], dev) for i in idx]
    tok = tokenizer_for_meta(run["val"]["meta"])
    ids, gen = [tok.bos_id] + tok.encode(prompt), torch.Generator().manual_seed(seed)
    new = []
    for _ in range(new_tokens):
        x = torch.tensor([ids[-run["seq_len"]:]], device=dev)
        p = sum(float(wi) * torch.softmax(m(x)[0, -1].float() / temp, -1) for wi, m in zip(w, models))  # (V,)
        p = p[:tok.vocab_size].cpu()  # the padded vocab rows are never real tokens
        new.append(int(torch.multinomial(p / p.sum(), 1, generator=gen)))
        ids.append(new[-1])
    return tok.decode(new), new


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
    p.add_argument("--downstream", nargs="+", default=[], help="hellaswag arc_easy arc_challenge piqa or JSONL files")
    p.add_argument("--logit_avg", type=int, default=0, metavar="K", help="also logit-average the prior's top K")
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
        env = setup_distributed(args.device)
        exclude = {n.strip() for n in args.exclude.split(",") if n.strip()}
        runs = [open_run(run_dir, args.eval_tokens, exclude) for run_dir in args.runs]
        unknown = exclude - {name for run in runs for name in run["excluded"]}
        if unknown:
            raise UserError(f"--exclude: {', '.join(sorted(unknown))} is not a member of {', '.join(args.runs)}", status=2)
        for run in runs:  # every rank scores every run first, so no rank waits at a barrier through the reports
            score_run(run, env, args.dtype, args.batch_size)
        for run in runs if not args.score and env["rank"] == 0 else []:  # only rank 0 reports
            rep = evaluate_run(run, args.method)
            dev = env["device"]
            if args.logit_avg:
                rep["logit_avg"] = logit_average(run, rep, args.logit_avg, dev)
            rep["downstream"] = [downstream(run, rep, spec, dev) for spec in args.downstream]
            if args.sample is not None:
                text = sample(run, rep, args.sample, args.k, dev, args.max_new_tokens, args.temperature, args.seed)[0]
                rep["sample"] = dict(prompt=args.sample, k=min(args.k, rep["num_members"]), temperature=args.temperature,
                                     seed=args.seed, text=text)
            print_report(rep)
            write_json(rep, run["dir"] / "eval.json")
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
