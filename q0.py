"""
q0.py: train a q0 population (primitives 1 and 2 of the q0 paper, arXiv 2606.03938, and the authors' reference
script, github.com/qlabs-eng/slowrun unlimited/train.py): parallel cyclic trajectories with snapshots and chain
distillation. The loop is train.py's (`train.train_track`); this file gives it one plan per trajectory: the
schedule, the loss, and what happens at each cycle end. Then `python eval.py RUN` scores the members and fits the
learned prior (primitive 3, prior.py).

    python q0.py configs/quickstart.py                                          # CPU, minutes
    python q0.py configs/shakespeare_q0.py --seed=2                             # flags override; --help lists every key
    python q0.py configs/shakespeare_q0.py --budget=16                          # sized by its budget: ALLOCATIONS
    torchrun --standalone --nproc_per_node=2 q0.py configs/shakespeare_q0.py --num_trajectories=2   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 q0.py configs/fineweb_1p8b_q0.py --num_trajectories=1  # one 8-GPU node
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 q0.py configs/fineweb_1p8b_q0.py     # 5 nodes: one trajectory each
    ... add --resume=True to continue a killed run exactly where it stopped; with a larger --num_cycles it is
    extended (bit for bit the longer run, where config.refuse_more_cycles allows it).

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
                 perturb_scale_start (first snapshot) to perturb_scale_end (last).

Primitive 2, chain distillation. The teacher is the previous snapshot of the same trajectory (taken before the
noise): frozen, eval mode, no grad, run online on the same micro-batch. Per token, with student logits z_s,
teacher logits z_t, target y:
    loss = (1 - a) * CE(z_s, y) + a * T^2 * KL( p_t || softmax(z_s / T) ),   p_t = softmax(z_t / T)

Beyond the reference: student.py distils a finished population into one model with the same loss (its teacher the
learned prior's mixture); variants.py holds what was tried and did not pay at CPU scale (the sequential chain, the
population's own mixture as teacher).
"""
import bisect
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import store
import train


# -----------------------------------------------------------------------------------------------------
# defaults: train.py's keys (data, model, optimizer, logging) plus these; configs/*.py and --key=value override
@dataclass
class Q0Config(train.Config):
    mode: str = "q0"                 # q0 (variants.py: chain; student.py: student)
    num_trajectories: int = 1        # P parallel trajectories
    num_cycles: int = 4              # cycles (= snapshots) per trajectory
    epochs_per_cycle: float = 2.0    # epochs of the train split per cycle
    cycle_shape: str = "linear"      # linear (sawtooth) | cosine
    first_cycle_warmup_steps: int = 0  # linear LR warmup at the start of the first cycle
    lr_floor: float = 0.08           # LR multiplier at a cycle's end
    wd_floor: float = 0.7            # WD multiplier at a cycle's start (LR peak)
    constant_wd: bool = False        # ablation: WD multiplier fixed at 1
    perturb_scale_start: float = 0.25  # noise std after a snapshot, x each tensor's std, cosine-decayed
    perturb_scale_end: float = 0.05    # ... to this at the last cycle; both 0 = no noise
    distill_after_cycles: int = 8    # distil from cycle max(1, this) + 1 on: the snapshot of cycle k teaches k+1
    distill_alpha: float = 0.45      # loss = (1-a) CE + a T^2 KL(teacher || student)
    distill_temperature: float = 1.2  # T
    budget: float = 0                # > 0: epochs to spend; sets num_trajectories, num_cycles, epochs_per_cycle
    MODES = ("q0",)

    def num_tracks(self):
        return self.num_trajectories

    def resolve(self):
        """budget > 0: P and the cycle length of its row of ALLOCATIONS, then the nearest number of cycles that spends
        the budget exactly (the cycle stretched to fit; at the budgets measured, the row's own length)."""
        if self.budget:
            _, self.num_trajectories, cycle = max(a for a in ALLOCATIONS if a[0] <= self.budget)
            self.num_cycles = max(1, round(self.budget / (self.num_trajectories * cycle)))
            self.epochs_per_cycle = self.budget / (self.num_trajectories * self.num_cycles)


# how to spend a budget of B epochs: the rows (from B, trajectories P, epochs per cycle), the allocation picked on
# cross-fitted fitness at B = 2, 4, 8, 16, 32, 64 (BENCHMARKS.md 1k: byte-level Shakespeare, the 0.88M-parameter model);
# a B between two measured budgets takes the row of the lower one, B > 64 the last row (not measured there)
ALLOCATIONS = ((0, 1, 2.0), (4, 1, 4.0), (16, 1, 2.0))  # at 2 and 4 epochs one cycle; 0.5-4 epochs within 0.002 from 32


# -----------------------------------------------------------------------------------------------------
# the formulas of the module docstring
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


@torch.no_grad()
def perturb_(model, scale, generator):
    """w <- w + N(0, (scale * std(w))^2), every tensor, from a generator seeded by (seed, cycle)."""
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        p.add_((noise * (scale * p.float().std())).to(p.dtype))


def distill_loss(student_logits, teacher_logits, targets, alpha, temperature, teacher_weights=None, parts=False):
    """Chain distillation, mean over tokens:
        (1 - a) * CE(z_s, y) + a * T^2 * KL( p_t || softmax(z_s / T) ),   p_t = softmax(z_t / T)
    or, for a list of teachers' logits with weights w, the mixture p_t = sum_k w_k softmax(z_k / T) (student.py).
    T^2 keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al. 2015).
    parts=True: -> (loss, CE, KL), the two parts for the log, detached (KL None at a = 0)."""
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    if alpha == 0:
        return (ce, ce.detach(), None) if parts else ce
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    if teacher_weights is None:
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    else:
        log_p_t = mixture_log_probs(teacher_logits, teacher_weights, temperature)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    loss = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return (loss, ce.detach(), kl.detach()) if parts else loss


def mixture_log_probs(teacher_logits, teacher_weights, temperature):
    """log sum_k w_k softmax(z_k / T), accumulated one teacher at a time: never K (B, T, V) tensors at once."""
    log_p = None
    for z, w in zip(teacher_logits, teacher_weights):
        lp = F.log_softmax(z.detach().float() / temperature, dim=-1) + math.log(w)
        log_p = lp if log_p is None else torch.logaddexp(log_p, lp)
    return log_p


# -----------------------------------------------------------------------------------------------------
class PreviousSnapshot:
    """The reference's teacher: the trajectory's previous snapshot, one frozen copy per rank, overwritten in place.
    A teacher has a name (None until there is one), its forwards per step, targets(x) -> (logits, weights or None),
    at_snapshot() at each cycle end, and its state for the checkpoint."""

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

    def state_dict(self):
        return {"teacher": self.name}

    def load_state_dict(self, state, model):
        """On resume, the teacher is reloaded from its snapshot file: the exact weights it was distilled from."""
        if state.get("teacher"):
            self.set(state["teacher"], member_weights(self.cfg, self.track, state["teacher"]), model)


def frozen_copy(model, compile):
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    return copy_, (torch.compile(copy_) if compile else copy_)


def member_weights(cfg, track, name):
    path = Path(cfg.out_dir) / "members" / f"{name}.pt"
    return store.read_member(path, name, "teacher snapshot",
                             fix=f"the run cannot continue distilling from it: restore the file from a backup, or "
                                 f"delete {Path(cfg.out_dir) / f'track{track}'} to retrain this trajectory")["model"]


# -----------------------------------------------------------------------------------------------------
class Q0Plan(train.Plan):
    """The plan train.py's loop runs for one trajectory (its protocol: train.Plan)."""

    def __init__(self, cfg, track, model, data, env):
        super().__init__(cfg, track, model, data, env)
        self.model = model  # to copy as a teacher on resume
        L = round(cfg.epochs_per_cycle * self.loader.steps_per_epoch)
        self.cycle_ends = [c * L for c in range(1, cfg.num_cycles + 1)]  # the schedule: where each cycle ends
        self.total_steps, self.save_steps = self.cycle_ends[-1], self.cycle_ends
        self.teacher = PreviousSnapshot(cfg, track, data, env)
        self.device = env["device"]
        # compiled, the softmaxes and the KL fuse: eager, each is its own pass over (B, T, V) fp32 (0.8 GB at 1.8B)
        self.distill_loss = torch.compile(distill_loss) if cfg.compile else distill_loss

    def cycle_of(self, step):
        """-> (the cycle step `step` (0-based) is in, 0-based; the step it starts at; its length L)."""
        cycle = bisect.bisect_right(self.cycle_ends, step)
        start = self.cycle_ends[cycle - 1] if cycle else 0
        return cycle, start, self.cycle_ends[cycle] - start

    def multipliers(self, step):
        c = self.cfg
        cycle, start, L = self.cycle_of(step)
        s = step - start
        lr = lr_multiplier(s, L, c.lr_floor, c.cycle_shape)
        wd = 1.0 if c.constant_wd else wd_multiplier(lr, c.lr_floor, c.wd_floor)
        warm = c.first_cycle_warmup_steps and self.warms_up(cycle) and s < c.first_cycle_warmup_steps
        return (lr * (s + 1) / c.first_cycle_warmup_steps if warm else lr), wd

    def warms_up(self, cycle):
        return cycle == 0  # the first cycle starts from the init

    def loss(self, model, batch):
        x, y = batch
        if self.teacher.name is None:
            return -model(x, y).mean()
        z_s = model(x)  # (B, T, V) through DDP/compile, so gradients sync as usual
        with torch.no_grad():
            z_t, w = self.teacher.targets(x)
        loss, *self.parts = self.distill_loss(z_s, z_t, y, self.cfg.distill_alpha, self.cfg.distill_temperature, w, True)
        return loss

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
        return self.between_cycles(model, cycle, gen)

    def between_cycles(self, model, cycle, gen):
        """Step 3 of a cycle end: the noise. -> whether the optimizer state must start afresh (no)."""
        c = self.cfg
        perturb_(model, perturb_scale(cycle, c.num_cycles, c.perturb_scale_start, c.perturb_scale_end), gen)
        return False

    def log_fields(self, step):
        """The cycle and the step in it, the teacher, and with one the last micro-batch's CE and KL."""
        cycle, start, L = self.cycle_of(step - 1)  # step: the steps done, the last one step - 1
        fields = dict(teacher_forwards=self.teacher.forwards, cycle=cycle + 1, step_in_cycle=step - start,
                      cycle_steps=L, teacher=self.teacher.name)
        parts = zip(("ce", "kl"), getattr(self, "parts", []) if self.teacher.name else [])
        return fields | {key: float(value) for key, value in parts if value is not None}

    def state_dict(self):
        return self.teacher.state_dict()

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state, self.model)


def main(argv):
    train.main(argv, Q0Config, Q0Plan, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
