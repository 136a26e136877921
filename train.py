"""
train.py: the training loop of q0. One loop, four modes:
    single    one model, warmup + cosine/linear decay (the baseline)
    ensemble  `ensemble_size` independently seeded models (the naive-ensemble baseline)
    q0        `num_trajectories` cyclic trajectories with snapshots and chain distillation (q0.py)
    chain     a sequential chain of full models, each re-initialised and distilled from its predecessor (q0.py)

Launch:
    python train.py configs/quickstart.py                              # CPU, minutes
    python train.py configs/quickstart.py --epochs=2 --seed=7          # --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/fineweb_1p8b_q0.py      # one 8-GPU node
    torchrun --nnodes=5 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 train.py configs/fineweb_1p8b_q0.py      # 5 nodes: one trajectory each
    ... add --resume=True to continue a killed run exactly where its checkpoints left it.

Budgets are in epochs of the train split. The world is split into min(world, tracks) process groups;
each group trains its tracks (trajectories or members) one after another with DDP inside the group,
so one process runs everything sequentially with the same results as the parallel layout.
Run folder: config.json, track<i>/{ckpt.pt, log.jsonl, manifest.json}, members/<name>.pt.
"""
import ast
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as gpt
from prepare_data import DataError, load_split


# -----------------------------------------------------------------------------------------------------
# defaults: override with a config file (configs/*.py, `key = value` lines) and --key=value flags
@dataclass
class Config:
    # run
    mode: str = "single"             # single | ensemble | q0 | chain
    out_dir: str = ""                # run folder; "" = runs/<config file name>
    resume: bool = False             # continue the run in out_dir from its checkpoints
    seed: int = 1337                 # track i: init, dropout and noise from seed + i; data order from (seed, i, epoch)
    device: str = "auto"             # auto (cuda > mps > cpu) | cuda | mps | cpu
    compile: bool = False            # torch.compile the model (the GPU configs turn it on)
    # data and model
    data_dir: str = "data/pydoc-byte"  # written by prepare_data.py
    model_size: str = "tiny"         # a key of model.SIZES: tiny ... 1.8B
    seq_len: int = 128
    dropout: float = 0.0
    # batch and budget
    batch_tokens: int = 4096         # global batch: tokens per optimizer step, all ranks together
    micro_batch_size: int = 16       # sequences per rank per forward; grad accumulation is derived
    epochs: float = 4.0              # single/ensemble: epochs per model
    ensemble_size: int = 4           # ensemble: number of independently seeded members
    # optimizer: Muon on hidden matrices, AdamW on embedding and head; decoupled WD p -= lr*wd*p
    muon_lr: float = 0.02
    embed_lr: float = 0.2
    head_lr: float = 0.004
    weight_decay: float = 0.0        # base WD (q0 reference: 1.3), scaled by the schedule's WD multiplier
    embed_head_wd: bool = True       # the base WD on embedding and head too (reference); False: Muon matrices only
    adam_betas: tuple = (0.8, 0.95)
    grad_clip: float = 1.0           # 0 = off
    warmup_steps: int = 0            # single/ensemble: linear warmup
    decay: str = "cosine"            # single/ensemble: cosine | linear | none
    min_lr_frac: float = 0.0         # single/ensemble: LR at the end, as a fraction of the peak
    # q0 and chain (formulas in q0.py; defaults from the q0 paper's reference script)
    num_trajectories: int = 1        # P parallel trajectories (q0) or independent chains (chain)
    num_cycles: int = 4              # cycles (= snapshots) per trajectory
    epochs_per_cycle: float = 2.0
    cycle_shape: str = "linear"      # linear (sawtooth) | cosine
    first_cycle_warmup_steps: int = 0
    lr_floor: float = 0.08           # LR multiplier at a cycle's end
    wd_floor: float = 0.7            # WD multiplier at a cycle's start (LR peak)
    constant_wd: bool = False        # ablation: WD multiplier fixed at 1
    perturb_scale_start: float = 0.25  # noise std after a snapshot, x each tensor's std, cosine-decayed
    perturb_scale_end: float = 0.05    # ... to this at the last cycle; both 0 = no noise
    distill_after_cycles: int = 8    # cycles trained without a teacher; then teacher = previous snapshot
    distill_alpha: float = 0.45      # loss = (1-a) CE + a T^2 KL(teacher || student)
    distill_temperature: float = 1.2
    distill_teacher: str = "previous"  # previous snapshot (reference) | mixture: the prior's top-K of earlier snapshots
    distill_teacher_k: int = 4       # mixture teacher: members (K teacher forwards per step)
    # logging, eval, checkpoints
    log_every: int = 10              # steps between log lines
    eval_every_epochs: float = 1.0   # val (and fitness) loss; also at the end of every track
    eval_tokens: int = 0             # tokens per eval split (0 = the whole split)
    ckpt_every_epochs: float = 0.5   # plus at every snapshot and at the end


# keys that do not change what a run computes: they may differ on --resume
RESUME_SAFE_KEYS = {"resume", "out_dir", "device", "compile", "micro_batch_size", "log_every", "eval_every_epochs",
                    "eval_tokens", "ckpt_every_epochs"}


class ConfigError(ValueError):
    pass


class RunError(RuntimeError):
    pass


# -----------------------------------------------------------------------------------------------------
# config: a file of `key = literal` lines (read with ast, never executed) plus --key=value flags
def parse_value(field, value, where):
    from_flag = where.startswith("from --")  # a flag's value is text; a config file's is already a literal
    if from_flag and field.type in ("bool", bool) and value.lower() in ("true", "false", "1", "0"):
        value = value.lower() in ("true", "1")
    elif from_flag and field.type not in ("str", str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    expected = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[getattr(field.type, "__name__", field.type)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{field.name}' expects {expected.__name__}, got {value!r} ({where})")
    return value


def load_config(argv):
    known = {f.name: f for f in fields(Config)}
    cfg, path = Config(), None
    pairs = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            pairs.append((key, value if eq else "true", f"from {arg}"))
        elif path is None:
            path = Path(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give one config file, then --key=value flags")
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (the recipes are in configs/)")
        try:
            body = ast.parse(path.read_text(), str(path)).body
        except SyntaxError as e:
            raise ConfigError(f"{path}:{e.lineno}: not a config file of `key = value` lines ({e.msg})") from None
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file")
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(f"{path}:{node.lineno}: the value of '{node.targets[0].id}' must be a literal")
            pairs.insert(0, (node.targets[0].id, value, f"{path}:{node.lineno}"))  # file first, flags win
    for key, value, where in pairs:
        if key not in known:
            raise ConfigError(f"unknown config key '{key}' ({where}); known keys: {', '.join(known)}")
        setattr(cfg, key, parse_value(known[key], value, where))
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / (path.stem if path else "default"))
    return cfg


def validate(cfg, world_size, train_tokens):
    """Reject a bad config by key name before any work starts."""
    import q0
    def need(ok, key, why):
        if not ok:
            raise ConfigError(f"config key '{key}' = {getattr(cfg, key)!r}: {why}")
    need(cfg.mode in ("single", "ensemble", "q0", "chain"), "mode", "must be single, ensemble, q0 or chain")
    need(cfg.model_size in gpt.SIZES, "model_size", f"must be one of {', '.join(gpt.SIZES)}")
    need(cfg.decay in ("cosine", "linear", "none"), "decay", "must be cosine, linear or none")
    need(cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.ensemble_size >= 1, "ensemble_size", "must be >= 1")
    need(cfg.seq_len >= 2, "seq_len", "must be >= 2")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(cfg.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    tracks = num_tracks(cfg)
    n_groups = min(world_size, tracks)
    if max(world_size, tracks) % n_groups:
        key = "num_trajectories" if cfg.mode in ("q0", "chain") else "ensemble_size"
        need(False, key, f"the world size ({world_size}) and the number of tracks ({tracks}) must divide one another")
    group_size = world_size // n_groups
    need(cfg.batch_tokens % (cfg.seq_len * cfg.micro_batch_size * group_size) == 0, "batch_tokens",
         f"must be a multiple of seq_len x micro_batch_size x ranks per track = "
         f"{cfg.seq_len} x {cfg.micro_batch_size} x {group_size}")
    steps_per_epoch = EpochLoader.num_windows(train_tokens, cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len)
    if steps_per_epoch < 1:
        raise DataError(f"the train split of {cfg.data_dir} has {train_tokens} tokens, too few for one global batch "
                        f"(batch_tokens={cfg.batch_tokens}, plus seq_len for the epoch's random window offset): lower "
                        f"batch_tokens or prepare more data")
    if cfg.mode in ("q0", "chain"):
        q0.validate(cfg, need, steps_per_epoch)


def num_tracks(cfg):
    return {"single": 1, "ensemble": cfg.ensemble_size}.get(cfg.mode, cfg.num_trajectories)


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


def eval_rows(tokens, seq_len, max_tokens=0):
    """Non-overlapping windows of T+1 tokens over a split (stride T): every token after the first is scored once."""
    n = len(tokens) if not max_tokens else min(len(tokens), max_tokens + 1)
    return [(s, min(s + seq_len + 1, n)) for s in range(0, n - 1, seq_len)]


# -----------------------------------------------------------------------------------------------------
# files: atomic writes, a disk check first, members and their manifest
def tensor_bytes(obj):
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(path):
    return shutil.disk_usage(path).free


def atomic_save(obj, path):
    """torch.save to a temporary name, then rename: a kill leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = int(tensor_bytes(obj) * 1.05) + (16 << 20)
    if free_bytes(path.parent) < need:
        raise RunError(f"not enough disk to write {path}: need about {need >> 20} MiB, "
                       f"{free_bytes(path.parent) >> 20} MiB free. Earlier files are intact; free space and --resume=True")
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def safe_load(path, what, fix="delete it and re-run with --resume=True to recompute it"):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never runs code from a file
    except Exception as e:
        raise RunError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); it is truncated or "
                       f"corrupt: {fix}") from None


def member_state(model):
    """The weights a member file holds: bf16 on GPU, fp32 on CPU, uncompiled names."""
    on_gpu = next(model.parameters()).is_cuda
    return {k: (v.to(torch.bfloat16) if on_gpu else v).detach().cpu().clone() for k, v in model.state_dict().items()}


def save_member(run_dir, row, model, data_meta, state):
    """A population member: its weights plus what is needed to rebuild it; then its manifest row."""
    path = Path(run_dir) / "members" / f"{row['name']}.pt"
    atomic_save({"model_config": asdict(model.cfg), "model": state, "row": row,
                 "data": {k: data_meta[k] for k in ("tokenizer", "vocab_size", "bos_id")}}, path)
    manifest = Path(run_dir) / f"track{row['track']}" / "manifest.json"
    rows = json.loads(manifest.read_text()) if manifest.exists() else []
    rows = [r for r in rows if r["name"] != row["name"]] + [dict(row, path=str(path.relative_to(run_dir)))]
    atomic_write_json(rows, manifest)  # the row appears only after its file is complete


def load_member(path, device="cpu"):
    ckpt = safe_load(path, "member file")
    model = gpt.build(gpt.GPTConfig(**ckpt["model_config"]), device)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    return model.eval(), ckpt


def read_manifest(run_dir):
    """Every member of a run, in training order (budget spent when it existed, then track, cycle)."""
    rows = [r for f in sorted(Path(run_dir).glob("track*/manifest.json")) for r in json.loads(f.read_text())]
    if not rows:
        raise RunError(f"no members in {run_dir}: train first (python train.py <config> --out_dir={run_dir})")
    return sorted(rows, key=lambda r: (r["budget_epochs"], r["track"], r["cycle"]))


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

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# -----------------------------------------------------------------------------------------------------
class Track:
    """One model's training: a single model, an ensemble member or a q0 trajectory."""

    def __init__(self, cfg, track, env, data):
        self.cfg, self.track, self.env, self.data = cfg, track, env, data
        self.seed = cfg.seed + track
        self.dir = Path(cfg.out_dir) / f"track{track}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.dir / "ckpt.pt"
        dev = env["device"]
        torch.manual_seed(self.seed)
        self.model_cfg = gpt.config_for(cfg.model_size, vocab_size=gpt.padded_vocab(data["meta"]["vocab_size"]),
                                        seq_len=cfg.seq_len, dropout=cfg.dropout)
        self.model = gpt.build(self.model_cfg, dev)
        self.micro_rows = cfg.micro_batch_size
        self.accum = cfg.batch_tokens // (cfg.seq_len * cfg.micro_batch_size * env["group_size"])
        self.loader = EpochLoader(data["train"], data["meta"]["doc_starts"], cfg.seq_len, cfg.batch_tokens // cfg.seq_len,
                                  cfg.seed, track)
        self.spe = self.loader.steps_per_epoch
        self.make_optimizers()
        import q0
        self.plan = SinglePlan(self) if cfg.mode in ("single", "ensemble") else q0.Q0Plan(self)
        self.step, self.last_loss = 0, float("nan")
        self.autocast = autocast(dev)
        self.flops_per_step = self.model.flops_per_token() * cfg.batch_tokens
        self.peak = gpt.peak_flops(dev)

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

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self):
        state = {"model": self.model.state_dict(), "muon": self.muon.state_dict(), "adam": self.adam.state_dict(),
                 "step": self.step, "data_position": dict(zip(("epoch", "batch"), divmod(self.step, self.spe))),
                 "last_loss": self.last_loss, "plan": self.plan.state_dict(), "config": asdict(self.cfg)}
        if self.env["group_rank"] == 0:
            atomic_save(state, self.ckpt_path)
        self.env["barrier"]()

    def load_checkpoint(self):
        if not self.ckpt_path.exists():  # killed before its first checkpoint: the track starts over
            self.drop_log_rows_after(-1)
            return
        state = safe_load(self.ckpt_path, "checkpoint")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # a shape mismatch: the data's vocab_size (its meta) changed under the run
            raise RunError(f"checkpoint {self.ckpt_path} does not fit the model this config and data build "
                           f"({str(e).strip().splitlines()[-1].strip()[:160]}): the vocab_size in {self.cfg.data_dir}'s "
                           f"meta or the model changed since it was written; use the original data or a new --out_dir") from None
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
        self.plan.load_state_dict(state["plan"])
        self.step, self.last_loss = state["step"], state["last_loss"]
        self.drop_log_rows_after(self.step)
        self.env["log"](f"track {self.track}: resumed from {self.ckpt_path} at step {self.step}")

    def drop_log_rows_after(self, step):
        """A resumed run redoes every step after its checkpoint: drop their log rows, so none appears twice."""
        if self.env["group_rank"] == 0 and (self.dir / "log.jsonl").exists():
            keep = []
            for row in (self.dir / "log.jsonl").read_text().splitlines():
                try:
                    keep += [row + "\n"] if json.loads(row)["step"] <= step else []
                except ValueError:
                    pass  # a line torn by a crash mid-append
            (self.dir / "log.jsonl").write_text("".join(keep))

    def save_member(self, row):
        state = member_state(self.model)
        if self.env["group_rank"] == 0:
            save_member(self.cfg.out_dir, row, self.model, self.data["meta"], state)
        self.env["barrier"]()
        return state

    # ---- eval ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split):
        tokens, env = self.data[split], self.env
        windows = eval_rows(tokens, self.cfg.seq_len, self.cfg.eval_tokens)[env["group_rank"]::env["group_size"]]
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=env["device"])
        for s, e in windows:
            row = torch.from_numpy(tokens[s:e].astype(np.int64)).to(env["device"])[None]
            with self.autocast:
                lp = self.model(row[:, :-1], row[:, 1:])
            total += torch.stack([-lp.double().sum(), torch.tensor(lp.numel(), dtype=torch.float64, device=lp.device)])
        self.model.train()
        env["all_reduce"](total)
        return (total[0] / total[1]).item()

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self):
        c, env, dev = self.cfg, self.env, self.env["device"]
        self.load_checkpoint()
        total = self.plan.total_steps
        if self.step >= total:
            env["log"](f"track {self.track}: already finished ({total} steps)")
            return
        fwd = torch.compile(self.model) if c.compile else self.model
        ddp = DDP(fwd, process_group=env["group"]) if env["group_size"] > 1 else fwd
        every = lambda epochs: max(1, round(epochs * self.spe)) if epochs > 0 else None
        eval_steps, ckpt_steps = every(c.eval_every_epochs), every(c.ckpt_every_epochs)
        if self.step == 0:  # the starting point of the val curve
            self.log_eval()
        self.model.train()
        step_time = 0.0
        while self.step < total:
            t0 = time.time()
            # dropout RNG is a pure function of (seed, rank, step): a resumed run draws the same masks,
            # and no RNG state has to be saved or gathered from the ranks
            torch.manual_seed(((self.seed * 65_537) + env["group_rank"]) * 1_000_003 + self.step)
            lr_mult, wd_mult = self.plan.multipliers(self.step)
            self.set_multipliers(lr_mult, wd_mult)
            loss_sum = torch.zeros((), device=dev)
            for a in range(self.accum):
                x, y = self.loader.micro_batch(self.step, env["group_rank"] * self.accum + a, self.micro_rows, dev)
                sync = ddp.no_sync() if (ddp is not fwd and a < self.accum - 1) else nullcontext()
                with sync:  # one `with`: no_sync() is a generator context manager and cannot be entered twice
                    with self.autocast:
                        loss = self.plan.loss(ddp, x, y) / self.accum
                    loss.backward()
                loss_sum += loss.detach()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.muon.step()
            self.adam.step()
            self.muon.zero_grad(set_to_none=True)
            self.adam.zero_grad(set_to_none=True)
            env["all_reduce"](loss_sum)
            loss_value = loss_sum.item() / env["group_size"]
            self.step += 1
            step_time += time.time() - t0
            if not math.isfinite(loss_value):
                last = (f"{self.ckpt_path} (step {safe_load(self.ckpt_path, 'checkpoint')['step']})"
                        if self.ckpt_path.exists() else "none yet")
                raise RunError(f"track {self.track}: loss is {loss_value} at step {self.step}; nothing was saved from this "
                               f"state. Last good checkpoint: {last}. Lower the learning rates and re-run with --resume=True")
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

    def log_eval(self):
        losses = {s: self.evaluate(s) for s in ("val", "fitness")}
        self.env["log"](f"track {self.track} | step {self.step} | epoch {self.step / self.spe:.2f} | "
                        f"val {losses['val']:.4f} | fitness {losses['fitness']:.4f}")
        self.jsonl(dict(kind="eval", step=self.step, epoch=self.step / self.spe, **losses))

    def log_line(self, loss, dt):
        c, total = self.cfg, self.plan.total_steps
        g = self.muon.param_groups[0]
        tok_s = c.batch_tokens / dt if dt > 0 else float("nan")
        mfu = f"{self.flops_per_step / dt / (self.peak * self.env['group_size']) * 100:5.1f}%" if self.peak and dt > 0 else "    -"
        eta = (total - self.step) * dt
        self.env["log"](f"track {self.track} | step {self.step:6d}/{total} ({100 * self.step / total:5.1f}%) | "
                        f"epoch {self.step / self.spe:7.2f} | loss {loss:.4f} | lr {g['lr']:.2e} | wd {g['weight_decay']:.3f} | "
                        f"{dt * 1000:7.1f} ms | {tok_s:9,.0f} tok/s | mfu {mfu} | eta {eta / 60:6.1f} min")
        self.jsonl(dict(kind="train", step=self.step, epoch=self.step / self.spe, loss=loss, lr=g["lr"],
                        wd=g["weight_decay"], ms=dt * 1000, tok_s=tok_s))

    def jsonl(self, row):
        if self.env["group_rank"] == 0:
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------------------------------
def pick_device(kind="auto"):
    """cuda (this process's LOCAL_RANK GPU), then mps, then cpu; or the one asked for."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """bf16 autocast on CUDA; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def setup_distributed(cfg):
    """Process group (nccl on CUDA, gloo on CPU) and the split of the world into per-track groups."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(cfg.device)
    kind = device.type
    tracks = num_tracks(cfg)
    n_groups = min(world, tracks)
    group_size = world // n_groups
    group_index = rank // group_size
    group = None
    if world > 1:
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
        for g in range(n_groups):  # every rank must create every group
            ranks = list(range(g * group_size, (g + 1) * group_size))
            pg = dist.new_group(ranks)
            if g == group_index:
                group = pg
    group_rank = rank % group_size
    verbose = group_rank == 0
    return dict(
        world=world, rank=rank, device=device, group=group, group_size=group_size, group_rank=group_rank,
        my_tracks=[t for t in range(tracks) if t % n_groups == group_index],
        log=lambda msg: print(msg, flush=True) if verbose else None,
        barrier=(lambda: dist.barrier(group=group)) if group_size > 1 else (lambda: None),
        all_reduce=(lambda t: dist.all_reduce(t, group=group)) if group_size > 1 else (lambda t: None))


def load_data(cfg):
    data = {}
    for split in ("train", "fitness", "val"):
        data[split], meta = load_split(cfg.data_dir, split)
        data[split + "_meta"] = meta
        top = int(data[split].max())  # the model's vocab comes from the meta: a token past it would crash mid-run
        if not (top < meta["vocab_size"] and meta["bos_id"] < meta["vocab_size"]):
            raise DataError(f"{Path(cfg.data_dir) / f'{split}.json'} says vocab_size {meta['vocab_size']} (bos_id "
                            f"{meta['bos_id']}) but {split}.bin holds token id {top}: the meta does not match its data; "
                            f"re-run prepare_data.py for {cfg.data_dir}")
    data["meta"] = data["train_meta"]
    tok = lambda m: (m["tokenizer"], m["vocab_size"])
    for split in ("fitness", "val"):
        if tok(data[split + "_meta"]) != tok(data["meta"]):
            raise DataError(f"{cfg.data_dir}: {split} was tokenized with {tok(data[split + '_meta'])}, train with "
                            f"{tok(data['meta'])} (tokenizer, vocab_size): re-run prepare_data.py for this folder")
    return data


def prepare_run_dir(cfg, env, data):
    """All ranks use cfg.out_dir (one deterministic name, no timestamps); rank 0 checks and writes config.json."""
    run_dir = Path(cfg.out_dir)
    config_path = run_dir / "config.json"
    record = dict(config=asdict(cfg), data={s: data[s + "_meta"]["sha256"] for s in ("train", "fitness", "val")})
    if env["rank"] == 0:
        if config_path.exists():
            if not cfg.resume:
                raise RunError(f"{run_dir} already holds a run: add --resume=True to continue it, or set --out_dir=<new folder>")
            old = json.loads(config_path.read_text())
            for key, value in old["config"].items():
                now = record["config"].get(key)
                if key not in RESUME_SAFE_KEYS and json.dumps(now) != json.dumps(value):
                    raise RunError(f"cannot resume {run_dir}: config key '{key}' was {value!r}, now {now!r}, which changes "
                                   f"what the run computes. Use the original value or a new --out_dir")
            if old["data"] != record["data"]:
                raise RunError(f"cannot resume {run_dir}: the data in {cfg.data_dir} differs from the data it was trained on "
                               f"(sha256 in {config_path}). Use the original data or a new --out_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, config_path)
    if env["world"] > 1:
        dist.barrier()


def main(argv):
    try:
        cfg = load_config(argv)
        data = load_data(cfg)
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), len(data["train"]))
        env = setup_distributed(cfg)
        prepare_run_dir(cfg, env, data)
        t = Track(cfg, env["my_tracks"][0], env, data)
        if env["rank"] == 0:
            print("config:", json.dumps(asdict(cfg)))
            print(f"model: {cfg.model_size}, {t.model.num_params() / 1e6:.2f}M params, {t.model.flops_per_token() / 1e6:.1f} MFLOPs/token | "
                  f"data: {len(data['train']):,} train tokens ({data['meta']['tokenizer']}), {len(data['val']):,} val, "
                  f"{len(data['fitness']):,} fitness")
            print(f"batch: {cfg.micro_batch_size} seqs x {cfg.seq_len} tokens x {t.accum} accum x {env['group_size']} ranks/track = "
                  f"{cfg.batch_tokens:,} tokens/step | {t.spe} steps/epoch | {num_tracks(cfg)} track(s) on {env['world']} rank(s) "
                  f"in {env['world'] // env['group_size']} group(s) | device {env['device']}")
            if cfg.mode in ("q0", "chain"):
                import q0
                print(q0.describe_budget(cfg))
        t.train()
        for track in env["my_tracks"][1:]:  # one model in memory at a time
            del t
            t = Track(cfg, track, env, data)
            t.train()
        if env["rank"] == 0:
            print(f"done: outputs in {cfg.out_dir}/ (config.json, track*/log.jsonl, members/*.pt; manifest via read_manifest)")
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # one module, not two: q0.py's `from train import safe_load` must raise the RunError that main() catches
    sys.modules.setdefault("train", sys.modules["__main__"])
    main(sys.argv[1:])
