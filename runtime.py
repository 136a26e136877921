"""
runtime.py: what keeps a run safe, behind the few calls the training loop makes, so the loop never sees fsync,
flock, sha256 or signals. train.py's loop, for one track:

    run = TrackRun(cfg, track, env, data_meta)   # RUN/track<i>/
    with run:                                    # the track's lock; leaving, a checkpoint write in flight finishes whole
        state = run.resume()                     # the checkpoint's state (None: a fresh start)
        run.check_step(step, loss, grad_norm)    # a NaN/inf stops before the optimizer step
        run.log(line); run.log_row(row)          # console (the group's first rank) and track<i>/log.jsonl
        run.save_member(row, model)              # members/<name>.pt + its manifest row -> the weights saved
        run.checkpoint(step, model, state)       # track<i>/ckpt.pt, written on a background thread
        run.stop_if_asked(step, model, state_fn, asked)  # SIGINT/SIGTERM: checkpoint this step, stop

and one `session()` around a whole launch: a UserError prints one line (exit 2 for a bad config, 1 otherwise);
SIGINT or SIGTERM (what SLURM and Kubernetes send before SIGKILL) prints the checkpoints and the command that
continues the run, and exits 130 or 143. Inside a track's loop a signal is acted on at the end of the step it
arrives in (all ranks of the track at the same step): the checkpoint being written finishes, a checkpoint of that
step is written (at 1.8B ~15 GB: a device-to-host copy, the sha256 at ~1.8 GB/s and the write, about half a minute
on a fast file system; not measured on a GPU node), then the run stops; elsewhere, or at a second signal, it stops
at once (a second SIGTERM excepted: under SLURM each worker gets one from SLURM and one from torchrun). Nothing is
written from a state that failed the finiteness check.

Files of a track: ckpt.pt (model, optimizers, step, plan state, config, log row count; sha256 inside),
started.json (written with the first checkpoint: from then on a start without ckpt.pt is refused instead of
training the track again from step 0), log.jsonl (one JSON row per log line and eval), manifest.json (the
members, in order), lock (flock: one trainer per track).
"""
import json
import math
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from common import (UserError, atomic_write, check_disk, lock, member_state, nbytes, not_a_folder, read_json, safe_load,
                    save_member, save_torch, to_host, write_json)


# -----------------------------------------------------------------------------------------------------
# signals: SIGINT (Ctrl-C) and SIGTERM stop a run cleanly
class Stop(BaseException):
    """A stop asked for by a signal: not an error, so not an Exception."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_signals = dict(pending=None, deferring=False)


def _on_signal(signum, frame):
    if _signals["deferring"] and _signals["pending"] is None:
        _signals["pending"] = signum  # acted on at the end of the step (TrackRun.stop_if_asked)
        return
    if _signals["deferring"] and _signals["pending"] == signum == signal.SIGTERM:
        return  # the same request again: SLURM signals every process of a step, and torchrun forwards it too
    raise Stop(signum)


@contextmanager
def session(argv):
    """Around a launch: one clear line for a UserError; a signal ends with the checkpoints and the resume command.
    -> a dict the launch fills with its config (`s["cfg"] = cfg`), so the message can name its run folder."""
    s = dict(cfg=None)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be installed
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield s
        if _signals["pending"] is not None:  # a signal that came after the last step's check
            raise Stop(_signals["pending"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.status)
    except (Stop, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if s["cfg"] is None:
            sys.exit(128 + signum)
        out_dir = s["cfg"].out_dir
        ckpts = sorted(str(p) for p in Path(out_dir).glob("track*/ckpt.pt"))
        again = " ".join(a for a in [Path(sys.argv[0]).name, *argv] if a != "--resume=True")
        print(f"\ninterrupted ({signal.Signals(signum).name}). Checkpoints: {', '.join(ckpts) or 'none yet'}; finished "
              f"members are in {out_dir}/members. Continue exactly where it stopped with:\n  python {again} --resume=True",
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        _signals.update(pending=None, deferring=False)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------
class TrackRun:
    """One track's files: its lock, checkpoints, log and members (see the module docstring)."""

    def __init__(self, cfg, track, env, data_meta):
        self.cfg, self.track, self.env, self.meta = cfg, track, env, data_meta
        self.first = env["group_rank"] == 0  # the group's first rank writes; every rank computes
        self.dir = Path(cfg.out_dir) / f"track{track}"
        if blocker := not_a_folder(self.dir):  # (prepare_run_dir checked out_dir; this is a file inside the run)
            raise UserError(f"{blocker} is a file where track {track}'s folder goes: move it away, or use a new "
                            f"--out_dir", status=2)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path, self.started_path, self.log_path = self.dir / "ckpt.pt", self.dir / "started.json", self.dir / "log.jsonl"
        self.writer, self.write_error = None, None  # the background checkpoint write, and its failure if any
        self.log_rows = 0  # rows in log.jsonl: the checkpoint records it, so a log cut short is noticed on resume
        self.held = None
        self.last_ckpt_step = None

    def __enter__(self):
        self.held = lock(self.dir) if self.first else None  # before this track's first write
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
        if kind is None and _signals["pending"] is not None:  # it came after the last step's check: stop before "done"
            raise Stop(_signals["pending"])

    def log(self, line):
        self.env["log"](line)

    def log_row(self, row):
        if not self.first:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.log_rows += 1
        except OSError as e:  # a full disk: a torn last line is dropped on resume
            raise UserError(f"could not append to {self.log_path} ({e.strerror or e}). Earlier files are intact; fix it "
                            f"(free space?) and re-run with --resume=True") from None

    # ---- the step's checks ------------------------------------------------------------------------------
    def check_step(self, step, loss, grad_norm):
        """Before the optimizer step: an overflow in the backward pass can leave the loss finite, so both."""
        if not math.isfinite(loss):
            self.fail(f"loss is {loss} at step {step + 1} (the step was not taken)")
        if not torch.isfinite(grad_norm):
            self.fail(f"the gradient is not finite at step {step + 1} (grad norm {grad_norm.item():.4g}, loss "
                      f"{loss:.4f}; the step was not taken)")

    def check_finite(self, model, step, what):
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self.fail(f"weight {bad[0]} is not finite after step {step}, before writing {what}")

    def fail(self, problem):
        """Stop with the truth about what is on disk: nothing is written from the bad state."""
        self.finish_checkpoint()
        last = (f"{self.ckpt_path} (step {safe_load(self.ckpt_path, 'checkpoint')['step']})"
                if self.ckpt_path.exists() else "none yet (the track would start over)")
        raise UserError(f"track {self.track}: {problem}; nothing was saved from this state. Last good "
                        f"checkpoint: {last}. Re-run with --resume=True and lower learning rates or a tighter clip "
                        f"(--muon_lr, --embed_lr, --head_lr, --grad_clip may change on resume; the step is logged)")

    def stop_if_asked(self, step, model, state, asked):
        """asked: whether any rank of the group had a signal pending at this step's all-reduce (the loop reduces it
        with the loss, so every rank stops after the same step). Checkpoint this step (state() -> its dict), then stop."""
        if not asked:
            return
        if self.last_ckpt_step != step:
            self.checkpoint(step, model, state())
        self.finish_checkpoint()
        raise Stop(_signals["pending"] or signal.SIGTERM)

    @staticmethod
    def signal_pending():
        return _signals["pending"] is not None

    # ---- members and checkpoints --------------------------------------------------------------------------
    def save_member(self, row, model, step):
        """members/<name>.pt (the weights, the config to rebuild it, the row) and then its manifest row."""
        self.check_finite(model, step, f"member {row['name']}")
        state = member_state(model)
        if self.first:
            save_member(self.cfg.out_dir, row, model, self.meta, state)
        self.env["barrier"]()
        return state

    def checkpoint(self, step, model, state):
        """Snapshot the state (model, optimizers, plan, ...: a dict) into host memory, then write it on a background
        thread while training goes on (at 1.8B a checkpoint is ~15 GB: written in line, the whole group would wait
        for the disk). One write at a time: the previous one is finished (and renamed into place) before the next
        snapshot; a failed write stops the run at the next checkpoint or at the end. async_checkpoints=False writes
        in line."""
        self.check_finite(model, step, "the checkpoint")
        self.finish_checkpoint()
        self.last_ckpt_step = step
        state = dict(state, config=asdict(self.cfg), log_rows=self.log_rows)
        if not self.first:
            return
        if not self.cfg.async_checkpoints:
            return self.write_checkpoint(state)
        check_disk(self.ckpt_path, nbytes(state))  # a full disk stops the run here, not a checkpoint later
        state = to_host(state)  # a copy: the live tensors change under the writer

        def write():
            try:
                self.write_checkpoint(state)
            except BaseException as e:  # raised again in the training thread by finish_checkpoint
                self.write_error = e
        self.writer = threading.Thread(target=write, name=f"ckpt-track{self.track}")
        self.writer.start()

    def write_checkpoint(self, state):
        save_torch(state, self.ckpt_path)
        if not self.started_path.exists():
            write_json(dict(first_checkpoint_step=state["step"], host=socket.gethostname()), self.started_path)

    def finish_checkpoint(self):
        """Wait for the checkpoint being written, if any; raise its error, if it failed."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error

    def resume(self):
        """The checkpoint's state dict, or None for a fresh start (after one the log starts empty)."""
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
            return None
        state = safe_load(self.ckpt_path, "checkpoint", retrain)
        self.drop_log_rows_after(state["step"], state.get("log_rows", 0))
        self.log(f"track {self.track}: resumed from {self.ckpt_path} at step {state['step']}")
        return state

    def load_model(self, model, weights):
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # a shape mismatch: the data's vocab_size (its meta) changed under the run
            raise UserError(f"checkpoint {self.ckpt_path} does not fit the model this config and data build "
                            f"({str(e).strip().splitlines()[-1].strip()[:160]}): the vocab_size in {self.cfg.data_dir}'s "
                            f"meta or the model changed since it was written; use the original data or a new --out_dir") from None

    def drop_log_rows_after(self, step, expected_rows=0):
        """A resumed run redoes every step after its checkpoint: drop their log rows, so none appears twice. The
        rewrite is atomic: a kill during it leaves the old log whole. Fewer rows than the checkpoint counted (a log
        cut short or lost) cannot be rebuilt: say so, once, and go on (the run itself is whole)."""
        keep = []
        if self.first and self.log_path.exists():
            for row in self.log_path.read_text().splitlines():
                try:
                    keep += [row + "\n"] if json.loads(row)["step"] <= step else []
                except ValueError:
                    pass  # a line torn by a crash mid-append
            atomic_write(self.log_path, lambda f: f.write("".join(keep).encode()))
        if self.first and len(keep) < expected_rows:
            print(f"warning: {self.log_path} holds {len(keep)} rows up to step {step}, the checkpoint counted "
                  f"{expected_rows}: {expected_rows - len(keep)} log rows were lost (the weights, optimizer state and "
                  f"members are intact)", file=sys.stderr, flush=True)
        self.log_rows = len(keep)
