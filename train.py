"""
train.py: train one model (mode=single), or the naive-ensemble baseline (mode=ensemble: `ensemble_size`
independently seeded models). In nanoGPT's order: the defaults, the data loader, the plan, the model and its
optimizers, the loop. q0.py runs the population with this same loop: it hands `train_track` a plan of its own
(the cyclic schedule, the distillation loss, and what happens at each cycle end).

Launch:
    python train.py configs/shakespeare_single.py                     # CPU, minutes
    python train.py configs/shakespeare_single.py --epochs=2 --seed=7  # --key=value overrides; --help lists every key
    torchrun --standalone --nproc_per_node=8 train.py configs/fineweb_1p8b_single.py     # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 train.py configs/fineweb_1p8b_ensemble.py    # members in parallel
    ... add --resume=True to continue a killed run exactly where its checkpoints left it (and a larger
    --ensemble_size to add members to an ensemble).

Budgets are in epochs of the train split. The world is split into min(world, tracks) process groups; each
group trains its tracks (ensemble members, or q0's trajectories) one after another with DDP inside the group,
so one process runs everything sequentially with the same results as one process per track. Several ranks per
track give the same members up to fp32 reduction order: every micro-batch of the global batch is the same rows with
the same dropout masks (seeded by its place in the global batch, not by the rank) whatever the number of ranks.
What keeps a run safe (resume, checkpoints, the lock, the log, signals) is runtime.py's; the loop calls it by name.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as gpt
import runtime
from common import (UserError, autocast, eval_windows, load_config, load_data, prepare_run_dir,
                    score_windows, setup_distributed)


# -----------------------------------------------------------------------------------------------------
# defaults: override with a config file (configs/*.py, `key = value` lines) and --key=value flags
@dataclass
class Config:
    # run
    mode: str = "single"             # single | ensemble (q0.py: q0 | chain | student)
    out_dir: str = ""                # run folder; "" = runs/<config file name>
    resume: bool = False             # continue the run in out_dir from its checkpoints
    seed: int = 1337                 # track i: init and dropout from seed + i; data order from (seed, i, epoch)
    device: str = "auto"             # auto (cuda > mps > cpu) | cuda | mps | cpu
    compile: bool = False            # torch.compile the model (the GPU configs turn it on)
    dist_timeout_minutes: int = 180  # process-group timeout: ranks wait through checkpoints and unequal work
    ddp_bucket_cap_mb: int = 25      # DDP's gradient buckets (torch's default); compiled, one subgraph per bucket
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
    eval_batch_size: int = 16        # windows per eval forward (its fp32 logits: B x seq_len x vocab x 4 bytes; 1.8B: 2)
    ckpt_every_epochs: float = 0.5   # plus at every snapshot and at the end; 0 = only then
    async_checkpoints: bool = True   # write checkpoints on a background thread from a host-memory copy

    def num_tracks(self):
        return self.ensemble_size if self.mode == "ensemble" else 1


# keys that do not change what a run computes: they may differ on --resume
RESUME_SAFE_KEYS = {"resume", "out_dir", "device", "compile", "dist_timeout_minutes", "ddp_bucket_cap_mb",
                    "micro_batch_size", "log_every",
                    "eval_every_epochs", "eval_tokens", "ckpt_every_epochs", "async_checkpoints"}
# keys a NaN stop's advice names: they change what the run computes from the resumed step on, so the step each change
# took effect is logged (log.jsonl, kind "resume") and config.json records it under "resumes"
RESUME_TUNABLE_KEYS = ("muon_lr", "embed_lr", "head_lr", "grad_clip")


def validate(cfg, world_size, train_tokens):
    """Reject a bad value by key name, with what is allowed, before anything is written."""
    def need(ok, key, allowed):
        if not ok:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: {allowed}", status=2)
    need(cfg.device in ("auto", "cuda", "mps", "cpu"), "device", "must be auto, cuda, mps or cpu")
    need(0 <= cfg.seed < 10**8, "seed", "must be in [0, 10^8): the data order and the dropout masks are seeded from it")
    need(cfg.dist_timeout_minutes >= 1, "dist_timeout_minutes", "must be >= 1")
    need(cfg.ddp_bucket_cap_mb >= 1, "ddp_bucket_cap_mb", "must be >= 1 (MB)")
    need(cfg.model_size in gpt.SIZES, "model_size", f"must be one of {', '.join(gpt.SIZES)}")
    need(cfg.seq_len >= 2, "seq_len", "must be >= 2")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(cfg.batch_tokens >= 1, "batch_tokens", "must be >= 1")
    need(cfg.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    need(cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.ensemble_size >= 1, "ensemble_size", "must be >= 1")
    need(cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
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
# the plan: what one track trains for (SinglePlan here; q0.Q0Plan and q0.StudentPlan). The loop asks it:
#   plan.loader                        micro_batch(step, j, rows, device) -> a batch tuple; steps_per_epoch
#   plan.total_steps, plan.save_steps  the steps; those that end by saving a member (q0: the cycle ends)
#   plan.multipliers(step)             -> (lr multiplier, wd multiplier) for this step
#   plan.loss(model, batch)            -> the micro-batch's mean loss
#   plan.after_step(model, step)       after each optimizer step (a hook; nothing here)
#   plan.at_save(model, step, save)    at a save step: save(row) writes the member -> its weights; returns True
#                                      when the optimizer state must start afresh (q0's mode=chain)
#   plan.teacher_forwards()            teacher forward passes per training forward (for MFU)
#   plan.state_dict(), plan.load_state_dict(state)   its part of the checkpoint
def epoch_loader(cfg, track, data):
    return EpochLoader(data["train"], data["meta"]["doc_starts"], cfg.seq_len, cfg.batch_tokens // cfg.seq_len,
                       cfg.seed, track)


class SinglePlan:
    """LR multiplier: linear warmup over warmup_steps, then cosine (or linear) decay to min_lr_frac at the
    last step; WD multiplier 1. One member, saved at the end."""

    def __init__(self, cfg, track, model, data, env):
        self.cfg, self.track = cfg, track
        self.loader = epoch_loader(cfg, track, data)
        self.total_steps = max(1, round(cfg.epochs * self.loader.steps_per_epoch))
        self.save_steps = [self.total_steps]

    def multipliers(self, step):
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps, 1.0
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "none": 1.0}[c.decay]
        return c.min_lr_frac + (1 - c.min_lr_frac) * shape, 1.0

    def loss(self, model, batch):
        x, y = batch
        return -model(x, y).mean()

    def after_step(self, model, step):
        pass

    def at_save(self, model, step, save):
        c = self.cfg
        name = "single" if c.mode == "single" else f"member{self.track}"
        save(dict(name=name, mode=c.mode, track=self.track, cycle=0, seed=c.seed + self.track, epochs=c.epochs,
                  budget_epochs=c.epochs * (self.track + 1), teacher=None))  # members trained one after another
        return False

    def teacher_forwards(self):
        return 0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# -----------------------------------------------------------------------------------------------------
# the model and its optimizers
def make_optimizers(cfg, model, device):
    """Muon (torch.optim.Muon) on the hidden 2-D matrices, AdamW on embedding and head; the same base weight decay on
    all of them (embed_head_wd=False: on the Muon matrices only). The model has no scalars. Each group keeps its base
    LR and WD from the config: the schedule multiplies them (set_multipliers)."""
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    assert all(p.ndim == 2 for p in hidden), "Muon takes 2-D matrices only"
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95)
    gpt.cautious_weight_decay(muon)  # the reference's decay: only where update and weight agree in sign
    fused = {"fused": True} if device.type == "cuda" else {}
    adam = torch.optim.AdamW([dict(params=[model.embed.weight], lr=cfg.embed_lr), dict(params=[model.head.weight], lr=cfg.head_lr)],
                             betas=cfg.adam_betas, eps=1e-10, weight_decay=cfg.weight_decay if cfg.embed_head_wd else 0.0, **fused)
    set_base(cfg, muon, adam)
    return muon, adam


def set_base(cfg, muon, adam):
    """The config's LRs and WD as each group's base (also after loading a checkpoint's optimizer state)."""
    embed_head_wd = cfg.weight_decay if cfg.embed_head_wd else 0.0
    for g, lr, wd in zip([*muon.param_groups, *adam.param_groups], [cfg.muon_lr, cfg.embed_lr, cfg.head_lr],
                         [cfg.weight_decay, embed_head_wd, embed_head_wd]):
        g["base_lr"], g["base_wd"] = lr, wd


def set_multipliers(optimizers, lr_mult, wd_mult):
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = g["base_lr"] * lr_mult, g["base_wd"] * wd_mult


def broadcast_weights(model, env):
    """Every rank of the group takes its first rank's weights: after a perturbation (or re-init) drawn from the same
    seed on every rank they are already equal; this makes it certain, whatever the kernels, for one broadcast."""
    if env["group_size"] > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=env["rank"] - env["group_rank"], group=env["group"])


@torch.no_grad()
def evaluate(model, tokens, cfg, env):
    """Mean loss over the split's windows (eval_windows), the group's ranks sharing them."""
    windows = eval_windows(tokens, cfg.seq_len, cfg.eval_tokens)[env["group_rank"]::env["group_size"]]
    lp = score_windows(model, tokens, windows, env["device"], cfg.eval_batch_size)
    total = torch.tensor([-lp.double().sum().item(), lp.numel()], dtype=torch.float64, device=env["device"])
    env["all_reduce"](total)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------------------------------
# the loop: one track from its checkpoint (or step 0) to its last step
def train_track(cfg, track, env, data, make_plan):
    dev, seed = env["device"], cfg.seed + track
    torch.manual_seed(seed)
    model = gpt.build(gpt.config_for(cfg.model_size, vocab_size=data["meta"]["vocab_size"], seq_len=cfg.seq_len,
                                     dropout=cfg.dropout), dev)
    muon, adam = make_optimizers(cfg, model, dev)
    run = runtime.TrackRun(cfg, track, env, data["meta"])
    plan = make_plan(cfg, track, model, data, env)
    spe, total, accum = plan.loader.steps_per_epoch, plan.total_steps, grad_accum(cfg, env)
    step, last_loss = 0, float("nan")
    with run:
        state = run.resume()
        if state:
            run.load_model(model, state["model"])
            muon.load_state_dict(state["muon"])
            adam.load_state_dict(state["adam"])
            set_base(cfg, muon, adam)
            plan.load_state_dict(state["plan"])
            step, last_loss = state["step"], state["last_loss"]
            tuned = {k: [state["config"][k], getattr(cfg, k)] for k in RESUME_TUNABLE_KEYS if state["config"][k] != getattr(cfg, k)}
            if tuned:
                run.log(f"track {track}: from step {step} on, " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in tuned.items()))
                run.log_row(dict(kind="resume", step=step, changed=tuned))
        if step >= total:
            return run.log(f"track {track}: already finished ({total} steps)")
        # DDP first, then compile the DDP module: dynamo splits the graph at DDP's buckets so the gradient all-reduce
        # overlaps the backward (PyTorch's DDP + torch.compile notes); gradients live in the buckets (no copy)
        ddp = DDP(model, process_group=env["group"], gradient_as_bucket_view=True,
                  bucket_cap_mb=cfg.ddp_bucket_cap_mb) if env["group_size"] > 1 else None
        fwd = torch.compile(ddp or model) if cfg.compile else (ddp or model)
        every = lambda epochs: max(1, round(epochs * spe)) if epochs > 0 else None
        eval_steps, ckpt_steps = every(cfg.eval_every_epochs), every(cfg.ckpt_every_epochs)
        flops_per_step, peak = model.flops_per_token() * cfg.batch_tokens, gpt.peak_flops(dev)
        checkpoint_state = lambda: {"model": model.state_dict(), "muon": muon.state_dict(), "adam": adam.state_dict(),
                                    "step": step, "data_position": dict(zip(("epoch", "batch"), divmod(step, spe))),
                                    "last_loss": last_loss, "plan": plan.state_dict()}

        def log_eval():
            losses = {s: evaluate(model, data[s], cfg, env) for s in ("val", "fitness")}
            if not all(map(math.isfinite, losses.values())):
                run.fail(f"eval loss is not finite after step {step} ({losses})")
            run.log(f"track {track} | step {step} | epoch {step / spe:.2f} | val {losses['val']:.4f} | "
                    f"fitness {losses['fitness']:.4f}")
            run.log_row(dict(kind="eval", step=step, epoch=step / spe, **losses))

        if step == 0:  # the starting point of the val curve
            log_eval()
        model.train()
        step_time = 0.0
        while step < total:
            t0 = time.time()
            set_multipliers((muon, adam), *plan.multipliers(step))
            loss_sum = torch.zeros((), device=dev)
            for a in range(accum):
                j = env["group_rank"] * accum + a  # this micro-batch's place in the global batch
                # dropout masks are a pure function of (seed, j, step): the same rows get the same masks on any number
                # of ranks, and a resumed run draws them again without saving or gathering RNG state
                torch.manual_seed(((seed * 65_537) + j) * 1_000_003 + step)
                batch = plan.loader.micro_batch(step, j, cfg.micro_batch_size, dev)
                sync = ddp.no_sync() if (ddp and a < accum - 1) else nullcontext()
                with sync:  # one `with`: no_sync() is a generator context manager and cannot be entered twice
                    with autocast(dev):
                        loss = plan.loss(fwd, batch) / accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # the group's mean loss, and whether any rank was asked to stop (so all stop after the same step)
            stats = torch.stack([loss_sum, torch.tensor(float(run.signal_pending()), device=dev)])
            env["all_reduce"](stats)
            loss_value, stop_asked = stats[0].item() / env["group_size"], stats[1].item() > 0
            run.check_step(step, loss_value, grad_norm)
            muon.step()
            adam.step()
            muon.zero_grad(set_to_none=True)
            adam.zero_grad(set_to_none=True)
            step += 1
            plan.after_step(model, step)
            step_time += time.time() - t0
            last_loss = loss_value
            if step % cfg.log_every == 0 or step == total:
                dt = step_time / (cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every)
                g = muon.param_groups[0]
                tok_s = cfg.batch_tokens / dt if dt > 0 else float("nan")
                flops = flops_per_step * (3 + plan.teacher_forwards()) / 3  # a teacher forward is 1/3 of fwd + bwd
                mfu = f"{flops / dt / (peak * env['group_size']) * 100:5.1f}%" if peak and dt > 0 else "    -"
                run.log(f"track {track} | step {step:6d}/{total} ({100 * step / total:5.1f}%) | epoch {step / spe:7.2f} | "
                        f"loss {loss_value:.4f} | lr {g['lr']:.2e} | wd {g['weight_decay']:.3f} | {dt * 1000:7.1f} ms | "
                        f"{tok_s:9,.0f} tok/s | mfu {mfu} | eta {(total - step) * dt / 60:6.1f} min")
                run.log_row(dict(kind="train", step=step, epoch=step / spe, loss=loss_value, lr=g["lr"],
                                 wd=g["weight_decay"], ms=dt * 1000, tok_s=tok_s,  # peak: since this process started
                                 peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None))
                step_time = 0.0
            # eval before the save step: q0 perturbs the weights right after its snapshot
            if (eval_steps and step % eval_steps == 0) or step == total:
                log_eval()
            if step in plan.save_steps:
                save = lambda row: run.save_member(dict(row, train_loss=last_loss), model, step)
                if plan.at_save(model, step, save):
                    muon.state.clear()  # a fresh model (q0's mode=chain): no optimizer memory either
                    adam.state.clear()
                broadcast_weights(model, env)
            if (ckpt_steps and step % ckpt_steps == 0) or step in plan.save_steps or step == total:
                run.checkpoint(step, model, checkpoint_state())
            run.stop_if_asked(step, model, checkpoint_state, stop_asked)


def grad_accum(cfg, env):
    """Micro-batches per rank per step: batch_tokens = seq_len x micro_batch_size x accum x ranks per track."""
    return cfg.batch_tokens // (cfg.seq_len * cfg.micro_batch_size * env["group_size"])


def describe_setup(cfg, env, data, teachers=0):
    """The batch arithmetic, once (most nanoGPT questions are about exactly this), and the memory one GPU needs for
    it (model.memory_estimate; `teachers` frozen fp32 copies beside the model)."""
    with torch.device("meta"):  # sizes only: no memory, no init
        m = gpt.GPT(gpt.config_for(cfg.model_size, vocab_size=data["meta"]["vocab_size"], seq_len=cfg.seq_len))
    accum = grad_accum(cfg, env)
    spe = EpochLoader.num_windows(len(data["train"]), cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len)
    return "\n".join([
        "config: " + json.dumps(asdict(cfg)),
        f"model: {cfg.model_size}, {m.num_params() / 1e6:.2f}M params, {m.flops_per_token() / 1e6:.1f} "
        f"MFLOPs/token | data: {len(data['train']):,} train tokens ({data['meta']['tokenizer']}), {len(data['val']):,} "
        f"val, {len(data['fitness']):,} fitness",
        f"batch: {cfg.micro_batch_size} seqs x {cfg.seq_len} tokens x {accum} accum x {env['group_size']} ranks/track = "
        f"{cfg.batch_tokens:,} tokens/step | {spe} steps/epoch | {cfg.num_tracks()} track(s) on {env['world']} rank(s) "
        f"in {env['world'] // env['group_size']} group(s) | device {env['device']}",
        "memory per process (estimate, model.memory_estimate): " + memory_line(m.cfg, cfg, teachers)])


def memory_line(model_cfg, cfg, teachers):
    est = gpt.memory_estimate(replace(model_cfg, dropout=cfg.dropout), cfg.micro_batch_size, "fp32" if teachers else None,
                              max(1, teachers), cfg.eval_batch_size)
    parts = ("weights", "grads", "muon_momentum", "adam_moments", "teacher", "activations", "logits_train")
    return (f"peak {est['peak_train'] / 2**30:.2f} GiB in training ({', '.join(f'{k} {est[k] / 2**30:.2f}' for k in parts)}), "
            f"{est['peak_eval'] / 2**30:.2f} GiB at eval (batch {cfg.eval_batch_size})")


def main(argv):
    with runtime.session(argv) as s:
        cfg = s["cfg"] = load_config(Config, argv, __doc__, ("single", "ensemble"))
        data = load_data(cfg)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), len(data["train"]))
        env = setup_distributed(cfg)
        # an ensemble may grow on resume: member i depends only on (seed + i, i), so its first members stay as they are
        prepare_run_dir(cfg, env, data, RESUME_SAFE_KEYS | set(RESUME_TUNABLE_KEYS), grow_keys={"ensemble_size": lambda was: None})
        if env["rank"] == 0:
            print(describe_setup(cfg, env, data))
        for track in env["my_tracks"]:  # one model in memory at a time
            train_track(cfg, track, env, data, SinglePlan)
        if env["rank"] == 0:
            print(f"done: outputs in {cfg.out_dir}/ (config.json, track*/log.jsonl, members/*.pt); next: python eval.py {cfg.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
