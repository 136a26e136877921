"""
q0.py: train a q0 population (primitives 1 and 2 of the q0 paper, arXiv 2606.03938, and the authors' reference
script, github.com/qlabs-eng/slowrun unlimited/train.py): parallel cyclic trajectories with snapshots and chain
distillation. The loop is train.py's (`train.train_track`); this file gives it one plan per trajectory: the
schedule, the loss, and what happens at each cycle end. Then `python eval.py RUN` scores the members and fits the
learned prior (primitive 3, prior.py).

Launch:
    python q0.py configs/quickstart.py                                          # CPU, minutes
    python q0.py configs/shakespeare_q0.py --seed=2                             # --key=value overrides; --help lists every key
    torchrun --standalone --nproc_per_node=2 q0.py configs/shakespeare_q0.py --num_trajectories=2   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 q0.py configs/fineweb_1p8b_q0.py --num_trajectories=1  # one 8-GPU node
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 q0.py configs/fineweb_1p8b_q0.py     # 5 nodes: one trajectory each
    ... add --resume=True to continue a killed run exactly where its checkpoints left it, and with a larger
    --num_cycles to extend a run (bit for bit the longer run, where refuse_more_cycles allows it).

Primitive 1, cyclic schedule. A trajectory runs `num_cycles` cycles; `cycle_ends` lists the step each one ends at
(cycle c ends at c x L, L = epochs_per_cycle x steps_per_epoch). At step s of a cycle of L steps (s = 0 ... L-1),
with f = lr_floor, w = wd_floor:
    linear (sawtooth):  lr_mult(s) = f + (1 - f) * (1 - s / L)
    cosine:             lr_mult(s) = f + (1 - f) * 0.5 * (1 + cos(pi * s / L))
    wd_mult(s) = w + (1 - w) * (1 - lr_mult(s)) / (1 - f)        (1 when constant_wd)
so the LR is at its peak and the WD at w x base at a cycle's start, and the LR falls towards f x peak while the WD
rises towards 1 x base at its end. Optimizer state is kept across cycles. P trajectories (seeds seed + i) run in
parallel process groups.

At a cycle end, in this order (the loop evaluates first and checkpoints after; Q0Plan.at_save):
    1. snapshot: save the weights as a population member (members/t<i>-c<cycle>.pt and its manifest row);
    2. teacher:  from cycle distill_after_cycles on, the snapshot becomes the next cycle's teacher, exactly as saved;
    3. noise:    add N(0, (scale_c * std(W))^2) to every weight tensor W, scale_c cosine-decayed from
                 perturb_scale_start (first snapshot) to perturb_scale_end (last); mode=chain re-initialises instead.

Primitive 2, chain distillation. The teacher is the previous snapshot of the same trajectory (taken before the
noise): frozen, eval mode, no grad, run online on the same micro-batch. Per token, with student logits z_s,
teacher logits z_t, target y:
    loss = (1 - a) * CE(z_s, y) + a * T^2 * KL( p_t || softmax(z_s / T) ),   p_t = softmax(z_t / T)
distill_teacher="mixture" (not in the reference) makes the teacher the population's own ensemble instead: the
learned prior over all earlier snapshots of the trajectory at distill_teacher_k members (prior.select on the
fitness split: greedy's K, EM weights on them), p_t = sum_k w_k softmax(z_k / T). Each snapshot's fitness log-probs are
scored once when it is saved; the teacher costs K forward passes per step. Teachers are small objects
(PreviousSnapshot, MixtureTeacher) with one interface; their state goes into the checkpoint.

mode=chain is the strong baseline of the Slowrun history from the same machinery: at each cycle end the
model is re-initialised (fresh optimizer state, warmup again) instead of perturbed, so every member is a
full model trained from scratch against its predecessor.

mode=student (student.py) turns a finished population back into one model: it trains for `epochs` (warmup +
cosine) against the learned-prior mixture of `teacher_run` at `teacher_k` members with the same distill_loss:
    python eval.py runs/quickstart && python q0.py configs/quickstart.py --mode=student \\
        --teacher_run=runs/quickstart --epochs=32 --distill_alpha=0.9 --distill_temperature=1.0 --out_dir=runs/student
"""
import bisect
import copy
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import prior
import runtime
import train
from common import (eval_windows, load_config, load_data, prepare_run_dir, read_member, score_windows,
                    setup_distributed)


# -----------------------------------------------------------------------------------------------------
# defaults: train.py's keys (data, model, optimizer, logging) plus these; configs/*.py and --key=value override
@dataclass
class Q0Config(train.Config):
    mode: str = "q0"                 # q0 | chain (re-init, not noise, at each cycle end: the sequential-chain baseline) | student
    num_trajectories: int = 1        # P parallel trajectories (q0) or independent chains (chain)
    num_cycles: int = 4              # cycles (= snapshots) per trajectory
    epochs_per_cycle: float = 2.0    # epochs of the train split per cycle
    cycle_shape: str = "linear"      # linear (sawtooth) | cosine
    first_cycle_warmup_steps: int = 0  # linear LR warmup at the start of the first cycle (chain: of every cycle)
    lr_floor: float = 0.08           # LR multiplier at a cycle's end
    wd_floor: float = 0.7            # WD multiplier at a cycle's start (LR peak)
    constant_wd: bool = False        # ablation: WD multiplier fixed at 1
    perturb_scale_start: float = 0.25  # noise std after a snapshot, x each tensor's std, cosine-decayed
    perturb_scale_end: float = 0.05    # ... to this at the last cycle; both 0 = no noise
    distill_after_cycles: int = 8    # distil from cycle max(1, this) + 1 on: the snapshot of cycle k teaches k+1
    distill_alpha: float = 0.45      # loss = (1-a) CE + a T^2 KL(teacher || student)
    distill_temperature: float = 1.2  # T
    distill_teacher: str = "previous"  # previous snapshot (reference) | mixture: the prior's K of earlier snapshots
    distill_teacher_k: int = 4       # mixture teacher: members (K teacher forwards per step)
    # mode=student: one model distilled from a finished run's learned-prior mixture, for `epochs` (warmup + cosine)
    teacher_run: str = ""            # student: the run folder (scored, with prior.json from eval.py) whose mixture teaches
    teacher_k: int = 4               # student: the prior's mixture of teacher_run at K members (prior.members_at)
    student_init: str = "scratch"    # student: scratch | best (start from the prior's top member; same model_size)
    teacher_topk: int = 0            # student: 0 = K teacher forwards per step; k = the mixture's top k per token, computed once into out_dir/teacher_topk/

    def num_tracks(self):
        return 1 if self.mode == "student" else self.num_trajectories
# -----------------------------------------------------------------------------------------------------


def lr_multiplier(s, L, lr_floor, shape="linear"):
    """LR multiplier at step s (0-based) of a cycle of L steps: 1 at s = 0, falling towards lr_floor."""
    progress = s / L
    decay = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return lr_floor + (1 - lr_floor) * decay


def wd_multiplier(lr_mult, lr_floor, wd_floor):
    """WD multiplier anti-correlated with the LR: wd_floor at the LR peak, 1 at the LR floor."""
    return wd_floor + (1 - wd_floor) * (1 - lr_mult) / (1 - lr_floor)


def perturb_scale(cycle, num_cycles, start, end):
    """Noise scale after snapshot `cycle` (1-based): cosine from `start` (cycle 1) to `end` (last cycle)."""
    if num_cycles <= 1:
        return start
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * (cycle - 1) / (num_cycles - 1)))


def distill_loss(student_logits, teacher_logits, targets, alpha, temperature, teacher_weights=None):
    """Chain distillation, mean over tokens:
        (1 - a) * CE(z_s, y) + a * T^2 * KL( p_t || softmax(z_s / T) ),   p_t = softmax(z_t / T)
    or, for a list of teachers' logits with weights w, the mixture p_t = sum_k w_k softmax(z_k / T).
    T^2 keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al. 2015)."""
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    if alpha == 0:
        return ce
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    if teacher_weights is None:
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    else:
        log_p_t = mixture_log_probs(teacher_logits, teacher_weights, temperature)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def mixture_log_probs(teacher_logits, teacher_weights, temperature):
    """log sum_k w_k softmax(z_k / T), accumulated one teacher at a time: never K (B, T, V) tensors at once."""
    log_p = None
    for z, w in zip(teacher_logits, teacher_weights):
        lp = F.log_softmax(z.detach().float() / temperature, dim=-1) + math.log(w)
        log_p = lp if log_p is None else torch.logaddexp(log_p, lp)
    return log_p


@torch.no_grad()
def perturb_(model, scale, generator):
    """w <- w + N(0, (scale * std(w))^2), every tensor, from a generator seeded by (seed, cycle)."""
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        p.add_((noise * (scale * p.float().std())).to(p.dtype))


def validate(cfg, need, steps_per_epoch):
    """The q0 keys' ranges (train.validate checks the rest); need(ok, key, allowed) raises naming the key."""
    need(cfg.mode in ("q0", "chain", "student"), "mode", "must be q0, chain or student (single and ensemble: train.py)")
    if cfg.mode == "student":
        need((Path(cfg.teacher_run) / "prior.json").is_file(), "teacher_run",
             "must be a finished run with prior.json: train it, then python eval.py <run> (scores it, fits the prior)")
        need(cfg.teacher_k >= 1, "teacher_k", "must be >= 1")
        need(cfg.student_init in ("scratch", "best"), "student_init", "must be scratch or best")
    need(cfg.teacher_topk >= 0, "teacher_topk", "must be >= 0 (0: the teachers run online)")
    need(cfg.teacher_topk == 0 or cfg.mode == "student", "teacher_topk", "is a mode=student key (0 otherwise)")
    need(cfg.num_trajectories >= 1, "num_trajectories", "must be >= 1")
    need(cfg.num_cycles >= 1, "num_cycles", "must be >= 1")
    need(round(cfg.epochs_per_cycle * steps_per_epoch) >= 1, "epochs_per_cycle",
         f"a cycle must be at least one step (one epoch is {steps_per_epoch} steps)")
    need(0 <= cfg.distill_alpha <= 1, "distill_alpha", "must be in [0, 1]")
    need(cfg.distill_temperature > 0, "distill_temperature", "must be > 0")
    need(cfg.distill_after_cycles >= 0, "distill_after_cycles", "must be >= 0")
    need(cfg.distill_teacher in ("previous", "mixture"), "distill_teacher", "must be previous or mixture")
    need(cfg.distill_teacher_k >= 1, "distill_teacher_k", "must be >= 1")
    need(0 <= cfg.lr_floor < 1, "lr_floor", "must be in [0, 1)")
    need(0 <= cfg.wd_floor <= 1, "wd_floor", "must be in [0, 1]")
    need(cfg.cycle_shape in ("linear", "cosine"), "cycle_shape", "must be linear or cosine")
    need(cfg.perturb_scale_start >= 0, "perturb_scale_start", "must be >= 0")
    need(cfg.perturb_scale_end >= 0, "perturb_scale_end", "must be >= 0")
    need(cfg.first_cycle_warmup_steps >= 0, "first_cycle_warmup_steps", "must be >= 0")


def describe_budget(cfg):
    if cfg.mode == "student":
        return (f"student: {cfg.epochs:g} epochs against the top {cfg.teacher_k} of {cfg.teacher_run}'s prior (a="
                f"{cfg.distill_alpha}, T={cfg.distill_temperature}; " + (f"{cfg.teacher_k} teacher forwards per step"
                if not cfg.teacher_topk else f"its top {cfg.teacher_topk} per token from a file, computed once") +
                f"), from {cfg.student_init}")
    total = cfg.num_trajectories * cfg.num_cycles * cfg.epochs_per_cycle
    teacher = ("the previous snapshot" if cfg.distill_teacher == "previous" else
               f"the prior's top {cfg.distill_teacher_k} of the earlier snapshots")
    first = max(1, cfg.distill_after_cycles) + 1  # the snapshot of cycle k (k >= 1) is the teacher of cycle k + 1
    distill = (f"chain distillation in cycles {first}-{cfg.num_cycles} (a={cfg.distill_alpha}, T={cfg.distill_temperature}, "
               f"teacher: {teacher})"
               if first <= cfg.num_cycles else "no chain distillation (distill_after_cycles >= num_cycles)")
    between = ("each cycle ends in a fresh model (re-initialised, new optimizer state; perturb_scale_* unused)"
               if cfg.mode == "chain" else f"noise {cfg.perturb_scale_start:g} -> {cfg.perturb_scale_end:g} x each tensor's std "
               f"after each snapshot")
    return (f"{cfg.mode} budget: {cfg.num_trajectories} trajectories x {cfg.num_cycles} cycles x {cfg.epochs_per_cycle} "
            f"epochs/cycle = {total:g} epochs, {cfg.num_trajectories * cfg.num_cycles} snapshots; {distill}; {between}")



# -----------------------------------------------------------------------------------------------------
# teachers: a name (None until there is one), forwards per step, targets(x) -> (logits or [logits], weights or None),
# at_snapshot(name, weights, model) at each cycle end, after_step(model), and a state for the checkpoint
class PreviousSnapshot:
    """The reference's teacher: the trajectory's previous snapshot, one frozen copy per rank, overwritten in place."""

    def __init__(self, cfg, track, data, env):
        self.cfg, self.track, self.device = cfg, track, env["device"]
        self.name, self.model, self.fwd = None, None, None

    @property
    def forwards(self):
        return int(self.name is not None)

    def targets(self, x):
        return self.fwd(x), None

    def at_snapshot(self, name, weights, model, active):
        if active:  # the next cycle distils from this snapshot, exactly as saved
            self.set(name, weights, model)

    def set(self, name, weights, model):
        if self.model is None:
            self.model, self.fwd = frozen_copy(model, self.cfg.compile)
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        self.name = name

    def after_step(self, model):
        pass  # room for an EMA-of-weights teacher

    def state_dict(self):
        return {"teacher": self.name}

    def load_state_dict(self, state, model):
        """On resume, the teacher is reloaded from its snapshot file: the exact weights it was distilled from."""
        if state.get("teacher"):
            self.set(state["teacher"], member_weights(self.cfg, self.track, state["teacher"]), model)


class MixtureTeacher(PreviousSnapshot):
    """distill_teacher=mixture: the learned prior over every earlier snapshot of the trajectory at distill_teacher_k
    members (prior.select on their fitness log-probs, scored once per snapshot). Frozen copies are reused."""

    def __init__(self, cfg, track, data, env):
        super().__init__(cfg, track, data, env)
        self.fitness = data["fitness"]
        self.members = []         # [(name, weight, frozen model, its forward)]
        self.fitness_scores = {}  # each snapshot's fitness log-probs, for the prior

    @property
    def forwards(self):
        return len(self.members)

    def targets(self, x):
        return [fwd(x) for _, _, _, fwd in self.members], [w for _, w, _, _ in self.members]

    def at_snapshot(self, name, weights, model, active):
        # log p(y | prefix) at every scored position of the fitness split, on every rank of the group alike (a few
        # windows: cheaper than gathering)
        self.fitness_scores[name] = score_windows(model, self.fitness, eval_windows(self.fitness, self.cfg.seq_len), self.device,
                                                  self.cfg.eval_batch_size)
        if active:
            here = {name: weights}
            self.set_members(self.choose(), lambda n: here[n] if n in here else member_weights(self.cfg, self.track, n), model)

    def choose(self):
        names = list(self.fitness_scores)
        scores = np.stack([self.fitness_scores[n].double().numpy() for n in names])
        idx, wk = prior.select(scores, self.cfg.distill_teacher_k)
        keep = wk > 1e-3  # a member the prior gives (almost) nothing would cost a forward pass for nothing
        return [(names[i], float(x)) for i, x in zip(idx[keep], wk[keep] / wk[keep].sum())]

    def set_members(self, chosen, load_weights, model):
        """chosen: [(name, weight)]; load_weights(name) -> its weights."""
        models = [(m, fwd) for _, _, m, fwd in self.members]
        models += [frozen_copy(model, self.cfg.compile) for _ in range(len(chosen) - len(models))]
        for (name, _), (m, _) in zip(chosen, models):
            m.load_state_dict({k: v.to(self.device) for k, v in load_weights(name).items()})
        self.members = [(name, w, m, fwd) for (name, w), (m, fwd) in zip(chosen, models)]
        self.name = "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in chosen) + ")"

    def state_dict(self):
        return {"teacher": self.name, "mixture": [[n, w] for n, w, _, _ in self.members],
                "fitness": dict(self.fitness_scores)}

    def load_state_dict(self, state, model):
        self.fitness_scores = dict(state["fitness"])
        if state["mixture"]:
            self.set_members([(n, w) for n, w in state["mixture"]], lambda n: member_weights(self.cfg, self.track, n), model)


def frozen_copy(model, compile):
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    return copy_, (torch.compile(copy_) if compile else copy_)


def member_weights(cfg, track, name):
    path = Path(cfg.out_dir) / "members" / f"{name}.pt"
    return read_member(path, name, "teacher snapshot",
                       fix=f"the run cannot continue distilling from it: restore the file from a backup, or "
                           f"delete {Path(cfg.out_dir) / f'track{track}'} to retrain this trajectory")["model"]


TEACHERS = {"previous": PreviousSnapshot, "mixture": MixtureTeacher}


# -----------------------------------------------------------------------------------------------------
class Q0Plan:
    """The plan train.py's loop runs for mode=q0 and mode=chain (its protocol: train.py, above SinglePlan)."""

    def __init__(self, cfg, track, model, data, env):
        self.cfg, self.track, self.model = cfg, track, model  # the model: to copy as a teacher on resume
        self.loader = train.epoch_loader(cfg, track, data)
        L = round(cfg.epochs_per_cycle * self.loader.steps_per_epoch)
        self.cycle_ends = [c * L for c in range(1, cfg.num_cycles + 1)]  # the schedule: where each cycle ends
        self.total_steps, self.save_steps = self.cycle_ends[-1], self.cycle_ends
        self.teacher = TEACHERS[cfg.distill_teacher](cfg, track, data, env)
        self.device = env["device"]
        # compiled, the softmaxes and the KL fuse: eager, each is its own pass over (B, T, V) fp32 (0.8 GB at 1.8B)
        self.distill_loss = torch.compile(distill_loss) if cfg.compile else distill_loss

    def multipliers(self, step):
        c = self.cfg
        cycle = bisect.bisect_right(self.cycle_ends, step)  # 0-based: the cycle this step is in
        start = self.cycle_ends[cycle - 1] if cycle else 0
        L, s = self.cycle_ends[cycle] - start, step - start
        lr = lr_multiplier(s, L, c.lr_floor, c.cycle_shape)
        wd = 1.0 if c.constant_wd else wd_multiplier(lr, c.lr_floor, c.wd_floor)
        warm = c.first_cycle_warmup_steps and (cycle == 0 or c.mode == "chain") and s < c.first_cycle_warmup_steps
        return (lr * (s + 1) / c.first_cycle_warmup_steps if warm else lr), wd

    def loss(self, model, batch):
        x, y = batch
        if self.teacher.name is None:
            return -model(x, y).mean()
        z_s = model(x)  # (B, T, V) through DDP/compile, so gradients sync as usual
        with torch.no_grad():
            z_t, w = self.teacher.targets(x)
        return self.distill_loss(z_s, z_t, y, self.cfg.distill_alpha, self.cfg.distill_temperature, w)

    def after_step(self, model, step):
        self.teacher.after_step(model)

    def at_save(self, model, step, save):
        """A cycle end: snapshot, teacher, noise (the module docstring). -> True when the optimizer starts afresh."""
        c = self.cfg
        cycle = self.cycle_ends.index(step) + 1  # 1-based snapshot index
        name, epochs = f"t{self.track}-c{cycle:03d}", cycle * c.epochs_per_cycle
        weights = save(dict(name=name, mode=c.mode, track=self.track, cycle=cycle, seed=c.seed + self.track,
                            epochs=epochs, budget_epochs=c.num_trajectories * epochs, teacher=self.teacher.name))
        if cycle == c.num_cycles:
            return False
        self.teacher.at_snapshot(name, weights, model, active=cycle >= c.distill_after_cycles)
        gen = torch.Generator(device=self.device).manual_seed((c.seed + self.track) * 10_007 + cycle)
        if c.mode == "chain":  # a fresh model from scratch: new init, no optimizer memory
            model.init_weights(generator=gen)
            return True
        perturb_(model, perturb_scale(cycle, c.num_cycles, c.perturb_scale_start, c.perturb_scale_end), gen)
        return False

    def teacher_forwards(self):
        return self.teacher.forwards

    def state_dict(self):
        return self.teacher.state_dict()

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state, self.model)


def teachers_in_memory(cfg):
    """Frozen model copies a rank holds beside the one it trains (for the memory estimate)."""
    if cfg.mode == "student":
        return 0 if cfg.teacher_topk else cfg.teacher_k
    if max(1, cfg.distill_after_cycles) >= cfg.num_cycles:
        return 0
    return cfg.distill_teacher_k if cfg.distill_teacher == "mixture" else 1


def refuse_more_cycles(was, cfg):
    """A finished (or unfinished) run may be extended on resume, --num_cycles larger, when its first cycles are then
    exactly those of the longer run: its last cycle end skipped the teacher and the noise (Q0Plan.at_save), so no
    noise schedule (it spans num_cycles), no chain re-init, and no teacher due at that cycle end. -> None, or why not."""
    if was["mode"] != "q0":
        return "mode=chain re-initialises at every cycle end but the last"
    if was["perturb_scale_start"] or was["perturb_scale_end"]:
        return "the perturbation noise's schedule spans num_cycles, so every cycle end's noise would change"
    first_teacher = max(1, was["distill_after_cycles"])  # the first cycle end whose snapshot teaches
    if was["distill_teacher"] == "previous" and first_teacher <= was["num_cycles"]:
        return f"the run's last snapshot (cycle {was['num_cycles']}) was never made a teacher"
    if was["distill_teacher"] == "mixture" and first_teacher < cfg.num_cycles:
        return "the mixture teacher scores every snapshot on fitness, and the run's last one was not"
    return None


def make_plan(cfg, track, model, data, env):
    if cfg.mode == "student":
        import student  # it imports this file (the losses); only a student run needs it
        return student.StudentPlan(cfg, track, model, data, env)
    return Q0Plan(cfg, track, model, data, env)


def main(argv):
    with runtime.session(argv) as s:
        cfg = s["cfg"] = load_config(Q0Config, argv, __doc__, ("q0", "chain", "student"))
        data = load_data(cfg)
        need, spe = train.validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), len(data["train"]))
        validate(cfg, need, spe)
        env = setup_distributed(cfg)
        prepare_run_dir(cfg, env, data, train.RESUME_SAFE_KEYS | set(train.RESUME_TUNABLE_KEYS),
                        grow_keys={"num_cycles": lambda was: refuse_more_cycles(was, cfg)})
        if env["rank"] == 0:
            print(train.describe_setup(cfg, env, data, teachers_in_memory(cfg)))
            print(describe_budget(cfg))
        for track in env["my_tracks"]:  # one model in memory at a time
            train.train_track(cfg, track, env, data, make_plan)
        if env["rank"] == 0:
            print(f"done: outputs in {cfg.out_dir}/ (config.json, track*/log.jsonl, members/*.pt); next: python eval.py {cfg.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
