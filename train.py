"""
train.py: train one model (mode=single), or the naive-ensemble baseline (mode=ensemble: `ensemble_size`
independently seeded models). In nanoGPT's order: the defaults, the data loader, the plan, the optimizers, the loop.
q0.py runs the population with this same loop: it hands `train_track` a plan of its own (the cyclic schedule, the
distillation loss, and what happens at each cycle end).

    python train.py configs/shakespeare_single.py                     # CPU, minutes
    python train.py configs/shakespeare_single.py --epochs=2 --seed=7  # flags override the file; --help lists every key
    torchrun --standalone --nproc_per_node=8 train.py configs/fineweb_1p8b_single.py     # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 train.py configs/fineweb_1p8b_ensemble.py    # members in parallel
    ... add --resume=True to continue a killed run exactly where it stopped (with a larger --ensemble_size: more members)

Budgets are in epochs of the train split. The world is split into min(world, tracks) process groups, DDP inside
each; a group trains its tracks (ensemble members, q0's trajectories) one after another, so one process gives the
same results as one per track, and several ranks per track the same up to fp32 reduction order.
"""
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import model as gpt
import runtime
from scores import eval_windows, score_windows


# -----------------------------------------------------------------------------------------------------
# defaults: override with a config file (configs/*.py, `key = value` lines) and --key=value flags
@dataclass
class Config:
    # run
    mode: str = "single"             # single | ensemble (q0.py: q0; student.py: student)
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
    tracker: str = "none"            # none | tensorboard | wandb: every log row mirrored there too (runtime.Tracker)
    ARGS, MODES = "", ("single", "ensemble")  # not keys: the plain argument is a config file; the modes run here

    def num_tracks(self):
        return self.ensemble_size if self.mode == "ensemble" else 1


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
        self.steps_per_epoch = self.windows_per_epoch // rows_per_step  # config.check_run: >= 1
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

    def window_starts(self, epoch, rows):  # stream positions of the windows at rows `rows` of epoch's window order
        self._draw(epoch)
        return [self.offset + int(w) * self.T for w in self.window_order[rows]]

    def micro_batch(self, step, micro_index, micro_rows, device):
        epoch, b = divmod(step, self.steps_per_epoch)
        row0 = b * self.R + micro_index * micro_rows
        starts = self.window_starts(epoch, slice(row0, row0 + micro_rows))
        rows = np.stack([self.stream(epoch, s, s + self.T + 1) for s in starts])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


# -----------------------------------------------------------------------------------------------------
class Plan:
    """What one track trains for: the loop asks it for batches, the schedule, the loss, and what to do at a save step.
    SinglePlan below; q0.Q0Plan (the cyclic schedule, chain distillation); student.StudentPlan."""
    loader: EpochLoader   # micro_batch(step, j, rows, device) -> batch tuple; steps_per_epoch
    total_steps: int      # the loop runs steps 0 .. total_steps - 1
    save_steps: list      # the steps after which a member is saved (at_save)

    def __init__(self, cfg, track, model, data, env):
        self.cfg, self.track = cfg, track
        self.loader = EpochLoader(data["train"], data["meta"]["doc_starts"], cfg.seq_len, cfg.batch_tokens // cfg.seq_len,
                                  cfg.seed, track)

    @classmethod
    def check(cls, cfg, data):
        """Checks of this plan's keys that need the data (or other runs), before anything is written."""

    def multipliers(self, step):
        """-> (LR multiplier, WD multiplier) of this step: the schedule."""
        raise NotImplementedError

    def loss(self, model, batch):
        """The micro-batch's mean loss (model: the forward the loop trains, through DDP and compile)."""
        x, y = batch
        return -model(x, y).mean()

    def at_save(self, model, step, save):
        """At a save step: save(row) writes the member and returns its weights. -> True when the optimizer state
        must start afresh (a re-initialised model)."""
        raise NotImplementedError

    def log_fields(self, step):  # what the log row adds (q0: the cycle, the teacher, the loss's CE and KL parts)
        return dict(teacher_forwards=0)  # teacher forward passes per training forward: the MFU counts them

    def state_dict(self):
        return {}  # the plan's part of a checkpoint

    def load_state_dict(self, state):
        pass


class SinglePlan(Plan):
    """LR multiplier: linear warmup over warmup_steps, then cosine (or linear) decay to min_lr_frac at the
    last step; WD multiplier 1. One member, saved at the end."""

    def __init__(self, cfg, track, model, data, env):
        super().__init__(cfg, track, model, data, env)
        self.total_steps = max(1, round(cfg.epochs * self.loader.steps_per_epoch))
        self.save_steps = [self.total_steps]

    def multipliers(self, step):
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps, 1.0
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "none": 1.0}[c.decay]
        return c.min_lr_frac + (1 - c.min_lr_frac) * shape, 1.0

    def at_save(self, model, step, save):
        c = self.cfg
        name = "single" if c.mode == "single" else f"member{self.track}"
        save(dict(name=name, mode=c.mode, track=self.track, cycle=0, seed=c.seed + self.track, epochs=c.epochs,
                  budget_epochs=c.epochs * (self.track + 1), teacher=None))  # members trained one after another
        return False


def make_optimizers(cfg, model, device):
    """Muon (torch.optim.Muon) on the blocks' 2-D matrices, AdamW on embedding and head; the same base weight decay on
    all of them (embed_head_wd=False: on the Muon matrices only)."""
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.")]  # 2-D, as Muon requires
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95)
    gpt.cautious_weight_decay(muon)  # the reference's decay: only where update and weight agree in sign
    fused = {"fused": True} if device.type == "cuda" else {}
    adam = torch.optim.AdamW([dict(params=[model.embed.weight], lr=cfg.embed_lr), dict(params=[model.head.weight], lr=cfg.head_lr)],
                             betas=cfg.adam_betas, eps=1e-10, weight_decay=cfg.weight_decay if cfg.embed_head_wd else 0.0, **fused)
    return muon, adam


def set_multipliers(cfg, muon, adam, lr_mult, wd_mult):
    """The schedule's multipliers on the config's LRs and WD (so a resume with new LRs takes them from its step)."""
    head_wd = cfg.weight_decay if cfg.embed_head_wd else 0.0
    for g, lr, wd in zip([*muon.param_groups, *adam.param_groups], [cfg.muon_lr, cfg.embed_lr, cfg.head_lr],
                         [cfg.weight_decay, head_wd, head_wd]):
        g["lr"], g["weight_decay"] = lr * lr_mult, wd * wd_mult


@torch.no_grad()
def evaluate(model, data, cfg, env):
    """Mean loss on val and fitness over the split's windows (eval_windows), the group's ranks sharing them."""
    losses = {}
    for split in ("val", "fitness"):
        windows = eval_windows(data[split], cfg.seq_len, cfg.eval_tokens)[env["group_rank"]::env["group_size"]]
        lp = score_windows(model, data[split], windows, env["device"], cfg.eval_batch_size)
        total = torch.tensor([-lp.double().sum().item(), lp.numel()], dtype=torch.float64, device=env["device"])
        env["all_reduce"](total)
        losses[split] = (total[0] / total[1]).item()
    return losses


# -----------------------------------------------------------------------------------------------------
# the loop: one track from its checkpoint (or step 0) to its last step
def train_track(cfg, track, env, data, make_plan):
    dev, seed = env["device"], cfg.seed + track
    torch.manual_seed(seed)
    model = gpt.build(gpt.config_for(cfg.model_size, vocab_size=data["meta"]["vocab_size"], seq_len=cfg.seq_len,
                                     dropout=cfg.dropout), dev)
    muon, adam = make_optimizers(cfg, model, dev)
    plan = make_plan(cfg, track, model, data, env)
    accum = cfg.batch_tokens // (cfg.seq_len * cfg.micro_batch_size * env["group_size"])  # micro-batches per rank
    with runtime.TrackRun(cfg, track, env, data["meta"], model, plan) as run:  # resume, logs, checks, checkpoints
        step, last_loss = run.resume((muon, adam))
        if step >= plan.total_steps:
            return run.log(f"track {track}: already finished ({plan.total_steps} steps)")
        fwd, ddp = runtime.wrap(model, cfg, env)  # DDP, then torch.compile; the model itself is what is saved
        state = lambda: dict(model=model.state_dict(), muon=muon.state_dict(), adam=adam.state_dict(), step=step,
                             last_loss=last_loss, plan=plan.state_dict())
        if step == 0:
            run.log_eval(step, evaluate(model, data, cfg, env))  # the val curve's starting point
        model.train()
        while step < plan.total_steps:
            t0 = time.time()
            set_multipliers(cfg, muon, adam, *plan.multipliers(step))
            loss = torch.zeros((), device=dev)
            for a in range(accum):
                j = env["group_rank"] * accum + a  # this micro-batch's place in the global batch
                # dropout masks are a pure function of (seed, j, step): the same rows get the same masks on any number
                # of ranks, and a resumed run draws them again without saving or gathering RNG state
                torch.manual_seed(((seed * 65_537) + j) * 1_000_003 + step)
                batch = plan.loader.micro_batch(step, j, cfg.micro_batch_size, dev)
                with runtime.no_sync(ddp, a < accum - 1):  # the gradient all-reduce on the last micro-batch only
                    with runtime.autocast(dev):
                        micro_loss = plan.loss(fwd, batch) / accum
                    micro_loss.backward()
                loss += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            loss_value, stop_asked = run.reduce(loss)  # the group's mean; whether any of its ranks was signalled
            run.check_step(step, loss_value, grad_norm)  # a NaN or inf stops here, before the optimizer step
            for opt in (muon, adam):
                opt.step()
                opt.zero_grad(set_to_none=True)
            step, last_loss = step + 1, loss_value
            run.log_train(step, loss_value, grad_norm, muon.param_groups[0], time.time() - t0)
            if run.eval_due(step):  # before the save step: q0 perturbs the weights right after its snapshot
                run.log_eval(step, evaluate(model, data, cfg, env))
            if step in plan.save_steps:
                if plan.at_save(model, step, lambda row: run.save_member(dict(row, train_loss=last_loss), step)):
                    muon.state.clear()  # a fresh model (variants.py's sequential chain): no optimizer memory either
                    adam.state.clear()
                runtime.broadcast_weights(model, env)
            run.end_step(step, state, stop_asked)  # a checkpoint when due; then the stop a signal asked for


def main(argv, Config=Config, make_plan=SinglePlan, doc=__doc__):
    """A training launch: train.py's, and q0.py's, student.py's and variants.py's with their config and plan."""
    with runtime.session(argv, Config, doc) as cfg:
        data = runtime.load_data(cfg)
        spe = EpochLoader.num_windows(len(data["train"]), cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len)
        env = runtime.start(cfg, data, spe, make_plan)
        for track in env["my_tracks"]:  # one model in memory at a time
            train_track(cfg, track, env, data, make_plan)
        if env["rank"] == 0:
            print(f"done: outputs in {cfg.out_dir}/ (config.json, track*/log.jsonl, members/*.pt); next: python eval.py {cfg.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
