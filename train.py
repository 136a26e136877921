"""
train.py: train one model (mode=single), or the naive-ensemble baseline (mode=ensemble: `ensemble_size`
independently seeded models). q0.py runs the population (cyclic trajectories, snapshots, chain distillation) with
this same loop: it hands the loop a plan with the schedule, the loss and what to do at each cycle end.

Launch:
    python train.py configs/shakespeare_single.py                     # CPU, minutes
    python train.py configs/shakespeare_single.py --epochs=2 --seed=7  # --key=value overrides; --help lists every key
    torchrun --standalone --nproc_per_node=8 train.py configs/fineweb_1p8b_single.py     # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 train.py configs/fineweb_1p8b_ensemble.py    # members in parallel
    ... add --resume=True to continue a killed run exactly where its checkpoints left it.

Budgets are in epochs of the train split. The world is split into min(world, tracks) process groups; each
group trains its tracks (ensemble members, or q0's trajectories) one after another with DDP inside the group,
so one process runs everything sequentially with the same results as one process per track. Several ranks per
track give the same members up to fp32 reduction order: every micro-batch of the global batch is the same rows with
the same dropout masks (seeded by its place in the global batch, not by the rank) whatever the number of ranks.
Run folder: config.json, track<i>/{ckpt.pt, started.json, log.jsonl, manifest.json, lock}, members/<name>.pt.
The plan protocol (SinglePlan here; q0.Q0Plan, q0.StudentPlan): total_steps, boundaries, multipliers(step) -> (lr, wd
multipliers), loss(model, x, y), on_boundary(track, step), teacher_forwards(), state_dict(), load_state_dict().
"""
import json
import math
import os
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as gpt
from common import (UserError, atomic_write, autocast, check_disk, eval_rows, load_config, load_data, lock, member_state,
                    nbytes, prepare_run_dir, read_json, safe_load, save_member, save_torch, score_windows,
                    setup_distributed, to_host, write_json)


# -----------------------------------------------------------------------------------------------------
# defaults: override with a config file (configs/*.py, `key = value` lines) and --key=value flags
@dataclass
class Config:
    # run
    mode: str = "single"             # single | ensemble (q0.py: q0 | chain)
    out_dir: str = ""                # run folder; "" = runs/<config file name>
    resume: bool = False             # continue the run in out_dir from its checkpoints
    seed: int = 1337                 # track i: init and dropout from seed + i; data order from (seed, i, epoch)
    device: str = "auto"             # auto (cuda > mps > cpu) | cuda | mps | cpu
    compile: bool = False            # torch.compile the model (the GPU configs turn it on)
    dist_timeout_minutes: int = 180  # process-group timeout: ranks wait through checkpoints and unequal work
    # data and model
    data_dir: str = "data/pydoc-byte"  # written by prepare_data.py
    model_size: str = "tiny"         # a key of model.SIZES: tiny ... 1.8B
    seq_len: int = 128               # tokens per training window
    dropout: float = 0.0             # on the residual branches
    # batch and budget
    batch_tokens: int = 4096         # global batch: tokens per optimizer step, all ranks together
    micro_batch_size: int = 16       # sequences per rank per forward; grad accumulation is derived
    epochs: float = 4.0              # single/ensemble: epochs per model
    ensemble_size: int = 4           # ensemble: number of independently seeded members
    # optimizer: Muon on hidden matrices, AdamW on embedding and head; decoupled WD p -= lr*wd*p
    muon_lr: float = 0.02            # Muon, the blocks' 2-D matrices
    embed_lr: float = 0.2            # AdamW, the token embedding
    head_lr: float = 0.004           # AdamW, the output head
    weight_decay: float = 0.0        # base WD (q0 reference: 1.3), scaled by the schedule's WD multiplier
    embed_head_wd: bool = True       # the base WD on embedding and head too (reference); False: Muon matrices only
    adam_betas: tuple = (0.8, 0.95)  # AdamW (beta1, beta2)
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    warmup_steps: int = 0            # single/ensemble: linear warmup
    decay: str = "cosine"            # single/ensemble: cosine | linear | none
    min_lr_frac: float = 0.0         # single/ensemble: LR at the end, as a fraction of the peak
    # logging, eval, checkpoints
    log_every: int = 10              # steps between log lines
    eval_every_epochs: float = 1.0   # val (and fitness) loss; also at the end of every track; 0 = only then
    eval_tokens: int = 0             # tokens per eval split (0 = the whole split)
    ckpt_every_epochs: float = 0.5   # plus at every snapshot and at the end; 0 = only then
    async_checkpoints: bool = True   # write checkpoints on a background thread from a host-memory copy

    def num_tracks(self):
        return self.ensemble_size if self.mode == "ensemble" else 1


# keys that do not change what a run computes: they may differ on --resume
RESUME_SAFE_KEYS = {"resume", "out_dir", "device", "compile", "dist_timeout_minutes", "micro_batch_size", "log_every",
                    "eval_every_epochs", "eval_tokens", "ckpt_every_epochs", "async_checkpoints"}


def validate(cfg, world_size, train_tokens):
    """Reject a bad value by key name, with what is allowed, before anything is written."""
    def need(ok, key, allowed):
        if not ok:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: {allowed}", status=2)
    need(cfg.device in ("auto", "cuda", "mps", "cpu"), "device", "must be auto, cuda, mps or cpu")
    need(cfg.dist_timeout_minutes >= 1, "dist_timeout_minutes", "must be >= 1")
    need(cfg.model_size in gpt.SIZES, "model_size", f"must be one of {', '.join(gpt.SIZES)}")
    need(cfg.seq_len >= 2, "seq_len", "must be >= 2")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(cfg.batch_tokens >= 1, "batch_tokens", "must be >= 1")
    need(cfg.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    need(cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.ensemble_size >= 1, "ensemble_size", "must be >= 1")
    for key in ("muon_lr", "embed_lr", "head_lr", "weight_decay", "grad_clip", "warmup_steps", "eval_every_epochs",
                "eval_tokens", "ckpt_every_epochs"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    need(len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), "adam_betas", "must be two numbers in [0, 1)")
    need(cfg.decay in ("cosine", "linear", "none"), "decay", "must be cosine, linear or none")
    need(0 <= cfg.min_lr_frac <= 1, "min_lr_frac", "must be in [0, 1]")
    need(cfg.log_every >= 1, "log_every", "must be >= 1")
    tracks = cfg.num_tracks()
    n_groups = min(world_size, tracks)
    if max(world_size, tracks) % n_groups:
        key = "ensemble_size" if cfg.mode == "ensemble" else "num_trajectories"
        need(False, key, f"the world size ({world_size}) and the number of tracks ({tracks}) must divide one another")
    group_size = world_size // n_groups
    need(cfg.batch_tokens % (cfg.seq_len * cfg.micro_batch_size * group_size) == 0, "batch_tokens",
         f"must be a multiple of seq_len x micro_batch_size x ranks per track = "
         f"{cfg.seq_len} x {cfg.micro_batch_size} x {group_size}")
    steps_per_epoch = EpochLoader.num_windows(train_tokens, cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len)
    if steps_per_epoch < 1:
        raise UserError(f"the train split of {cfg.data_dir} has {train_tokens} tokens, too few for one global batch "
                        f"(batch_tokens={cfg.batch_tokens}, plus seq_len for the epoch's random window offset): lower "
                        f"batch_tokens or prepare more data")
    return need, steps_per_epoch


# -----------------------------------------------------------------------------------------------------
# data: every epoch fresh windows in a fresh order; exact position = (epoch, step in epoch)
class EpochLoader:
    """Epoch e of a track is drawn fresh from a generator seeded by (seed, track, e), as the reference re-chunks
    every epoch: the train split's documents in a random order, concatenated into one stream; a grid of windows
    of T+1 tokens at stride T starting at a random offset o in [0, T); the windows in a random order. Global batch
    b of the epoch is windows order[b*R : (b+1)*R]; micro-batch j of a step (j = group_rank * accum + a) is its
    rows j*mb ... (j+1)*mb - 1, so the global batch is the same for any number of ranks. Everything is a pure
    function of (seed, track, epoch, step): a resumed run reads exactly the batches it would have read."""

    def __init__(self, tokens, doc_starts, seq_len, rows_per_step, seed, track=0):
        self.tokens, self.T, self.R, self.key = tokens, seq_len, rows_per_step, (seed, track)
        self.starts = np.asarray(doc_starts, dtype=np.int64)
        self.lengths = np.diff(np.append(self.starts, len(tokens)))
        self.windows_per_epoch = self.num_windows(len(tokens), seq_len)
        self.steps_per_epoch = self.windows_per_epoch // rows_per_step  # validate() checked it is >= 1
        self.epoch = None

    @staticmethod
    def num_windows(n_tokens, seq_len):
        """Windows that fit whatever the offset: o + W*T + 1 <= n for every o < T."""
        return max(0, (n_tokens - seq_len) // seq_len)

    def _draw(self, epoch):
        if epoch != self.epoch:
            rng = np.random.default_rng([*self.key, epoch])
            self.epoch, self.order = epoch, rng.permutation(len(self.starts))
            self.cum = np.concatenate([[0], np.cumsum(self.lengths[self.order])])
            self.offset = int(rng.integers(self.T))
            self.window_order = rng.permutation(self.windows_per_epoch)

    def stream(self, epoch, a, b):
        """Tokens [a, b) of epoch's stream (the documents in that epoch's order, concatenated)."""
        self._draw(epoch)
        out, i = [], int(np.searchsorted(self.cum, a, side="right") - 1)
        while a < b:
            doc = self.order[i]
            lo = a - self.cum[i]
            n = min(b - a, self.lengths[doc] - lo)
            out.append(self.tokens[self.starts[doc] + lo: self.starts[doc] + lo + n])
            a, i = a + n, i + 1
        return np.concatenate(out)

    def window_starts(self, epoch, rows):
        """Stream positions of the windows at rows `rows` (a range) of epoch's window order."""
        self._draw(epoch)
        return [self.offset + int(w) * self.T for w in self.window_order[rows]]

    def micro_batch(self, step, micro_index, micro_rows, device):
        epoch, b = divmod(step, self.steps_per_epoch)
        row0 = b * self.R + micro_index * micro_rows
        rows = np.stack([self.stream(epoch, s, s + self.T + 1) for s in self.window_starts(epoch, slice(row0, row0 + micro_rows))])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


# -----------------------------------------------------------------------------------------------------
# single / ensemble schedule; q0.py supplies its own plan with the same four methods
class SinglePlan:
    """LR multiplier: linear warmup over warmup_steps, then cosine (or linear) decay to min_lr_frac at the
    last step; WD multiplier 1. One member, saved at the end."""

    def __init__(self, t):
        self.cfg, self.track = t.cfg, t.track
        self.total_steps = max(1, round(t.cfg.epochs * t.spe))
        self.boundaries = {self.total_steps}

    def multipliers(self, step):
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps, 1.0
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "none": 1.0}[c.decay]
        return c.min_lr_frac + (1 - c.min_lr_frac) * shape, 1.0

    def loss(self, model, x, y):
        return -model(x, y).mean()

    def on_boundary(self, t, step):
        name = "single" if self.cfg.mode == "single" else f"member{self.track}"
        budget = self.cfg.epochs * (self.track + 1)  # members trained one after another
        t.save_member(dict(name=name, mode=self.cfg.mode, track=self.track, cycle=0, seed=t.seed,
                           epochs=self.cfg.epochs, budget_epochs=budget, teacher=None, train_loss=t.last_loss))

    def teacher_forwards(self):
        return 0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# -----------------------------------------------------------------------------------------------------
class Track:
    """One model's training: a single model, an ensemble member or a q0 trajectory (make_plan(track) -> its plan)."""

    def __init__(self, cfg, track, env, data, make_plan):
        self.cfg, self.track, self.env, self.data = cfg, track, env, data
        self.seed = cfg.seed + track
        self.dir = Path(cfg.out_dir) / f"track{track}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.dir / "ckpt.pt"
        self.started_path = self.dir / "started.json"  # written once its first checkpoint is on disk
        torch.manual_seed(self.seed)
        self.model = gpt.build(gpt.config_for(cfg.model_size, vocab_size=gpt.padded_vocab(data["meta"]["vocab_size"]),
                                              seq_len=cfg.seq_len, dropout=cfg.dropout), env["device"])
        self.accum = cfg.batch_tokens // (cfg.seq_len * cfg.micro_batch_size * env["group_size"])
        self.loader = EpochLoader(data["train"], data["meta"]["doc_starts"], cfg.seq_len, cfg.batch_tokens // cfg.seq_len,
                                  cfg.seed, track)
        self.spe = self.loader.steps_per_epoch
        self.make_optimizers()
        self.step, self.last_loss = 0, float("nan")
        self.ckpt_writer, self.ckpt_error = None, None  # the background checkpoint write, and its failure if any
        self.log_rows = 0  # rows in log.jsonl: the checkpoint records it, so a log cut short is noticed on resume
        self.plan = make_plan(self)
        self.flops_per_step = self.model.flops_per_token() * cfg.batch_tokens
        self.peak = gpt.peak_flops(env["device"])

    def make_optimizers(self):
        """Muon (torch.optim.Muon) on the hidden 2-D matrices, AdamW on embedding and head; the same base
        weight decay on all of them (embed_head_wd=False: on the Muon matrices only). The model has no scalars."""
        c, m = self.cfg, self.model
        hidden = [p for n, p in m.named_parameters() if n.startswith("blocks.")]
        assert all(p.ndim == 2 for p in hidden), "Muon takes 2-D matrices only"
        self.muon = torch.optim.Muon(hidden, lr=c.muon_lr, weight_decay=c.weight_decay, momentum=0.95)
        fused = {"fused": True} if self.env["device"].type == "cuda" else {}
        self.adam = torch.optim.AdamW([dict(params=[m.embed.weight], lr=c.embed_lr), dict(params=[m.head.weight], lr=c.head_lr)],
                                      betas=c.adam_betas, eps=1e-10, weight_decay=c.weight_decay if c.embed_head_wd else 0.0, **fused)
        for opt in (self.muon, self.adam):
            for g in opt.param_groups:
                g["base_lr"], g["base_wd"] = g["lr"], g["weight_decay"]

    def set_multipliers(self, lr_mult, wd_mult):
        for opt in (self.muon, self.adam):
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = g["base_lr"] * lr_mult, g["base_wd"] * wd_mult

    def broadcast_weights(self):
        """Every rank of the group takes its first rank's weights: after a perturbation (or re-init) drawn from the same
        seed on every rank they are already equal; this makes it certain, whatever the kernels, for one broadcast."""
        if self.env["group_size"] > 1:
            src = self.env["rank"] - self.env["group_rank"]
            for p in self.model.parameters():
                dist.broadcast(p.data, src=src, group=self.env["group"])

    def reset_optimizer_state(self):
        """Forget momentum and second moments (q0's mode=chain starts every member afresh)."""
        self.muon.state.clear()
        self.adam.state.clear()

    # ---- checkpoints and members: written only from a finite state ---------------------------------------
    def check_finite(self, what):
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self.fail(f"weight {bad[0]} is not finite after step {self.step}, before writing {what}")

    def fail(self, problem):
        """Stop with the truth about what is on disk: nothing is written from the bad state."""
        self.finish_checkpoint()
        last = (f"{self.ckpt_path} (step {safe_load(self.ckpt_path, 'checkpoint')['step']})"
                if self.ckpt_path.exists() else "none yet (the track would start over)")
        raise UserError(f"track {self.track}: {problem}; nothing was saved from this state. Last good "
                        f"checkpoint: {last}. Lower the learning rates (or grad_clip) and re-run with --resume=True")

    def save_checkpoint(self):
        """Snapshot the state into host memory, then write it on a background thread while training goes on (at 1.8B
        a checkpoint is ~15 GB: written in line, the whole group would wait for the disk). One write at a time: the
        previous one is finished (and renamed into place) before the next snapshot; a failed write stops the run at
        the next checkpoint or at the end. async_checkpoints=False writes in line."""
        self.check_finite("the checkpoint")
        self.finish_checkpoint()
        state = {"model": self.model.state_dict(), "muon": self.muon.state_dict(), "adam": self.adam.state_dict(),
                 "step": self.step, "data_position": dict(zip(("epoch", "batch"), divmod(self.step, self.spe))),
                 "last_loss": self.last_loss, "plan": self.plan.state_dict(), "config": asdict(self.cfg),
                 "log_rows": self.log_rows}
        if self.env["group_rank"] != 0:
            return
        if not self.cfg.async_checkpoints:
            return self.write_checkpoint(state)
        check_disk(self.ckpt_path, nbytes(state))  # a full disk stops the run here, not a checkpoint later
        state = to_host(state)  # a copy: the live tensors change under the writer

        def write():
            try:
                self.write_checkpoint(state)
            except BaseException as e:  # raised again in the training thread by finish_checkpoint
                self.ckpt_error = e
        self.ckpt_writer = threading.Thread(target=write, name=f"ckpt-track{self.track}")
        self.ckpt_writer.start()

    def write_checkpoint(self, state):
        """ckpt.pt, then (the first time) started.json: from then on a start that finds no ckpt.pt stops instead of
        training the trajectory again from step 0 (a node-local run folder, or a deleted checkpoint)."""
        save_torch(state, self.ckpt_path)
        if not self.started_path.exists():
            write_json(dict(first_checkpoint_step=state["step"], host=socket.gethostname()), self.started_path)

    def finish_checkpoint(self):
        """Wait for the checkpoint being written, if any; raise its error, if it failed."""
        if self.ckpt_writer is not None:
            self.ckpt_writer.join()
            self.ckpt_writer = None
        if self.ckpt_error is not None:
            error, self.ckpt_error = self.ckpt_error, None
            raise error

    def load_checkpoint(self):
        retrain = f"delete {self.dir} and re-run with --resume=True to train this trajectory again from step 0"
        if not self.ckpt_path.exists():
            if self.started_path.exists():
                first = read_json(self.started_path, "trajectory record", retrain)
                raise UserError(f"track {self.track} has started ({self.started_path}: first checkpoint at step "
                                f"{first['first_checkpoint_step']}, on {first['host']}) but {self.ckpt_path} is missing: "
                                f"this node does not see the folder it was trained in (the run folder must be on a file "
                                f"system every node sees), or the checkpoint was deleted. Point --out_dir at that folder, "
                                f"or {retrain}")
            self.drop_log_rows_after(-1)  # killed before its first checkpoint: the track starts over
            return
        state = safe_load(self.ckpt_path, "checkpoint", retrain)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # a shape mismatch: the data's vocab_size (its meta) changed under the run
            raise UserError(f"checkpoint {self.ckpt_path} does not fit the model this config and data build "
                            f"({str(e).strip().splitlines()[-1].strip()[:160]}): the vocab_size in {self.cfg.data_dir}'s "
                            f"meta or the model changed since it was written; use the original data or a new --out_dir") from None
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
        self.plan.load_state_dict(state["plan"])
        self.step, self.last_loss = state["step"], state["last_loss"]
        self.drop_log_rows_after(self.step, state.get("log_rows", 0))
        self.env["log"](f"track {self.track}: resumed from {self.ckpt_path} at step {self.step}")

    def drop_log_rows_after(self, step, expected_rows=0):
        """A resumed run redoes every step after its checkpoint: drop their log rows, so none appears twice. The
        rewrite is atomic: a kill during it leaves the old log whole. Fewer rows than the checkpoint counted (a log
        cut short or lost) cannot be rebuilt: say so, once, and go on (the run itself is whole)."""
        log = self.dir / "log.jsonl"
        keep = []
        if self.env["group_rank"] == 0 and log.exists():
            for row in log.read_text().splitlines():
                try:
                    keep += [row + "\n"] if json.loads(row)["step"] <= step else []
                except ValueError:
                    pass  # a line torn by a crash mid-append
            atomic_write(log, lambda f: f.write("".join(keep).encode()))
        if self.env["group_rank"] == 0 and len(keep) < expected_rows:
            print(f"warning: {log} holds {len(keep)} rows up to step {step}, the checkpoint counted {expected_rows}: "
                  f"{expected_rows - len(keep)} log rows were lost (the weights, optimizer state and members are intact)",
                  file=sys.stderr, flush=True)
        self.log_rows = len(keep)

    def save_member(self, row):
        self.check_finite(f"member {row['name']}")
        state = member_state(self.model)
        if self.env["group_rank"] == 0:
            save_member(self.cfg.out_dir, row, self.model, self.data["meta"], state)
        self.env["barrier"]()
        return state

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self):
        held = lock(self.dir) if self.env["group_rank"] == 0 else None  # before this track's first write
        try:
            self.train_locked()
            self.finish_checkpoint()
        finally:
            if self.ckpt_writer is not None:  # leaving on an error: let the write in flight finish whole
                self.ckpt_writer.join()
            if held:
                held.close()

    def train_locked(self):
        c, env, dev = self.cfg, self.env, self.env["device"]
        self.load_checkpoint()
        total = self.plan.total_steps
        if self.step >= total:
            env["log"](f"track {self.track}: already finished ({total} steps)")
            return
        # DDP first, then compile the DDP module: dynamo splits the graph at DDP's buckets so the gradient all-reduce
        # overlaps the backward (PyTorch's DDP + torch.compile notes); gradients live in the buckets (no copy)
        ddp = DDP(self.model, process_group=env["group"], gradient_as_bucket_view=True) if env["group_size"] > 1 else None
        fwd = ddp or self.model
        fwd = torch.compile(fwd) if c.compile else fwd
        every = lambda epochs: max(1, round(epochs * self.spe)) if epochs > 0 else None
        eval_steps, ckpt_steps = every(c.eval_every_epochs), every(c.ckpt_every_epochs)
        if self.step == 0:  # the starting point of the val curve
            self.log_eval()
        self.model.train()
        step_time = 0.0
        while self.step < total:
            t0 = time.time()
            self.set_multipliers(*self.plan.multipliers(self.step))
            loss_sum = torch.zeros((), device=dev)
            for a in range(self.accum):
                j = env["group_rank"] * self.accum + a  # this micro-batch's place in the global batch
                # dropout masks are a pure function of (seed, j, step): the same rows get the same masks on any number
                # of ranks, and a resumed run draws them again without saving or gathering RNG state
                torch.manual_seed(((self.seed * 65_537) + j) * 1_000_003 + self.step)
                x, y = self.loader.micro_batch(self.step, j, c.micro_batch_size, dev)
                sync = ddp.no_sync() if (ddp and a < self.accum - 1) else nullcontext()
                with sync:  # one `with`: no_sync() is a generator context manager and cannot be entered twice
                    with autocast(dev):
                        loss = self.plan.loss(fwd, x, y) / self.accum
                    loss.backward()
                loss_sum += loss.detach()
            # the grad norm before any step: an overflow in the backward pass can leave the loss finite
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip or float("inf"))
            env["all_reduce"](loss_sum)
            loss_value = loss_sum.item() / env["group_size"]
            if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
                self.fail(f"loss is {loss_value} at step {self.step + 1} (grad norm {grad_norm.item():.4g}; the step was not taken)")
            self.muon.step()
            self.adam.step()
            self.muon.zero_grad(set_to_none=True)
            self.adam.zero_grad(set_to_none=True)
            self.step += 1
            step_time += time.time() - t0
            self.last_loss = loss_value
            if self.step % c.log_every == 0 or self.step == total:
                steps = c.log_every if self.step % c.log_every == 0 else self.step % c.log_every
                self.log_line(loss_value, step_time / steps)
                step_time = 0.0
            # eval before the boundary hook: q0 perturbs the weights right after its snapshot
            if (eval_steps and self.step % eval_steps == 0) or self.step == total:
                self.log_eval()
            if self.step in self.plan.boundaries:
                self.plan.on_boundary(self, self.step)
            if (ckpt_steps and self.step % ckpt_steps == 0) or self.step in self.plan.boundaries or self.step == total:
                self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self, split):
        """Mean loss over the split's windows (eval_rows), the group's ranks sharing them."""
        env = self.env
        windows = eval_rows(self.data[split], self.cfg.seq_len, self.cfg.eval_tokens)[env["group_rank"]::env["group_size"]]
        lp = score_windows(self.model, self.data[split], windows, env["device"])
        total = torch.tensor([-lp.double().sum().item(), lp.numel()], dtype=torch.float64, device=env["device"])
        env["all_reduce"](total)
        return (total[0] / total[1]).item()

    def log_eval(self):
        losses = {s: self.evaluate(s) for s in ("val", "fitness")}
        if not all(map(math.isfinite, losses.values())):
            self.fail(f"eval loss is not finite after step {self.step} ({losses})")
        self.env["log"](f"track {self.track} | step {self.step} | epoch {self.step / self.spe:.2f} | "
                        f"val {losses['val']:.4f} | fitness {losses['fitness']:.4f}")
        self.jsonl(dict(kind="eval", step=self.step, epoch=self.step / self.spe, **losses))

    def log_line(self, loss, dt):
        c, total = self.cfg, self.plan.total_steps
        g = self.muon.param_groups[0]
        tok_s = c.batch_tokens / dt if dt > 0 else float("nan")
        flops = self.flops_per_step * (3 + self.plan.teacher_forwards()) / 3  # a teacher forward is 1/3 of fwd + bwd
        mfu = f"{flops / dt / (self.peak * self.env['group_size']) * 100:5.1f}%" if self.peak and dt > 0 else "    -"
        eta = (total - self.step) * dt
        self.env["log"](f"track {self.track} | step {self.step:6d}/{total} ({100 * self.step / total:5.1f}%) | "
                        f"epoch {self.step / self.spe:7.2f} | loss {loss:.4f} | lr {g['lr']:.2e} | wd {g['weight_decay']:.3f} | "
                        f"{dt * 1000:7.1f} ms | {tok_s:9,.0f} tok/s | mfu {mfu} | eta {eta / 60:6.1f} min")
        self.jsonl(dict(kind="train", step=self.step, epoch=self.step / self.spe, loss=loss, lr=g["lr"],
                        wd=g["weight_decay"], ms=dt * 1000, tok_s=tok_s))

    def jsonl(self, row):
        if self.env["group_rank"] == 0:
            try:
                with open(self.dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                self.log_rows += 1
            except OSError as e:  # a full disk: a torn last line is dropped on resume
                raise UserError(f"could not append to {self.dir / 'log.jsonl'} ({e.strerror or e}). Earlier files are "
                                f"intact; fix it (free space?) and re-run with --resume=True") from None


# -----------------------------------------------------------------------------------------------------
def main(argv, config_class=Config, doc=__doc__, modes=("single", "ensemble"), make_plan=SinglePlan, validate_more=None,
         describe=None):
    """Everything a launch does, for train.py and q0.py alike (q0.py passes its config, plan, checks and budget line):
    read the config, check it, set up, train this rank's tracks. A problem the user must fix prints one message
    (exit 2 for a bad config, 1 otherwise); Ctrl-C says how to resume."""
    cfg = None
    try:
        cfg = load_config(config_class, argv, doc, modes)
        data = load_data(cfg)
        need, spe = validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), len(data["train"]))
        if validate_more:
            validate_more(cfg, need, spe)
        env = setup_distributed(cfg)
        prepare_run_dir(cfg, env, data, RESUME_SAFE_KEYS)
        t = Track(cfg, env["my_tracks"][0], env, data, make_plan)
        if env["rank"] == 0:
            print("config:", json.dumps(asdict(cfg)))
            print(f"model: {cfg.model_size}, {t.model.num_params() / 1e6:.2f}M params, {t.model.flops_per_token() / 1e6:.1f} MFLOPs/token | "
                  f"data: {len(data['train']):,} train tokens ({data['meta']['tokenizer']}), {len(data['val']):,} val, "
                  f"{len(data['fitness']):,} fitness")
            print(f"batch: {cfg.micro_batch_size} seqs x {cfg.seq_len} tokens x {t.accum} accum x {env['group_size']} ranks/track = "
                  f"{cfg.batch_tokens:,} tokens/step | {t.spe} steps/epoch | {cfg.num_tracks()} track(s) on {env['world']} rank(s) "
                  f"in {env['world'] // env['group_size']} group(s) | device {env['device']}")
            if describe:
                print(describe(cfg))
        t.train()
        for track in env["my_tracks"][1:]:  # one model in memory at a time
            del t
            t = Track(cfg, track, env, data, make_plan)
            t.train()
        if env["rank"] == 0:
            print(f"done: outputs in {cfg.out_dir}/ (config.json, track*/log.jsonl, members/*.pt); next: python eval.py {cfg.out_dir}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.status)
    except KeyboardInterrupt:
        if cfg is None:
            raise
        ckpts = sorted(str(p) for p in Path(cfg.out_dir).glob("track*/ckpt.pt"))
        again = " ".join(a for a in [Path(sys.argv[0]).name, *argv] if a != "--resume=True")
        print(f"\ninterrupted. Checkpoints: {', '.join(ckpts) or 'none yet'}; finished members are in {cfg.out_dir}/members. "
              f"Continue exactly where it stopped with:\n  python {again} --resume=True", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
