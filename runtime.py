"""
runtime.py: what runs around the training loop, so the loop (train.train_track) reads as the method and nothing else.

- session(): around every entry point. Reads the config (config.load), prints a UserError as one line (exit 2 for a
  bad config, 1 otherwise) and, when the fix is to run again, the exact command; SIGINT or SIGTERM (what SLURM and
  Kubernetes send before SIGKILL) ends with what was kept and the command that continues, exit 130 or 143.
- start(): everything before the first step of a training launch, every check before anything is written: the
  data, the process groups, the run folder (config.json, the resume rules of config.py, each start's provenance),
  and the start-up lines (the batch arithmetic, the memory estimate, the budget).
- TrackRun: one track's files and the loop's named calls, for one track:

    with TrackRun(cfg, track, env, data_meta, model, plan) as run:   # RUN/track<i>/, its lock
        step, last_loss = run.resume(optimizers)   # the checkpoint's state (step 0: a fresh start)
        loss, stop = run.reduce(loss_sum)          # the group's mean loss, and whether a rank was signalled
        run.check_step(step, loss, grad_norm)      # a NaN/inf stops before the optimizer step
        run.log_train(...); run.log_eval(...)      # console (the group's first rank) and track<i>/log.jsonl
        run.save_member(row, step)                 # members/<name>.pt + its manifest row -> the weights saved
        run.end_step(step, state, stop)            # a checkpoint when due (written in the background); a stop

  Inside a track's loop a signal is acted on at the end of the step it arrives in (all ranks of the track at the same
  step): the checkpoint being written finishes, one of that step is written (at 1.8B ~15 GB: a device-to-host copy,
  the sha256 at ~1.8 GB/s and the write, about half a minute on a fast file system; not measured on a GPU node), then
  the run stops; elsewhere, or at a second signal, it stops at once (a second SIGTERM excepted: under SLURM each
  worker gets one from SLURM and one from torchrun). Nothing is written from a state that failed a finiteness check.
  A track's files: ckpt.pt (model, optimizers, step, plan state, config, log row count; sha256 inside), started.json
  (written with the first checkpoint: from then on a start without ckpt.pt is refused instead of training the track
  again from step 0), log.jsonl (one JSON row per log line and eval), manifest.json (the members, in order), lock.
- devices and process groups (nccl on CUDA, gloo on CPU), and the estimates: FLOPs per token, MFU, memory.

    python runtime.py --size=1.8B --memory=2   # parameter counts, FLOPs/token and training memory of a named size
"""
import datetime
import hashlib
import importlib.util
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config
import model as gpt
import store
from config import UserError


# -----------------------------------------------------------------------------------------------------
# session: one line for a UserError; SIGINT (Ctrl-C) and SIGTERM stop cleanly
class Stop(BaseException):
    """A stop asked for by a signal: not an error, so not an Exception."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_signals = dict(pending=None, deferring=False)


def _on_signal(signum, frame):
    if _signals["deferring"] and _signals["pending"] is None:
        _signals["pending"] = signum  # acted on at the end of the step (TrackRun.end_step)
        return
    if _signals["deferring"] and _signals["pending"] == signum == signal.SIGTERM:
        return  # the same request again: SLURM signals every process of a step, and torchrun forwards it too
    raise Stop(signum)


@contextmanager
def session(argv, Config, doc):
    """Around a launch (module docstring) -> yields the config read from argv (config.load: --help, every key
    checked). A Config with an out_dir is a run that continues with --resume=True; any other command continues by
    running it again (eval.py keeps what is scored, prepare_data.py starts over)."""
    s = dict(cfg=None)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be installed
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        s["cfg"] = config.load(Config, argv, doc)
        yield s["cfg"]
        if _signals["pending"] is not None:  # a signal that came after the last step's check
            raise Stop(_signals["pending"])
    except UserError as e:
        again = f". Then run: {command(Config, argv, s['cfg'])}" if e.rerun else ""
        print(f"error: {str(e).rstrip('. ') if e.rerun else e}{again}", file=sys.stderr, flush=True)
        sys.exit(e.status)
    except (Stop, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        cfg, name = s["cfg"], signal.Signals(signum).name
        if cfg is not None and hasattr(cfg, "resume"):
            ckpts = sorted(str(p) for p in Path(cfg.out_dir).glob("track*/ckpt.pt"))
            print(f"\ninterrupted ({name}). Checkpoints: {', '.join(ckpts) or 'none yet'}; finished members are in "
                  f"{cfg.out_dir}/members. Continue exactly where it stopped with:\n  {command(Config, argv, cfg)}",
                  file=sys.stderr, flush=True)
        elif cfg is not None:
            print(f"\ninterrupted ({name}); every file written so far is whole. Continue with:\n  "
                  f"{command(Config, argv, cfg)}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        _signals.update(pending=None, deferring=False)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def command(Config, argv, cfg):
    """The command that continues: the entry point with the same arguments, quoted for a shell, plus --resume=True
    for a run whose folder already holds one (config.json written)."""
    script = os.path.relpath(sys.modules[Config.__module__].__file__)  # a subclass's (q0.py's, student.py's) own
    args = [a for a in argv if a not in ("--resume=True", "--resume")]
    resumes = cfg is not None and hasattr(cfg, "resume") and (Path(cfg.out_dir) / "config.json").exists()
    return shlex.join(["python", script, *args] + (["--resume=True"] if resumes else []))


# -----------------------------------------------------------------------------------------------------
# devices and process groups
def pick_device(kind="auto"):
    """cuda (this process's LOCAL_RANK GPU), then mps, then cpu; or the one asked for, if this machine has it."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(kind):
        raise UserError(f"device {kind!r} is not available here (torch {torch.__version__}, cuda "
                        f"{'yes' if torch.cuda.is_available() else 'no'}): use --device=auto or --device=cpu", status=2)
    if kind == "cuda":  # before the first allocation: segments that grow, so eval's and training's peaks do not fragment
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if kind == "cpu":  # subnormal floats (< 1.2e-38) to zero: weight decay shrinks the rows of bytes never seen and of
        torch.set_flush_denormal(True)  # dead units into that range, where x86 runs ~6x slower (BENCHMARKS.md 1j)
    return device


def autocast(device):
    """bf16 autocast on CUDA; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def init_distributed(device, timeout_minutes=180):
    """The default process group under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU. The timeout is long
    (the reference uses 3 hours) because ranks wait for one another through unequal work: one rank writing a
    checkpoint or scoring more members; NCCL's default of 10 minutes would kill the job there."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=timeout, **restart_store(world, rank, timeout))
    return world, rank


def restart_store(world, rank, timeout):
    """torchrun --max-restarts keeps one key-value store (its agent's) for every attempt and does not scope the keys
    by attempt (torch 2.5-2.13, pytorch/pytorch#135712): a restarted rank can read the dead attempt's gloo address
    or NCCL id and fail to connect ("Connection refused" or a hang: 8 of 12 test jobs, BENCHMARKS 5). On one node
    every worker is restarted together, so TORCHELASTIC_RESTART_COUNT names the attempt on every rank: scope the
    keys by it. Across nodes it does not (a healthy node restarts its workers without counting), so there the fix
    is torchrun's own: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt). -> init_process_group kwargs."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0:
            print("warning: torchrun restarted the workers on a store shared across attempts; if they fail to connect, "
                  "launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", flush=True)
        return {}
    store_ = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timeout)
    return dict(store=dist.PrefixStore(f"attempt{attempt}", store_), rank=rank, world_size=world)


def setup_distributed(cfg):
    """Process group (nccl on CUDA, gloo on CPU) and the split of the world into per-track groups."""
    device = pick_device(cfg.device)
    world, rank = init_distributed(device, cfg.dist_timeout_minutes)
    tracks = cfg.num_tracks()
    n_groups = min(world, tracks)
    group_size = world // n_groups
    group_index, group_rank = divmod(rank, group_size)
    group = None
    for g in range(n_groups if world > 1 else 0):  # every rank must create every group
        pg = dist.new_group(list(range(g * group_size, (g + 1) * group_size)),
                            timeout=datetime.timedelta(minutes=cfg.dist_timeout_minutes))  # as long as the world's
        group = pg if g == group_index else group
    return dict(
        world=world, rank=rank, device=device, group=group, group_size=group_size, group_rank=group_rank,
        my_tracks=[t for t in range(tracks) if t % n_groups == group_index],
        log=lambda msg: print(msg, flush=True) if group_rank == 0 else None,
        barrier=(lambda: dist.barrier(group=group)) if group_size > 1 else (lambda: None),
        all_reduce=(lambda t: dist.all_reduce(t, group=group)) if group_size > 1 else (lambda t: None))


def wrap(model, cfg, env):
    """-> (the forward the loop calls, the DDP module or None). DDP first, then compile the DDP module: dynamo splits
    the graph at DDP's buckets so the gradient all-reduce overlaps the backward (PyTorch's DDP + torch.compile notes);
    gradients live in the buckets (no copy). The uncompiled model stays the one saved."""
    ddp = DDP(model, process_group=env["group"], gradient_as_bucket_view=True,
              bucket_cap_mb=cfg.ddp_bucket_cap_mb) if env["group_size"] > 1 else None
    return (torch.compile(ddp or model) if cfg.compile else (ddp or model)), ddp


def no_sync(ddp, accumulating):
    """DDP's no_sync() while gradients accumulate (the all-reduce runs on the last micro-batch only)."""
    return ddp.no_sync() if (ddp and accumulating) else nullcontext()


def broadcast_weights(model, env):
    """Every rank of the group takes its first rank's weights: after a perturbation (or re-init) drawn from the same
    seed on every rank they are already equal; this makes it certain, whatever the kernels, for one broadcast."""
    if env["group_size"] > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=env["rank"] - env["group_rank"], group=env["group"])


# -----------------------------------------------------------------------------------------------------
# start-up: data, checks, process groups, the run folder, the lines that describe the launch
def load_data(cfg):
    """The three splits (store.load_split: meta, size and sha256 checked) and their token range."""
    data, where = {}, Path(cfg.data_dir)
    if where.is_file():
        raise UserError(f"--data_dir={where} is a file, not a folder of prepared data: point it at the folder "
                        f"prepare_data.py wrote (its default for the quick start: data/pydoc-byte)", status=2)
    for split in ("train", "fitness", "val"):
        data[split], meta = store.load_split(cfg.data_dir, split)
        data[split + "_meta"] = meta
        top = int(data[split].max())  # the model's vocab comes from the meta: a token past it would crash mid-run
        if not (top < meta["vocab_size"] and meta["bos_id"] < meta["vocab_size"]):
            raise UserError(f"{Path(cfg.data_dir) / f'{split}.json'} says vocab_size {meta['vocab_size']} (bos_id "
                            f"{meta['bos_id']}) but {split}.bin holds token id {top}: the meta does not match its data; "
                            f"re-run prepare_data.py for {cfg.data_dir}")
    data["meta"] = data["train_meta"]
    tok = lambda m: (m["tokenizer"], m["vocab_size"])
    for split in ("fitness", "val"):
        if tok(data[split + "_meta"]) != tok(data["meta"]):
            raise UserError(f"{cfg.data_dir}: {split} was tokenized with {tok(data[split + '_meta'])}, train with "
                            f"{tok(data['meta'])} (tokenizer, vocab_size): re-run prepare_data.py for this folder")
    return data


def start(cfg, data, steps_per_epoch, Plan):
    """Every check, then the process groups and the run folder, then the start-up lines -> env. Nothing is written
    before the last check: config.check_run (the world, the batch, the cycle) and Plan.check (a plan's own, with the
    data: the student's teacher run)."""
    config.check_run(cfg, int(os.environ.get("WORLD_SIZE", 1)), steps_per_epoch)
    Plan.check(cfg, data)
    if cfg.tracker != "none" and importlib.util.find_spec(cfg.tracker) is None:
        raise UserError(f"config key 'tracker' = {cfg.tracker!r}: the {cfg.tracker} package is not installed: pip install "
                        f"-r requirements-tracker.txt (or --tracker=none)", status=2)
    env = setup_distributed(cfg)
    prepare_run_dir(cfg, env, data)
    if env["rank"] == 0:
        print(describe_setup(cfg, env, data, steps_per_epoch))
        if line := describe_budget(cfg):
            print(line)
    return env


def prepare_run_dir(cfg, env, data):
    """All ranks use cfg.out_dir (one deterministic name, no timestamps); rank 0 checks and writes config.json. A
    resume may change only what config.resume_changes allows: the first config is kept and each resume that changes
    a key appends {keys: {key: [old, new]}, at} to "resumes". Every start appends its store.provenance() to
    "provenance" with its time, unless it equals the last one there (a resume on the same code and machine writes
    nothing)."""
    run_dir = Path(cfg.out_dir)
    if blocker := store.not_a_folder(run_dir):  # before anything is written
        raise UserError(f"--out_dir={cfg.out_dir} cannot be a run folder: {blocker} is a file. Point --out_dir at a "
                        f"folder (a new one, or a run to continue)", status=2)
    config_path = run_dir / "config.json"
    record = dict(config=asdict(cfg), data={s: data[s + "_meta"]["sha256"] for s in ("train", "fitness", "val")})
    if env["rank"] == 0:
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        start_ = dict(store.provenance(env, data), at=at)
        record["provenance"] = [start_]
        # torchrun --max-restarts passes --resume=True to its first attempt too: there, nothing to resume is fine
        first_attempt = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
        if cfg.resume and not config_path.exists() and not first_attempt:
            raise UserError(f"nothing to resume: {run_dir} holds no run ({config_path} is missing). Drop --resume=True "
                            f"to start it, or point --out_dir at the run to continue")
        if config_path.exists():
            if not cfg.resume:
                raise UserError(f"{run_dir} already holds a run: add --resume=True to continue it, or set --out_dir=<new folder>")
            old = read_record(run_dir)
            changed = config.resume_changes(run_dir, config.current_config(old), record["config"])
            if old["data"] != record["data"]:
                raise UserError(f"cannot resume {run_dir}: the data in {cfg.data_dir} differs from the data it was trained on "
                                f"(sha256 in {config_path}). Use the original data or a new --out_dir")
            starts = old.get("provenance", [])
            moved = not starts or dict(starts[-1], at=at) != start_  # another commit, machine, thread count, ...
            record = dict(old, provenance=starts + [start_] if moved else starts) if changed or moved else None
            if changed:
                record["resumes"] = old.get("resumes", []) + [dict(keys=changed, at=at)]
        if record:  # a resume that changes nothing leaves config.json as it is
            store.write_json(record, config_path, checked=True)
    if env["world"] > 1:
        dist.barrier()
    if not config_path.is_file():  # rank 0 wrote it: a node that cannot see it would train its tracks apart
        raise UserError(f"{config_path}, written by rank 0, is not visible to rank {env['rank']}: the run folder must be "
                        f"on a file system every node sees (a node given another trajectory after a restart would "
                        f"otherwise find no checkpoint and start it over)")


def read_record(run_dir):
    """RUN/config.json, its sha256 checked (an edit is refused, naming the fix). One that is unreadable (cut short by a
    full disk, say) is rebuilt, with a warning, from the newest track checkpoint, which holds the config it ran with,
    and the data folder's metas as they are now: the record of earlier resumes and starts is lost, not the run."""
    path = Path(run_dir) / "config.json"
    try:
        return store.load_json(path)
    except store.Changed as e:
        raise UserError(f"run record {path}: {e}: restore it, or delete its {store.JSON_DIGEST} line to keep a "
                        f"deliberate edit") from None
    except (OSError, ValueError) as e:
        why = config.one_line(e)
    ckpts = sorted(Path(run_dir).glob("track*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not path.exists() or not ckpts:
        raise UserError(f"run record {path} is {'missing' if not path.exists() else f'unreadable ({why})'} and no "
                        f"track checkpoint holds the config to rebuild it from: train the run again in a new --out_dir")
    cfg = store.safe_load(ckpts[-1], "checkpoint", "delete it; its track trains again from step 0")["config"]
    data = {s: store.load_split(cfg["data_dir"], s, verify=False)[1]["sha256"] for s in ("train", "fitness", "val")}
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = dict(config=cfg, data=data, provenance=[], rebuilt=dict(checkpoint=str(ckpts[-1]), at=at))
    store.write_json(record, path, checked=True)
    print(f"warning: {path} was unreadable ({why}); rebuilt it from {ckpts[-1]} (the config it ran with) and "
          f"{cfg['data_dir']}'s metas (the data's sha256 as it is now; the record of earlier starts is lost)",
          file=sys.stderr, flush=True)
    return record


def describe_setup(cfg, env, data, steps_per_epoch):
    """The batch arithmetic, once (most nanoGPT questions are about exactly this), and the memory one GPU needs for
    it (memory_estimate, with the frozen teachers a rank holds beside the model)."""
    with torch.device("meta"):  # sizes only: no memory, no init
        m = gpt.GPT(gpt.config_for(cfg.model_size, vocab_size=data["meta"]["vocab_size"], seq_len=cfg.seq_len))
    accum = cfg.batch_tokens // (cfg.seq_len * cfg.micro_batch_size * env["group_size"])
    return "\n".join([
        "config: " + json.dumps(asdict(cfg)),
        f"model: {cfg.model_size}, {m.num_params() / 1e6:.2f}M params, {flops_per_token(m) / 1e6:.1f} "
        f"MFLOPs/token | data: {len(data['train']):,} train tokens ({data['meta']['tokenizer']}), {len(data['val']):,} "
        f"val, {len(data['fitness']):,} fitness",
        f"batch: {cfg.micro_batch_size} seqs x {cfg.seq_len} tokens x {accum} accum x {env['group_size']} ranks/track = "
        f"{cfg.batch_tokens:,} tokens/step | {steps_per_epoch} steps/epoch | {cfg.num_tracks()} track(s) on "
        f"{env['world']} rank(s) in {env['world'] // env['group_size']} group(s) | device {env['device']}",
        "memory per process (estimate, runtime.memory_estimate): " + memory_line(m.cfg, cfg, teachers_in_memory(cfg))])


def memory_line(model_cfg, cfg, teachers):
    est = memory_estimate(replace(model_cfg, dropout=cfg.dropout), cfg.micro_batch_size, "fp32" if teachers else None,
                          max(1, teachers), cfg.eval_batch_size)
    parts = ("weights", "grads", "muon_momentum", "adam_moments", "teacher", "activations", "logits_train")
    return (f"peak {est['peak_train'] / 2**30:.2f} GiB in training ({', '.join(f'{k} {est[k] / 2**30:.2f}' for k in parts)}), "
            f"{est['peak_eval'] / 2**30:.2f} GiB at eval (batch {cfg.eval_batch_size})")


def teachers_in_memory(cfg):
    """Frozen model copies a rank holds beside the one it trains (for the memory estimate): the student's K online
    teachers (none from a top-k file), q0's previous snapshot, the mixture teacher's K, or none."""
    if cfg.mode == "student":
        return 0 if cfg.teacher_topk else cfg.teacher_k
    if not hasattr(cfg, "num_cycles") or max(1, cfg.distill_after_cycles) >= cfg.num_cycles:
        return 0
    return cfg.distill_teacher_k if getattr(cfg, "distill_teacher", "previous") == "mixture" else 1


def describe_budget(cfg):
    """One line: what the run spends its epochs on (None for a single model or a naive ensemble)."""
    if cfg.mode == "student":
        return (f"student: {cfg.epochs:g} epochs against the top {cfg.teacher_k} of {cfg.teacher_run}'s prior (a="
                f"{cfg.distill_alpha}, T={cfg.distill_temperature}; " + (f"{cfg.teacher_k} teacher forwards per step"
                if not cfg.teacher_topk else f"its top {cfg.teacher_topk} per token from a file, computed once") +
                f"), from {cfg.student_init}")
    if not hasattr(cfg, "num_cycles"):
        return None
    total = cfg.num_trajectories * cfg.num_cycles * cfg.epochs_per_cycle
    teacher = ("the previous snapshot" if getattr(cfg, "distill_teacher", "previous") == "previous" else
               f"the prior's top {cfg.distill_teacher_k} of the earlier snapshots")
    first = max(1, cfg.distill_after_cycles) + 1  # the snapshot of cycle k (k >= 1) is the teacher of cycle k + 1
    distill = (f"chain distillation in cycles {first}-{cfg.num_cycles} (a={cfg.distill_alpha}, T={cfg.distill_temperature}, "
               f"teacher: {teacher})"
               if first <= cfg.num_cycles else "no chain distillation (distill_after_cycles >= num_cycles)")
    between = ("each cycle ends in a fresh model (re-initialised, new optimizer state; perturb_scale_* unused)"
               if cfg.mode == "chain" else f"noise {cfg.perturb_scale_start:g} -> {cfg.perturb_scale_end:g} x each tensor's std "
               f"after each snapshot")
    chosen = (f"budget={cfg.budget:g}, allocated by q0.ALLOCATIONS (picked on fitness at 2-64 epochs, BENCHMARKS.md 1k): "
              if cfg.budget else "")  # (every config with num_cycles is a q0.Q0Config)
    return (f"{cfg.mode} budget: {chosen}{cfg.num_trajectories} trajectories x {cfg.num_cycles} cycles x {cfg.epochs_per_cycle} "
            f"epochs/cycle = {total:g} epochs, {cfg.num_trajectories * cfg.num_cycles} snapshots; {distill}; {between}")


# -----------------------------------------------------------------------------------------------------
# estimates: FLOPs, MFU, memory
def flops_per_token(model):
    """Training FLOPs per token (forward + backward): 6 N + 12 L T C  (PaLM appendix B; the input
    embedding is a lookup, not a matmul, so it is left out of N)."""
    c = model.cfg
    return 6 * model.num_params(embedding=False) + 12 * c.n_layer * c.seq_len * c.n_embd


# dense bf16 peak by the card's name (torch.cuda.get_device_name), most specific first; a card not listed (an H100
# whose name says neither PCIe, NVL nor SXM's "HBM3") shows no MFU rather than a guessed one
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H200": 989e12,
              "H800": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_estimate(cfg, micro_batch, teacher="fp32", teachers=1, eval_batch=16):
    """Bytes one GPU holds to train `cfg` (a model.GPTConfig) at `micro_batch` sequences in bf16 autocast (fp32
    weights), as train.py keeps them; n = micro_batch * seq_len tokens, N parameters (N_muon in the blocks, N_adam
    embedding + head):
        weights, grads        4 N each (fp32)
        muon_momentum         4 N_muon;  adam_moments  8 N_adam
        cautious_copy         4 N_muon, only inside step(), when the activations are freed (cautious_weight_decay)
        teacher               4 N as q0.py's frozen fp32 copy, 2 N in bf16 (the reference's), or None: 0; x teachers
                              (distill_teacher="mixture" holds distill_teacher_k of them)
        weight_casts          2 (N - embedding): autocast's bf16 copy of every matrix, kept for the backward
        activations           n L (36 C + 8 M + 12 H + 8 [+ 4 C dropout]) + n (10 C + 24): what autograd keeps
                              (tests/test_model.py measures it); L x 36 C counts q, k, v's three bf16 copies of the
                              input, QK-norm's fp32 q, k and FlashAttention's q, k, v, out; the two dropout masks
                              are bf16 on CPU (2 C on CUDA, where they are bool)
        activations_ckpt      n L 4 C + one block's: if each block were recomputed in the backward (not in model.py)
        logits_train          4 n V x 4 (tanh and log-softmax outputs kept, two gradients), x 8 with a teacher
                              (its logits, log-softmax and probabilities and the KL's product besides)
        logits_eval           eval_batch T (4 V x 2 + 2 V_pad): fp32 logits and cross-entropy's log-softmax, the bf16
                              head output (score_windows, 16 windows a forward)
    peak_train = weights + grads + optimizer states + teacher + weight_casts + activations + logits_train;
    peak_step = weights + grads + optimizer states + teacher + cautious_copy (inside step());
    peak_eval = weights + optimizer states + teacher + logits_eval (grads are None between steps).
    Left out: the RoPE tables, allocator fragmentation, NCCL and the CUDA context (a few GB)."""
    C, M, H, L, V, Vp = cfg.n_embd, cfg.mlp_hidden, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.padded_vocab_size
    n = micro_batch * cfg.seq_len
    n_embed = Vp * C
    n_muon = L * (4 * C * C + 3 * C * M)
    N = n_muon + 2 * n_embed
    per_block = 36 * C + 8 * M + 12 * H + 8 + (4 * C if cfg.dropout else 0)
    est = dict(weights=4 * N, grads=4 * N, muon_momentum=4 * n_muon, adam_moments=8 * 2 * n_embed,
               cautious_copy=4 * n_muon, teacher={"fp32": 4 * N, "bf16": 2 * N, None: 0}[teacher] * teachers,
               weight_casts=2 * (N - n_embed), activations=n * L * per_block + n * (10 * C + 24),
               activations_ckpt=n * (L * 4 * C + per_block) + n * (10 * C + 24),
               logits_train=(8 if teacher else 4) * n * V * 4, logits_eval=eval_batch * cfg.seq_len * (8 * V + 2 * Vp))
    held = est["weights"] + est["muon_momentum"] + est["adam_moments"] + est["teacher"]
    est["peak_train"] = held + est["grads"] + est["weight_casts"] + est["activations"] + est["logits_train"]
    est["peak_step"] = held + est["grads"] + est["cautious_copy"]
    est["peak_eval"] = held + est["logits_eval"]
    return est


# -----------------------------------------------------------------------------------------------------
def duration(seconds):
    """A time for a person: seconds below two minutes, minutes below two hours, then hours."""
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else
            f"{seconds / 3600:.1f} h")


class Tracker:
    """A run's rows mirrored to TensorBoard or Weights & Biases (the `tracker` key; its package imported only then,
    `pip install -r requirements-tracker.txt`): one tracker run per track, and one for eval.py's report, grouped by the
    run folder; each row's numbers as scalars "<kind>/<field>" at its step; the config and each start's provenance
    once. Both work offline: TensorBoard's event files go to RUN/tensorboard/<name> (`tensorboard --logdir
    RUN/tensorboard`); W&B runs in its offline mode under RUN/wandb (`wandb sync` uploads it) unless WANDB_MODE says
    otherwise. A resumed track drops the events of the steps it redoes (TensorBoard's purge_step)."""

    def __init__(self, kind, run_dir, name, record, start_step=0):
        self.kind = kind
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard" / name), purge_step=start_step or None)
            if not start_step:
                self.writer.add_text("config", "    " + json.dumps(record, indent=1).replace("\n", "\n    "))
        else:
            import wandb
            run_id = hashlib.sha256(f"{Path(run_dir).resolve()}/{name}".encode()).hexdigest()[:16]  # a resume appends
            self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "q0"), group=Path(run_dir).name, name=name,
                                     id=run_id, resume="allow", dir=str(run_dir), config=record,
                                     mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row):
        step = int(row.get("step", 0))
        numbers = {f"{row.get('kind', 'row')}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        else:
            self.writer.log(numbers, step=step)

    def close(self):
        (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


def tracker_for(kind, run_dir, name, start_step=0):
    """A Tracker of the run (its config.json's config and provenance attached), or None for tracker none."""
    if kind == "none":
        return None
    record = store.load_json(Path(run_dir) / "config.json")
    return Tracker(kind, run_dir, name, dict(config=record["config"], provenance=record.get("provenance")), start_step)


MAX_WEIGHT = 1e4  # no trained weight comes near: the init's largest is ~5 (the embedding's N(0, 1)), weight decay keeps them so


class TrackRun:
    """One track's files and the loop's named calls (the module docstring)."""

    def __init__(self, cfg, track, env, data_meta, model, plan):
        self.cfg, self.track, self.env, self.meta, self.model, self.plan = cfg, track, env, data_meta, model, plan
        self.first = env["group_rank"] == 0  # the group's first rank writes; every rank computes
        self.dir = Path(cfg.out_dir) / f"track{track}"
        if blocker := store.not_a_folder(self.dir):  # (prepare_run_dir checked out_dir; this is a file inside the run)
            raise UserError(f"{blocker} is a file where track {track}'s folder goes: move it away, or use a new "
                            f"--out_dir", status=2)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path, self.started_path, self.log_path = self.dir / "ckpt.pt", self.dir / "started.json", self.dir / "log.jsonl"
        self.writer, self.write_error = None, None  # the background checkpoint write, and its failure if any
        self.log_rows = 0  # rows in log.jsonl: the checkpoint records it, so a log cut short is noticed on resume
        self.held, self.tracker = None, None
        self.last_ckpt_step = None
        spe = plan.loader.steps_per_epoch
        every = lambda epochs: max(1, round(epochs * spe)) if epochs > 0 else None
        self.eval_steps, self.ckpt_steps = every(cfg.eval_every_epochs), every(cfg.ckpt_every_epochs)
        self.flops_per_step, self.peak = flops_per_token(model) * cfg.batch_tokens, peak_flops(env["device"])
        self.step_time, self.timed_steps = 0.0, 0

    def __enter__(self):
        self.held = store.lock(self.dir) if self.first else None  # before this track's first write
        _signals["deferring"] = True
        return self

    def __exit__(self, kind, error, tb):
        try:  # still deferring signals: the write in flight finishes whole, on any way out
            if kind is None:
                self.finish_checkpoint()
            elif self.writer is not None:
                self.writer.join()
        finally:
            _signals["deferring"] = False
            if self.held:
                self.held.close()
            if self.tracker:
                self.tracker.close()
        if kind is None and _signals["pending"] is not None:  # it came after the last step's check: stop before "done"
            raise Stop(_signals["pending"])

    # ---- the log --------------------------------------------------------------------------------------
    def log(self, line):
        self.env["log"](line)

    def log_row(self, row):
        if not self.first:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.log_rows += 1
            if self.tracker:
                self.tracker.log(row)
        except OSError as e:  # a full disk: a torn last line is dropped on resume
            raise UserError(f"could not append to {self.log_path} ({e.strerror or e}). Earlier files are intact: fix "
                            f"that (free space?)", rerun=True) from None

    def log_train(self, step, loss, grad_norm, group, seconds):
        """Every log_every steps, at the first after a save (a new cycle's LR peak) and at the last: one fixed-width
        line and a log.jsonl row, with the plan's fields
        (plan.log_fields: q0's cycle, teacher, CE and KL). grad_norm: the global norm before clipping; seconds: this
        step's time (the mean over the steps timed since the last line gives ms/step, tok/s, MFU and the eta)."""
        self.step_time, self.timed_steps = self.step_time + seconds, self.timed_steps + 1
        total, spe, c = self.plan.total_steps, self.plan.loader.steps_per_epoch, self.cfg
        if step % c.log_every and step != total and step - 1 not in self.plan.save_steps:  # and a new cycle's first step
            return
        dt, f = self.step_time / self.timed_steps, self.plan.log_fields(step)
        tok_s = c.batch_tokens / dt if dt > 0 else float("nan")
        flops = self.flops_per_step * (3 + f["teacher_forwards"]) / 3  # a teacher forward: 1/3 of a forward + backward
        mfu = f"{flops / dt / (self.peak * self.env['group_size']) * 100:5.1f}%" if self.peak and dt > 0 else "    -"
        later = len(self.env["my_tracks"]) - self.env["my_tracks"].index(self.track) - 1  # tracks this group trains next
        eta = (total - step) * dt
        run_eta = f" (run {duration(eta + later * total * dt)})" if later else ""
        cycle = f" | cycle {f['cycle']} ({f['step_in_cycle']}/{f['cycle_steps']})" if "cycle" in f else ""
        parts = f" (ce {f['ce']:.3f} kl {f['kl']:.3f})" if "kl" in f else ""
        self.log(f"track {self.track} | step {step:6d}/{total} ({100 * step / total:5.1f}%) | epoch {step / spe:7.2f}{cycle} | "
                 f"loss {loss:.4f}{parts} | lr {group['lr']:.2e} | wd {group['weight_decay']:.3f} | gn {grad_norm:.2f} | "
                 f"{dt * 1000:7.1f} ms | {tok_s:9,.0f} tok/s | mfu {mfu} | eta {duration(eta):>9}{run_eta}")
        dev = self.env["device"]
        self.log_row(dict(kind="train", step=step, epoch=step / spe, loss=loss, lr=group["lr"], wd=group["weight_decay"],
                          grad_norm=float(grad_norm), ms=dt * 1000, tok_s=tok_s, eta_s=eta, **f,  # peak memory: since
                          peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None))  # start
        self.step_time, self.timed_steps = 0.0, 0

    def eval_due(self, step):
        """Every eval_every_epochs, and at the last step."""
        return (self.eval_steps and step % self.eval_steps == 0) or step == self.plan.total_steps

    def log_eval(self, step, losses):
        if not all(map(math.isfinite, losses.values())):
            self.fail(f"eval loss is not finite after step {step} ({losses})")
        spe = self.plan.loader.steps_per_epoch
        self.log(f"track {self.track} | step {step} | epoch {step / spe:.2f} | val {losses['val']:.4f} | "
                 f"fitness {losses['fitness']:.4f}")
        self.log_row(dict(kind="eval", step=step, epoch=step / spe, **losses))

    # ---- the step's checks ------------------------------------------------------------------------------
    def reduce(self, loss_sum):
        """The group's mean loss, and whether any rank was asked to stop (so all stop after the same step)."""
        stats = torch.stack([loss_sum, torch.tensor(float(_signals["pending"] is not None), device=loss_sum.device)])
        self.env["all_reduce"](stats)
        return stats[0].item() / self.env["group_size"], stats[1].item() > 0

    def check_step(self, step, loss, grad_norm):
        """Before the optimizer step: an overflow in the backward pass can leave the loss finite, so both."""
        if not math.isfinite(loss):
            self.fail(f"loss is {loss} at step {step + 1} (the step was not taken)")
        if not torch.isfinite(grad_norm):
            self.fail(f"the gradient is not finite at step {step + 1} (grad norm {grad_norm.item():.4g}, loss "
                      f"{loss:.4f}; the step was not taken)")

    def check_finite(self, step, what):
        """Before a checkpoint or a member is written: every weight finite and within MAX_WEIGHT. A diverged model can
        stay finite for a few steps (|w| ~ 1e21 at an LR of 1e6), and a checkpoint of it only diverges again on
        resume: refused here, the last checkpoint written stays a sane one to resume from."""
        for n, p in self.model.named_parameters():
            largest = p.detach().abs().max().item()
            if not largest <= MAX_WEIGHT:  # NaN and inf fail this too
                what_it_is = "not finite" if not math.isfinite(largest) else f"{largest:.3g} (diverged: beyond {MAX_WEIGHT:g})"
                self.fail(f"weight {n} is {what_it_is} after step {step}, before writing {what}")

    def fail(self, problem):
        """Stop with the truth about what is on disk: nothing is written from the bad state."""
        self.finish_checkpoint()
        last = (f"{self.ckpt_path} (step {store.safe_load(self.ckpt_path, 'checkpoint')['step']})"
                if self.ckpt_path.exists() else "none yet (the track would start over)")
        raise UserError(f"track {self.track}: {problem}; nothing was saved from this state. Last good "
                        f"checkpoint: {last}. Re-run with --resume=True and lower learning rates or a tighter clip "
                        f"(--muon_lr, --embed_lr, --head_lr, --grad_clip may change on resume; the step is logged)")

    def end_step(self, step, state, stop_asked):
        """After the step (and its eval and member): a checkpoint when due (every ckpt_every_epochs, at each save
        step, at the last); then, if any rank of the group was signalled, a checkpoint of this step and the stop."""
        plan = self.plan
        if (self.ckpt_steps and step % self.ckpt_steps == 0) or step in plan.save_steps or step == plan.total_steps:
            self.checkpoint(step, state())
        if not stop_asked:
            return
        if self.last_ckpt_step != step:
            self.checkpoint(step, state())
        self.finish_checkpoint()
        raise Stop(_signals["pending"] or signal.SIGTERM)

    # ---- members and checkpoints --------------------------------------------------------------------------
    def save_member(self, row, step):
        """members/<name>.pt (the weights, the config to rebuild it, the row) and then its manifest row."""
        self.check_finite(step, f"member {row['name']}")
        state = store.member_state(self.model)
        if self.first:
            store.save_member(self.cfg.out_dir, row, self.model, self.meta, state)
        self.env["barrier"]()
        return state

    def checkpoint(self, step, state):
        """Snapshot the state (model, optimizers, plan, ...: a dict) into host memory, then write it on a background
        thread while training goes on (at 1.8B a checkpoint is ~15 GB: written in line, the whole group would wait
        for the disk). One write at a time: the previous one is finished (and renamed into place) before the next
        snapshot; a failed write stops the run at the next checkpoint or at the end. async_checkpoints=False writes
        in line."""
        self.check_finite(step, "the checkpoint")
        self.finish_checkpoint()
        self.last_ckpt_step = step
        spe = self.plan.loader.steps_per_epoch
        state = dict(state, data_position=dict(zip(("epoch", "batch"), divmod(step, spe))), config=asdict(self.cfg),
                     log_rows=self.log_rows)
        if not self.first:
            return
        if not self.cfg.async_checkpoints:
            return self.write_checkpoint(state)
        store.check_disk(self.ckpt_path, store.nbytes(state))  # a full disk stops the run here, not a checkpoint later
        state = store.to_host(state)  # a copy: the live tensors change under the writer

        def write():
            try:
                self.write_checkpoint(state)
            except BaseException as e:  # raised again in the training thread by finish_checkpoint
                self.write_error = e
        self.writer = threading.Thread(target=write, name=f"ckpt-track{self.track}")
        self.writer.start()

    def write_checkpoint(self, state):
        store.save_torch(state, self.ckpt_path)
        if not self.started_path.exists():
            store.write_json(dict(first_checkpoint_step=state["step"], host=socket.gethostname()), self.started_path)

    def finish_checkpoint(self):
        """Wait for the checkpoint being written, if any; raise its error, if it failed."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error

    def resume(self, optimizers):
        """-> (step, last train loss) from the checkpoint, its state loaded into the model, the optimizers and the plan;
        (0, nan) for a fresh start (the log then starts empty). A learning rate or clip changed on resume
        (config.RESUME_TUNABLE_KEYS) is logged with the step it takes effect."""
        state = self.read_checkpoint()
        if self.first:
            self.tracker = tracker_for(self.cfg.tracker, self.cfg.out_dir, f"track{self.track}", state and state["step"])
        if state is None:
            return 0, float("nan")
        self.load_model(state["model"])
        for opt, key in zip(optimizers, ("muon", "adam")):
            opt.load_state_dict(state[key])
        self.plan.load_state_dict(state["plan"])
        step = state["step"]
        tuned = {k: [state["config"][k], getattr(self.cfg, k)] for k in config.RESUME_TUNABLE_KEYS
                 if state["config"][k] != getattr(self.cfg, k)}
        if tuned:
            self.log(f"track {self.track}: from step {step} on, " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in tuned.items()))
            self.log_row(dict(kind="resume", step=step, changed=tuned))
        return step, state["last_loss"]

    def read_checkpoint(self):
        """The checkpoint's state dict, or None for a fresh start (after one the log starts empty)."""
        retrain = f"delete {self.dir} and re-run with --resume=True to train this trajectory again from step 0"
        if not self.ckpt_path.exists():
            if self.started_path.exists():
                first = store.read_json(self.started_path, "trajectory record", retrain)
                raise UserError(f"track {self.track} has started ({self.started_path}: first checkpoint at step "
                                f"{first['first_checkpoint_step']}, on {first['host']}) but {self.ckpt_path} is missing: "
                                f"this node does not see the folder it was trained in (the run folder must be on a file "
                                f"system every node sees), or the checkpoint was deleted. Point --out_dir at that folder, "
                                f"or {retrain}")
            self.drop_log_rows_after(-1)  # killed before its first checkpoint: the track starts over
            return None
        state = store.safe_load(self.ckpt_path, "checkpoint", retrain)
        self.drop_log_rows_after(state["step"], state["log_rows"])
        self.log(f"track {self.track}: resumed from {self.ckpt_path} at step {state['step']}")
        return state

    def load_model(self, weights):
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as e:  # a shape mismatch: the data's vocab_size (its meta) changed under the run
            raise UserError(f"checkpoint {self.ckpt_path} does not fit the model this config and data build "
                            f"({str(e).strip().splitlines()[-1].strip()[:160]}): the vocab_size in {self.cfg.data_dir}'s "
                            f"meta or the model changed since it was written; use the original data or a new --out_dir") from None

    def drop_log_rows_after(self, step, expected_rows=0):
        """A resumed run redoes every step after its checkpoint: drop their log rows, so none appears twice. The
        rewrite is atomic: a kill during it leaves the old log whole. Fewer rows than the checkpoint counted (a log
        cut short, damaged or lost) cannot be rebuilt: say so, once, and go on (the run itself is whole)."""
        keep = []
        if self.first and self.log_path.exists():
            for row in self.log_path.read_bytes().splitlines():
                try:
                    keep += [row.decode() + "\n"] if json.loads(row)["step"] <= step else []
                except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-append, a bad byte (a
                    pass                                      # UnicodeDecodeError), a row that is not one
            store.atomic_write(self.log_path, lambda f: f.write("".join(keep).encode()))
        if self.first and len(keep) < expected_rows:
            print(f"warning: {self.log_path} holds {len(keep)} rows up to step {step}, the checkpoint counted "
                  f"{expected_rows}: {expected_rows - len(keep)} log rows were lost (the weights, optimizer state and "
                  f"members are intact)", file=sys.stderr, flush=True)
        self.log_rows = len(keep)


if __name__ == "__main__":
    sizes = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--size=")] or list(gpt.SIZES)
    for size in sizes:
        cfg = gpt.config_for(size, vocab_size=50257, seq_len=2048)
        with torch.device("meta"):
            m = gpt.GPT(cfg)
        print(f"{size:>7}: {m.num_params() / 1e6:9.1f}M params ({m.num_params(False) / 1e6:9.1f}M non-embedding), "
              f"{flops_per_token(m) / 1e9:6.2f} GFLOPs/token (vocab 50257 padded to 50304, seq 2048)")
        for mb in [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--memory=")]:
            for teacher in ("fp32", "bf16", None):
                est = memory_estimate(replace(cfg, dropout=0.1), mb, teacher)
                print(f"         micro-batch {mb}, teacher {teacher}: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in est.items()) + " GB")
