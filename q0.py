"""
q0.py: train a q0 population (primitives 1 and 2 of the q0 paper, arXiv 2606.03938, and the authors' reference
script, github.com/qlabs-eng/slowrun unlimited/train.py): parallel cyclic trajectories with snapshots and chain
distillation. The loop, checkpoints and process groups are train.py's; this file gives it one plan per trajectory:
`multipliers(step)` (the schedule), `loss(model, x, y)`, `on_boundary(track, step)` (snapshot, teacher, noise)
and a small state dict for checkpoints. Then `python eval.py RUN` scores the members and fits the prior (prior.py).

Launch:
    python q0.py configs/quickstart.py                                          # CPU, minutes
    python q0.py configs/shakespeare_q0.py --seed=2                             # --key=value overrides; --help lists every key
    torchrun --standalone --nproc_per_node=2 q0.py configs/shakespeare_q0.py --num_trajectories=2   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 q0.py configs/fineweb_1p8b_q0.py --num_trajectories=1  # one 8-GPU node
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 q0.py configs/fineweb_1p8b_q0.py     # 5 nodes: one trajectory each
    ... add --resume=True to continue a killed run exactly where its checkpoints left it.

Primitive 1, cyclic schedule. A trajectory runs `num_cycles` cycles of L = epochs_per_cycle x
steps_per_epoch steps. At step s of a cycle (s = 0 ... L-1), with f = lr_floor, w = wd_floor:
    linear (sawtooth):  lr_mult(s) = f + (1 - f) * (1 - s / L)
    cosine:             lr_mult(s) = f + (1 - f) * 0.5 * (1 + cos(pi * s / L))
    wd_mult(s) = w + (1 - w) * (1 - lr_mult(s)) / (1 - f)        (1 when constant_wd)
so the LR is at its peak and the WD at w x base at a cycle's start, and the LR falls towards f x peak
while the WD rises towards 1 x base at its end. At each cycle end: save the snapshot (a population
member, with its manifest row), then add noise N(0, (scale_c * std(W))^2) to every weight tensor W,
scale_c cosine-decayed from perturb_scale_start (first snapshot) to perturb_scale_end (last).
Optimizer state is kept across cycles. P trajectories (seeds seed + i) run in parallel process groups.

Primitive 2, chain distillation. From cycle `distill_after_cycles` on, the teacher is the previous
snapshot of the same trajectory (taken before the noise): frozen, eval mode, no grad, run online on
the same micro-batch. Per token, with student logits z_s, teacher logits z_t, target y:
    loss = (1 - a) * CE(z_s, y) + a * T^2 * KL( p_t || softmax(z_s / T) ),   p_t = softmax(z_t / T)
distill_teacher="mixture" (not in the reference) makes the teacher the population's own ensemble instead: the
learned prior (EM on the fitness split, prior.py) over all earlier snapshots of the trajectory, its top
distill_teacher_k members renormalised, p_t = sum_k w_k softmax(z_k / T). Each snapshot's fitness log-probs are
scored once when it is saved; the teacher costs K forward passes per step.

mode=chain is the strong baseline of the Slowrun history from the same machinery: at each cycle end the
model is re-initialised (fresh optimizer state, warmup again) instead of perturbed, so every member is a
full model trained from scratch against its predecessor.

mode=student turns a finished population back into one model: it trains for `epochs` (warmup + cosine) against the
learned-prior mixture of `teacher_run`'s top `teacher_k` members with the same distill_loss (K teacher forwards per
step), from scratch or from the prior's top member, and saves it as the member "student" (StudentPlan):
    python eval.py runs/quickstart && python q0.py configs/quickstart.py --mode=student \
        --teacher_run=runs/quickstart --epochs=32 --distill_alpha=0.9 --distill_temperature=1.0 --out_dir=runs/student
With teacher_topk = k > 0 the mixture is computed once instead, its top k per token stored in a memory-mapped file
(TeacherFile), and the student trains from it at one forward per step (loss: topk_distill_loss).
"""
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import prior
import train
from common import (UserError, array_intact, autocast, eval_rows, load_member, read_json, read_member, save_array,
                    score_windows, window_batches, write_json)


# -----------------------------------------------------------------------------------------------------
# defaults: train.py's keys (data, model, optimizer, logging) plus these; configs/*.py and --key=value override
@dataclass
class Q0Config(train.Config):
    mode: str = "q0"                 # q0 | chain (each member re-initialised: the sequential-chain baseline) | student
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
    distill_after_cycles: int = 8    # cycles trained without a teacher; the snapshot of cycle k teaches cycle k+1
    distill_alpha: float = 0.45      # loss = (1-a) CE + a T^2 KL(teacher || student)
    distill_temperature: float = 1.2  # T
    distill_teacher: str = "previous"  # previous snapshot (reference) | mixture: the prior's top-K of earlier snapshots
    distill_teacher_k: int = 4       # mixture teacher: members (K teacher forwards per step)
    # mode=student: one model distilled from a finished run's learned-prior mixture, for `epochs` (warmup + cosine)
    teacher_run: str = ""            # student: the run folder (scored, with prior.json from eval.py) whose mixture teaches
    teacher_k: int = 4               # student: the prior's top K members of teacher_run, weights renormalised
    student_init: str = "scratch"    # student: scratch | best (start from the prior's top member; same model_size)
    teacher_topk: int = 0            # student: 0 = K teacher forwards per step; k = the mixture's top k per token, computed once into out_dir/teacher_topk/
    teacher_topk_renormalise: bool = False  # student, ablation: rescale the top k to sum 1 instead of a bucket for the rest

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


def topk_distill_loss(student_logits, teacher_ids, teacher_probs, targets, alpha, temperature, renormalise=False):
    """distill_loss with the teacher stored as its k likeliest tokens per position (ids j, probabilities p_j): the KL
    over the k tokens plus one bucket for all the others, r = 1 - sum_j p_j, which the student gives
    q_r = 1 - sum_j q_j (q = softmax(z_s / T)):
        KL = sum_j p_j (log p_j - log q_j) + r (log r - log q_r)
    the exact KL between the two distributions seen at that grain; with k = V it is distill_loss. renormalise=True
    (an ablation) drops the bucket and rescales p to sum 1 instead, which makes the teacher over-confident."""
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probs.float()
    if renormalise:
        p = p / p.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - p * log_q.gather(-1, teacher_ids)).sum(-1)
    if not renormalise:
        log_q_rest = torch.logsumexp(log_q.scatter(-1, teacher_ids, float("-inf")), dim=-1)
        r = torch.where(torch.isfinite(log_q_rest), (1 - p.sum(-1)).clamp_min(0), 0.0)  # k = V: no bucket
        kl = kl + torch.xlogy(r, r) - torch.where(r > 0, r * log_q_rest, 0.0)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl.mean()


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
    return (f"{cfg.mode} budget: {cfg.num_trajectories} trajectories x {cfg.num_cycles} cycles x {cfg.epochs_per_cycle} "
            f"epochs/cycle = {total:g} epochs, {cfg.num_trajectories * cfg.num_cycles} snapshots; {distill}")


class Q0Plan:
    """The per-track plan train.py's loop runs for mode=q0 and mode=chain (see the module docstring)."""

    def __init__(self, t):
        c = self.cfg = t.cfg
        self.cycle_steps = round(c.epochs_per_cycle * t.spe)
        self.total_steps = c.num_cycles * self.cycle_steps
        self.boundaries = {k * self.cycle_steps for k in range(1, c.num_cycles + 1)}
        self.track, self.device, self.model = t.track, t.env["device"], t.model  # the model: to copy as a teacher
        self.teacher, self.teacher_fwd, self.teacher_name = None, None, None
        self.mixture = []         # distill_teacher="mixture": [(name, weight, frozen model, its forward)]
        self.fitness_scores = {}  # distill_teacher="mixture": each snapshot's fitness log-probs, for the prior

    def multipliers(self, step):
        c = self.cfg
        cycle, s = divmod(step, self.cycle_steps)
        lr = lr_multiplier(s, self.cycle_steps, c.lr_floor, c.cycle_shape)
        wd = 1.0 if c.constant_wd else wd_multiplier(lr, c.lr_floor, c.wd_floor)
        warm = c.first_cycle_warmup_steps and (cycle == 0 or c.mode == "chain") and s < c.first_cycle_warmup_steps
        return (lr * (s + 1) / c.first_cycle_warmup_steps if warm else lr), wd

    def loss(self, model, x, y):
        if self.teacher is None and not self.mixture:
            return -model(x, y).mean()
        z_s = model(x)  # (B, T, V) through DDP/compile, so gradients sync as usual
        with torch.no_grad():
            if self.mixture:
                z_t, w = [fwd(x) for _, _, _, fwd in self.mixture], [w for _, w, _, _ in self.mixture]
            else:
                z_t, w = self.teacher_fwd(x), None
        return distill_loss(z_s, z_t, y, self.cfg.distill_alpha, self.cfg.distill_temperature, w)

    def teacher_forwards(self):
        """Teacher forward passes per training forward (for MFU): 0, 1, or the mixture's K."""
        return len(self.mixture) or int(self.teacher is not None)

    def frozen_copy(self):
        model = copy.deepcopy(self.model).eval().requires_grad_(False)
        return model, (torch.compile(model) if self.cfg.compile else model)

    def set_teacher(self, name, state):
        """One frozen teacher copy per rank, overwritten in place at each cycle end."""
        if self.teacher is None:
            self.teacher, self.teacher_fwd = self.frozen_copy()
        self.teacher.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        self.teacher_name = name

    def mixture_members(self):
        """The prior over every snapshot scored so far (EM on their fitness log-probs), top distill_teacher_k."""
        names = list(self.fitness_scores)
        w, _ = prior.fit_em(np.stack([self.fitness_scores[n].double().numpy() for n in names]))
        idx, wk = prior.top_k(w, self.cfg.distill_teacher_k)
        keep = wk > 1e-3  # a member the prior gives (almost) nothing would cost a forward pass for nothing
        return [(names[i], float(x)) for i, x in zip(idx[keep], wk[keep] / wk[keep].sum())]

    def set_mixture(self, chosen, load_state):
        """chosen: [(name, weight)]; load_state(name) -> its weights. Frozen copies are reused across cycles."""
        models = [(m, fwd) for _, _, m, fwd in self.mixture]
        models += [self.frozen_copy() for _ in range(len(chosen) - len(models))]
        for (name, _), (m, _) in zip(chosen, models):
            m.load_state_dict({k: v.to(self.device) for k, v in load_state(name).items()})
        self.mixture = [(name, w, m, fwd) for (name, w), (m, fwd) in zip(chosen, models)]
        self.teacher_name = "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in chosen) + ")"

    def fitness_logprobs(self, t):
        """log p(y | prefix) of the model at every scored position of the fitness split (eval_rows windows), on
        every rank of the group alike (a few windows: cheaper than gathering)."""
        tokens = t.data["fitness"]
        return score_windows(t.model, tokens, eval_rows(tokens, self.cfg.seq_len), self.device)

    def on_boundary(self, t, step):
        c, cycle = self.cfg, step // self.cycle_steps  # cycles completed, 1-based snapshot index
        name = f"t{self.track}-c{cycle:03d}"
        epochs = cycle * c.epochs_per_cycle
        state = t.save_member(dict(name=name, mode=c.mode, track=self.track, cycle=cycle, seed=t.seed, epochs=epochs,
                                   budget_epochs=c.num_trajectories * epochs, teacher=self.teacher_name,
                                   train_loss=t.last_loss))
        if cycle == c.num_cycles:
            return
        if c.distill_teacher == "mixture":
            self.fitness_scores[name] = self.fitness_logprobs(t)
        if cycle >= c.distill_after_cycles and c.distill_teacher == "mixture":
            here = {name: state}
            self.set_mixture(self.mixture_members(), lambda n: here[n] if n in here else self.member_state(n))
        elif cycle >= c.distill_after_cycles:  # the next cycle distils from this snapshot, exactly as saved
            self.set_teacher(name, state)
        gen = torch.Generator(device=self.device).manual_seed(t.seed * 10_007 + cycle)
        if c.mode == "chain":  # a fresh model from scratch: new init, no optimizer memory
            t.model.init_weights(generator=gen)
            t.reset_optimizer_state()
        else:
            perturb_(t.model, perturb_scale(cycle, c.num_cycles, c.perturb_scale_start, c.perturb_scale_end), gen)
        t.broadcast_weights()

    def state_dict(self):
        if self.cfg.distill_teacher != "mixture":
            return {"teacher": self.teacher_name}
        return {"teacher": self.teacher_name, "mixture": [[n, w] for n, w, _, _ in self.mixture],
                "fitness": dict(self.fitness_scores)}

    def member_state(self, name):
        path = Path(self.cfg.out_dir) / "members" / f"{name}.pt"
        return read_member(path, name, "teacher snapshot",
                           fix=f"the run cannot continue distilling from it: restore the file from a backup, or "
                               f"delete {Path(self.cfg.out_dir) / f'track{self.track}'} to retrain this trajectory")["model"]

    def load_state_dict(self, state):
        """On resume, reload the teacher from its snapshot file(s): the exact weights it was distilled from."""
        if "mixture" in state:
            self.fitness_scores = dict(state["fitness"])
            if state["mixture"]:
                self.set_mixture([(n, w) for n, w in state["mixture"]], self.member_state)
        elif state.get("teacher"):
            self.set_teacher(state["teacher"], self.member_state(state["teacher"]))


class TeacherFile:
    """The cheap teacher for a large K (teacher_topk = k > 0, issue 16): the mixture is computed once over a fixed grid
    of windows of the train split (window w = tokens [wT, wT + T], stride T from the first token) and its k likeliest
    tokens per position are stored beside the student, in out_dir/teacher_topk/: part i holds windows i, i+P, i+2P, ...
    (P = the group size that made the file) as ids.i.npy (uint16 while the vocab fits) and probs.i.npy (float16), 4k
    bytes per token (12.8 GB for 100M tokens at k = 32), each with its sha256 beside it. Group rank r computes parts
    r, r + size, ..., so the K forwards are split over the ranks; a part is held in host memory until written, and one
    that is missing or fails its sha256 is computed again at the next start. The student then trains from the file
    with one forward per step. It is also the student's loader: the grid is shuffled each epoch by (seed, track,
    epoch) but not re-chunked as EpochLoader does (a stored target belongs to its window); micro_batch is
    EpochLoader's, and targets() are the stored top k of the micro-batch drawn last."""

    def __init__(self, t, load_teachers, description):
        """load_teachers() -> [(name, weight, model)]: called only when a part has to be computed."""
        c, env = t.cfg, t.env
        self.tokens, self.T, self.R, self.key = t.data["train"], c.seq_len, c.batch_tokens // c.seq_len, (t.seed, t.track)
        self.windows_per_epoch = (len(self.tokens) - 1) // c.seq_len
        self.steps_per_epoch = self.windows_per_epoch // self.R
        self.dir, self.k, self.temperature = Path(c.out_dir) / "teacher_topk", c.teacher_topk, c.distill_temperature
        self.vocab = t.model.cfg.vocab_size  # the teachers' too: load_teachers checks they share the student's data
        if self.k > self.vocab:
            raise UserError(f"teacher_topk={self.k} is more than the teachers' vocab ({self.vocab}): use at most "
                            f"{self.vocab}", status=2)
        spec = dict(teacher=description, k=self.k, temperature=self.temperature, seq_len=c.seq_len,
                    windows=self.windows_per_epoch, train_sha256=t.data["train_meta"]["sha256"])
        if env["group_rank"] == 0 and not (self.dir / "meta.json").exists():
            write_json(dict(spec, parts=env["group_size"]), self.dir / "meta.json")
        env["barrier"]()
        meta = read_json(self.dir / "meta.json", "teacher file record", f"delete {self.dir}: it is computed again")
        if {key: meta.get(key) for key in spec} != spec:
            raise UserError(f"{self.dir} holds the targets of another teacher ({meta.get('teacher')}, k {meta.get('k')}, "
                            f"T {meta.get('temperature')}) than this student's ({description}, k {self.k}, T "
                            f"{self.temperature}): delete it (was prior.json refit?) and re-run; it is computed again")
        self.parts = meta["parts"]
        path, teachers = (lambda kind, i: self.dir / f"{kind}.{i}.npy"), None
        for i in range(env["group_rank"], self.parts, env["group_size"]):
            if not (array_intact(path("ids", i)) and array_intact(path("probs", i))):
                teachers = teachers or load_teachers()
                self.compute_part(i, teachers, t.env["device"], c.micro_batch_size, path)
        env["barrier"]()
        self.ids = [np.load(path("ids", i), mmap_mode="r") for i in range(self.parts)]
        self.probs = [np.load(path("probs", i), mmap_mode="r") for i in range(self.parts)]
        self.epoch, self.rows = None, None

    @torch.no_grad()
    def compute_part(self, i, teachers, device, batch_size, path):
        t0, T, windows = time.time(), self.T, range(i, self.windows_per_epoch, self.parts)
        shape = (len(windows), T, self.k)
        ids, probs = np.empty(shape, np.uint16 if self.vocab <= 2 ** 16 else np.int32), np.empty(shape, np.float16)
        n, kept = 0, 0.0
        for rows in window_batches(self.tokens, [(w * T, w * T + T + 1) for w in windows], batch_size, device):
            with autocast(device):
                logits = [m(rows[:, :-1]) for _, _, m in teachers]
            top = mixture_log_probs(logits, [w for _, w, _ in teachers], self.temperature).topk(self.k, dim=-1)
            p = top.values.exp()
            probs[n:n + len(rows)], ids[n:n + len(rows)] = p.cpu().numpy(), top.indices.cpu().numpy()
            kept, n = kept + p.sum(-1).sum().item(), n + len(rows)
        save_array(ids, path("ids", i))
        save_array(probs, path("probs", i))
        print(f"teacher file part {i} of {self.parts}: {n * T:,} tokens, top {self.k} hold {kept / max(1, n * T):.4f} of "
              f"the mixture's probability on average; {time.time() - t0:.1f} s", flush=True)

    def micro_batch(self, step, micro_index, micro_rows, device):
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([*self.key, epoch]).permutation(self.windows_per_epoch)
        row0 = b * self.R + micro_index * micro_rows
        self.rows, self.device = self.order[row0:row0 + micro_rows], device
        rows = np.stack([self.tokens[w * self.T: w * self.T + self.T + 1] for w in self.rows])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def targets(self):
        """The stored (ids, probabilities) of the micro-batch drawn last: (B, T, k) each, int64 and float32."""
        at = lambda arrays, w: arrays[w % self.parts][w // self.parts]
        ids = np.stack([at(self.ids, w) for w in self.rows]).astype(np.int64)
        probs = np.stack([at(self.probs, w) for w in self.rows]).astype(np.float32)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(probs).to(self.device)


class StudentPlan(train.SinglePlan):
    """mode=student (issue 16): one model trained for `epochs` on the train split against the learned-prior mixture of
    a finished run, loss = (1 - a) CE + a T^2 KL(p_mix || softmax(z_s / T)), p_mix = sum_k w_k softmax(z_k / T) over
    the prior's top teacher_k members (distill_loss with a list of teachers, as the mixture teacher of Q0Plan). The
    schedule is the single model's (warmup + cosine); the student is saved as a normal member, "student", which
    eval.py scores like any other. The teachers are rebuilt from prior.json and the member files on resume."""

    def __init__(self, t):
        c, run = t.cfg, Path(t.cfg.teacher_run)
        entry = read_json(run / "prior.json", "teacher prior", f"rewrite it with python eval.py {run}")["per_k"]
        entry = entry.get(str(c.teacher_k)) or entry[max(entry, key=int)]  # K past the population: all of it
        pairs, meta = list(zip(entry["members"], entry["weights"])), t.data["meta"]

        def load_teacher(name):
            model, ckpt = load_member(run / "members" / f"{name}.pt", t.env["device"])
            if (ckpt["data"]["tokenizer"], ckpt["data"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
                raise UserError(f"teacher {name} of {run} was trained on {ckpt['data']['tokenizer']} tokens (vocab "
                                f"{ckpt['data']['vocab_size']}), the student's data_dir holds {meta['tokenizer']} (vocab "
                                f"{meta['vocab_size']}): use the teacher run's data_dir")
            return model.requires_grad_(False)
        load_all = lambda: [(n, w, load_teacher(n)) for n, w in pairs]
        self.description = "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in pairs) + f") of {run}"
        self.file = TeacherFile(t, load_all, self.description) if c.teacher_topk else None
        if self.file:  # the student's data is the file's window grid; the file holds what the K models would give
            t.loader, t.spe = self.file, self.file.steps_per_epoch
        self.teachers = [(n, w, None) for n, w in pairs] if self.file else load_all()
        super().__init__(t)
        if c.student_init == "best":  # the prior's heaviest member; on resume the checkpoint's weights replace these
            best = self.teachers[0][2] if self.teachers[0][2] is not None else load_teacher(pairs[0][0])
            try:
                t.model.load_state_dict(best.state_dict())
            except RuntimeError:
                raise UserError(f"student_init=best needs the student's model_size to be the teacher's "
                                f"({best.cfg}); use student_init=scratch for another size") from None

    def loss(self, model, x, y):
        z_s = model(x)
        if self.file:
            return topk_distill_loss(z_s, *self.file.targets(), y, self.cfg.distill_alpha, self.cfg.distill_temperature,
                                     self.cfg.teacher_topk_renormalise)
        with torch.no_grad():
            z_t = [m(x) for _, _, m in self.teachers]
        return distill_loss(z_s, z_t, y, self.cfg.distill_alpha, self.cfg.distill_temperature,
                            [w for _, w, _ in self.teachers])

    def teacher_forwards(self):
        return 0 if self.file else len(self.teachers)

    def on_boundary(self, t, step):
        t.save_member(dict(name="student", mode="student", track=0, cycle=0, seed=t.seed, epochs=self.cfg.epochs,
                           budget_epochs=self.cfg.epochs, teacher=self.description, train_loss=t.last_loss))


def main(argv):
    plan = lambda t: StudentPlan(t) if t.cfg.mode == "student" else Q0Plan(t)
    train.main(argv, Q0Config, __doc__, ("q0", "chain", "student"), plan, validate, describe_budget)


if __name__ == "__main__":
    main(sys.argv[1:])
