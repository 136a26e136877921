"""scripts/: the cluster launchers, checked for syntax (bash -n) and run with stand-ins for srun, scontrol and
torchrun that print what they were given; and the one runtime rule they rely on (a repeated SIGTERM is one request).
No training, milliseconds."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import runtime  # noqa: E402

SCRIPTS = [ROOT / "scripts" / "slurm.sbatch", ROOT / "scripts" / "multinode.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def fake_bin(tmp_path, torchrun="ok"):
    """srun, scontrol, scancel and torchrun that print their arguments (and the env var the launch needs). srun runs
    its command (the task wrapper) after its own options; torchrun then exits 0 ("ok"), fails ("fail"), or waits for a
    SIGTERM, checkpoints and exits 1 as torchrun does ("wait"); scancel sends SIGTERM to every process of the step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    pids = tmp_path / "step.pids"
    stubs = dict(scontrol='[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n" || echo "scontrol $*"',
                 srun=f'echo "srun $*"; echo $$ >> {pids}; while [ "${{1#--}}" != "$1" ]; do shift; done; exec "$@"',
                 scancel=f'echo "scancel $*"; kill -TERM $(cat {pids})',
                 torchrun=f'echo "torchrun $* | store=${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}}"; echo $$ >> {pids}\n'
                          + dict(ok="exit 0", fail="exit 1", wait='trap \'echo "torchrun: SIGTERM, checkpoint written"; '
                                 'exit 1\' TERM; touch ' + str(tmp_path / "running") + '; while true; do sleep 0.05; done')
                          [torchrun])
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def slurm_env(tmp_path, torchrun="ok", **extra):
    return dict(fake_bin(tmp_path, torchrun), **dict(dict(
        SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="42", SLURM_GPUS_PER_NODE="h100:8",
        SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(ROOT)), **extra))


def sbatch(env, *args):
    return subprocess.run(["bash", str(SCRIPTS[0]), *args], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_launch_line(tmp_path):
    text = SCRIPTS[0].read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --cpus-per-task=32"):
        assert line in text
    assert "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1" in text
    proc = sbatch(slurm_env(tmp_path), "q0.py", "configs/fineweb_1p8b_q0.py")
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = proc.stdout.splitlines()[-2:]
    # srun passes --cpus-per-task on (Slurm >= 22.05 does not inherit sbatch's); the task is torchrun in its wrapper
    assert srun.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32 bash -c ")
    assert torchrun.startswith("torchrun --nnodes=2 --nproc_per_node=8 ") and torchrun.endswith(" | store=1")
    for piece in ("--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:20042", "--rdzv_id=42", "--max-restarts=3",
                  "--shutdown-timeout=80", "q0.py configs/fineweb_1p8b_q0.py --resume=True"):
        assert piece in torchrun, (piece, torchrun)
    ev = sbatch(slurm_env(tmp_path / "b"), "eval.py", "runs/x", "--score").stdout.splitlines()[-1]
    assert ev.endswith("eval.py runs/x --score | store=1")  # eval.py has no --resume
    # the port: 20000 + job id % 10000 (two jobs on one host do not collide), or MASTER_PORT
    env = slurm_env(tmp_path / "c", SLURM_JOB_ID="1234567", MASTER_PORT="31000")
    assert "--rdzv_endpoint=gpu-a17:31000" in sbatch(env, "eval.py", "r").stdout
    env.pop("MASTER_PORT")
    assert "--rdzv_endpoint=gpu-a17:24567" in sbatch(env, "eval.py", "r").stdout
    env.pop("SLURM_CPUS_PER_TASK")
    assert "--cpus-per-task" not in sbatch(env, "eval.py", "r").stdout  # none asked for: none passed


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path):
    """SIGUSR1 (--signal=B:USR1@120) -> SIGTERM to the step (scancel, not to srun) -> the run checkpoints and torchrun
    exits 1 -> its wrapper exits 0 (so --kill-on-bad-exit kills no node still writing) -> scontrol requeue."""
    proc = subprocess.Popen(["bash", str(SCRIPTS[0]), "q0.py", "configs/fineweb_1p8b_q0.py"],
                            env=slurm_env(tmp_path, "wait"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "running").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    lines = out.splitlines()
    assert proc.returncode == 0, (out, err)
    stop = lines.index("q0 job 42: time limit in 120 s: SIGTERM to the run (it checkpoints), then requeue")
    assert lines.index("scancel --signal=TERM 42") > stop and "torchrun: SIGTERM, checkpoint written" in lines[stop:]
    assert lines[-2:] == ["q0 job 42: the run stopped (srun exit 0); requeueing: the next start continues it",
                          "scontrol requeue 42"]
    # the requeued job continues the run (SLURM_RESTART_COUNT), even with MAX_RESTARTS=0
    again = sbatch(slurm_env(tmp_path / "b", SLURM_RESTART_COUNT="1", MAX_RESTARTS="0"), "q0.py", "c.py")
    assert again.returncode == 0 and again.stdout.splitlines()[-1].endswith("c.py --resume=True | store=1")


def test_slurm_a_failure_is_not_requeued(tmp_path):
    proc = sbatch(slurm_env(tmp_path, "fail"), "q0.py", "configs/fineweb_1p8b_q0.py")
    assert proc.returncode == 1 and "scontrol requeue" not in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_max_restarts_0_asks_whether_to_resume(tmp_path, script):
    """torchrun's first attempt is exempt from 'nothing to resume' only with restarts: with MAX_RESTARTS=0 the scripts
    refuse to guess (exit 2, before any launch) and pass the user's own --resume as it is."""
    env = dict(slurm_env(tmp_path), NNODES="2", MASTER_HOST="gpu-a17", MAX_RESTARTS="0")
    run = lambda *args: subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    refused = run("q0.py", "c.py")
    assert refused.returncode == 2 and refused.stdout.count("torchrun") == 0
    assert refused.stderr.startswith("MAX_RESTARTS=0: add --resume=False to start the run or --resume=True")
    for flag in ("--resume=False", "--resume=True"):
        ok = run("q0.py", "c.py", flag)
        assert ok.returncode == 0 and ok.stdout.splitlines()[-1].endswith(f"--max-restarts=0 --shutdown-timeout=80 "
                                                                          f"q0.py c.py {flag} | store=1")
    assert run("eval.py", "runs/x").returncode == 0  # eval.py has no --resume


def test_multinode_launch_line(tmp_path):
    env = dict(fake_bin(tmp_path), NNODES="5", MASTER_HOST="node0")
    out = subprocess.run(["bash", str(SCRIPTS[1]), "train.py", "configs/fineweb_1p8b_single.py"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("torchrun --nnodes=5 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29500 "
                   "--rdzv_id=q0 --max-restarts=3 --shutdown-timeout=80 train.py configs/fineweb_1p8b_single.py "
                   "--resume=True | store=1")
    missing = subprocess.run(["bash", str(SCRIPTS[1]), "q0.py"], env=dict(env, NNODES=""), capture_output=True, text=True)
    assert missing.returncode != 0 and "set NNODES" in missing.stderr


def test_a_repeated_sigterm_is_one_request_and_ctrl_c_still_stops_at_once():
    """In the loop (deferring), SLURM's SIGTERM and torchrun's copy of it are one request; a SIGINT after it stops."""
    runtime._signals.update(deferring=True, pending=None)
    try:
        runtime._on_signal(signal.SIGTERM, None)
        runtime._on_signal(signal.SIGTERM, None)
        assert runtime._signals["pending"] == signal.SIGTERM
        with pytest.raises(runtime.Stop):
            runtime._on_signal(signal.SIGINT, None)
        runtime._signals.update(pending=signal.SIGINT)
        with pytest.raises(runtime.Stop):
            runtime._on_signal(signal.SIGINT, None)
    finally:
        runtime._signals.update(deferring=False, pending=None)
