"""Shared fixtures for the training-side tests: one tiny prepared dataset per session and helpers that run
train.py in-process or as a (torchrun) subprocess with a tiny config. Hermetic: no network, CPU only."""
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import prepare_data  # noqa: E402
import q0  # noqa: E402
import runtime  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402
import variants  # noqa: E402

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# the tiniest config that still trains: ~0.14M params, 32-token rows, 1K-token steps, 1024-token evals
TINY = dict(model_size="tiny", seq_len=32, batch_tokens=1024, micro_batch_size=8, log_every=1, eval_tokens=1024,
            eval_every_epochs=1.0, ckpt_every_epochs=0.05)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model (a TrackRun) or spawns Python or torchrun: seconds, not "
                                       "milliseconds; still part of the default run, left out by -m 'not slow'")


# the module fixtures that train a run (test_eval, test_train, test_q0, test_faults): a test that needs one, directly or
# through another fixture, is slow without a marker of its own
TRAINED_RUN_FIXTURES = {"tiny_run", "single_run", "q0_run", "ref"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


class FastLaneError(AssertionError):
    pass


def refuse_in_fast_lane(what, nodeid):
    raise FastLaneError(f"{nodeid} {what} but is not marked @pytest.mark.slow: mark it, so that `pytest -m 'not slow'` "
                        f"stays under a minute")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test without the slow marker (its fixtures included) that trains or spawns Python or torchrun fails, naming
    itself: the fast lane cannot grow slow by accident. Other small programs (bash -n, git, sha256sum) are fine."""
    if item.get_closest_marker("slow"):
        return (yield)
    popen, track_init = subprocess.Popen, runtime.TrackRun.__init__

    class GuardedPopen(popen):
        def __init__(self, args, *a, **k):
            first = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
            if first.startswith("python") or first == "torchrun" or first == Path(PYTHON).name:
                refuse_in_fast_lane(f"spawns {first}", item.nodeid)
            super().__init__(args, *a, **k)

    def guarded_track_init(self, *a, **k):
        refuse_in_fast_lane("trains a model (runtime.TrackRun)", item.nodeid)
    subprocess.Popen, runtime.TrackRun.__init__ = GuardedPopen, guarded_track_init
    try:
        return (yield)
    finally:
        subprocess.Popen, runtime.TrackRun.__init__ = popen, track_init


# -----------------------------------------------------------------------------------------------------
# fault-injection results: each fault test fills one row; the table is printed at the end of the session
FAULT_ROWS = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)  # the `fault` fixture reads the call phase's outcome
    return report


@pytest.fixture
def fault(request):
    """fault(name, where) -> a row whose .trials and .result the test fills in; pass/FAIL comes from the test."""
    row = SimpleNamespace(fault=None, where="", trials=0, result="")

    def start(name, where):
        row.fault, row.where = name, where
        return row
    yield start
    if row.fault is not None:
        report = getattr(request.node, "report_call", None)
        status = "pass" if report is not None and report.passed else "FAIL"
        if status == "FAIL" and report is not None and report.longreprtext:
            lines = report.longreprtext.strip().splitlines()
            row.result = "FAILED: " + next((x[1:].strip() for x in lines if x.startswith("E ")), lines[-1])[:100]
        FAULT_ROWS.append((row.fault, row.where, row.trials, row.result, status))


def pytest_terminal_summary(terminalreporter):
    if not FAULT_ROWS:
        return
    cell = lambda x: str(x).replace("|", "/")
    terminalreporter.section("fault injection")
    terminalreporter.write_line("| fault | injected at | trials | result | status |")
    terminalreporter.write_line("|---|---|---:|---|---|")
    for row in FAULT_ROWS:
        terminalreporter.write_line("| " + " | ".join(cell(x) for x in row) + " |")


@pytest.fixture(scope="session", autouse=True)
def torch_one_thread():
    """Tiny matmuls on 2 shared cores: one thread is faster than two fighting, and results are reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """pydoc prose, byte tokens: 64K train tokens (~30 documents), 4K val, 2K fitness."""
    out = tmp_path_factory.mktemp("data") / "pydoc-byte"
    with redirect_stdout(io.StringIO()):
        prepare_data.main(["--out_dir", str(out), "--val_tokens", "4096", "--fitness_tokens", "2048",
                           "--train_tokens", "65536"])
    return out


def train_argv(data_dir, out_dir, **overrides):
    """--key=value flags for a tiny run (TINY, then overrides)."""
    args = dict(TINY, data_dir=str(data_dir), out_dir=str(out_dir))
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


SCRIPTS = {"train.py": train, "q0.py": q0, "variants.py": variants, "student.py": student}
CONFIGS = {train: train.Config, q0: q0.Q0Config, variants: variants.VariantConfig, student: student.StudentConfig}


def script_for(argv):
    """The entry point these arguments are for: by mode (a --mode flag, else the config file's; config.MODE_SCRIPTS),
    variants.py for its own keys."""
    modes = [a.split("=", 1)[1] for a in argv if a.startswith("--mode=")]
    if any(a.startswith("--distill_teacher") for a in argv):
        return "variants.py"
    if not modes and argv and not argv[0].startswith("--") and (ROOT / argv[0]).is_file():  # a config file's mode
        try:
            modes = [v for k, v, _ in config.read_file(ROOT / argv[0]) if k == "mode"]
        except config.UserError:
            pass  # a broken file: the script says so
    return config.MODE_SCRIPTS.get(modes[-1], "train.py") if modes else "train.py"


def load_config(argv):
    """The config the script of these arguments (script_for; a config file's mode otherwise) would read."""
    module = SCRIPTS[script_for(argv)]
    try:
        return config.load(CONFIGS[module], argv, "")
    except config.UserError as e:  # a config file of another script's mode
        if "is run by" not in str(e):
            raise
        return config.load(CONFIGS[SCRIPTS[str(e).split("is run by ")[1].split(":")[0]]], argv, "")


def validate(cfg, world, train_tokens):
    """config.check_run with the data's steps per epoch: the checks a launch runs before anything is written."""
    config.check_run(cfg, world, train.EpochLoader.num_windows(train_tokens, cfg.seq_len) // (cfg.batch_tokens // cfg.seq_len))


def run_train(argv):
    """The script's main (script_for) in-process -> (exit code, stdout, stderr); 0 when it returned normally."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            SCRIPTS[script_for(argv)].main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def error_line(err, *needles):
    """The one line a refused command prints (`error: ...` on stderr, nothing else), holding every needle -> it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, err)
    return lines[0]


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def spawn_train(argv, nproc=1):
    """The script of these arguments (script_for) as a subprocess (python, or torchrun --standalone with nproc ranks
    on gloo)."""
    script = script_for(argv)
    cmd = [PYTHON, script] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.Popen(cmd + list(argv), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_train_subprocess(argv, nproc=1, timeout=240):
    proc = spawn_train(argv, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args[1]} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def kill_when(proc, ready, timeout=120, poll_s=0.01):
    """SIGKILL proc as soon as ready() is true; fail if it finished (or died) first."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read()
            pytest.fail(f"train.py exited ({proc.returncode}) before it could be killed:\n{out[-4000:]}")
        assert time.time() - t0 < timeout, "timed out waiting for the run to reach the kill point"
        time.sleep(poll_s)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -9, f"expected a SIGKILL exit, got {proc.returncode}"


def read_log(run_dir, track=0, kind="train"):
    """{step: row} from track's log.jsonl; a step logged twice (before a kill and after the resume) keeps the last."""
    rows = [json.loads(line) for line in (Path(run_dir) / f"track{track}" / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def last_logged_step(run_dir, track=0):
    path = Path(run_dir) / f"track{track}" / "log.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


def member_weights(run_dir, name):
    return torch.load(Path(run_dir) / "members" / f"{name}.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0 and rtol == 0:
            assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3g})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
