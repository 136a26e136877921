"""scripts/: the cluster launchers, checked for syntax (bash -n) and run with stand-ins for srun, scontrol and
torchrun that print what they were given; and the one runtime rule they rely on (a repeated SIGTERM is one request).
No training, milliseconds."""
import os
import signal
import subprocess
import sys
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


def fake_bin(tmp_path):
    """srun, scontrol and torchrun that print their arguments (and the env var the launch needs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = dict(scontrol='[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"',
                 srun='echo "srun $*"',
                 torchrun='echo "torchrun $* | store=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}"')
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_slurm_launch_line(tmp_path):
    env = dict(fake_bin(tmp_path), SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="42",
               SLURM_GPUS_PER_NODE="h100:8", SLURM_SUBMIT_DIR=str(ROOT))
    text = SCRIPTS[0].read_text()
    assert "#SBATCH --signal=TERM@90" in text and "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1" in text
    out = subprocess.run(["bash", str(SCRIPTS[0]), "q0.py", "configs/fineweb_1p8b_q0.py"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert out.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes=2 --nproc_per_node=8 ")
    for piece in ("--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:29500", "--rdzv_id=42", "--max-restarts=3",
                  "--shutdown-timeout=80", "q0.py configs/fineweb_1p8b_q0.py --resume=True"):
        assert piece in out, (piece, out)
    ev = subprocess.run(["bash", str(SCRIPTS[0]), "eval.py", "runs/x", "--score"], env=env, capture_output=True,
                        text=True, check=True).stdout.splitlines()[-1]
    assert ev.endswith("eval.py runs/x --score")  # eval.py has no --resume


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
