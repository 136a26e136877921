"""Watching a run (issue 37): the tracker (TensorBoard's event files read back), the log row's fields (grad norm, cycle,
teacher, the distillation loss's CE and KL), the training curves (train.png) and the status of a run killed half-way,
read from its folder without writing to it."""
import hashlib
import json
import subprocess

import pytest

import eval as ev
from conftest import PYTHON, ROOT, child_env, read_log, run_train, train_argv

Q0 = dict(mode="q0", batch_tokens=1024, micro_batch_size=32, num_trajectories=1, num_cycles=4, epochs_per_cycle=0.125,
          distill_after_cycles=2, distill_alpha=0.45, distill_temperature=1.2, log_every=3, eval_every_epochs=0.25,
          ckpt_every_epochs=0.125)


@pytest.fixture(scope="module")
def distilled(tiny_data, tmp_path_factory):
    """A tiny q0 run (4 cycles of 8 steps, distillation from cycle 3), mirrored to TensorBoard, then eval.py on it."""
    pytest.importorskip("tensorboard")  # requirements-tracker.txt (CI installs it)
    run_dir = tmp_path_factory.mktemp("watch") / "q0"
    code, out, err = run_train(train_argv(tiny_data, run_dir, tracker="tensorboard", **Q0))
    assert code == 0, err
    ev.main([str(run_dir)])
    return run_dir, out


@pytest.mark.slow
def test_the_log_row_has_the_grad_norm_the_cycle_the_teacher_and_the_losss_parts(distilled):
    run_dir, out = distilled
    rows = read_log(run_dir)
    assert all(r["grad_norm"] > 0 and 1 <= r["step_in_cycle"] <= r["cycle_steps"] == 8 for r in rows.values())
    assert sorted(rows) == [3, 6, 9, 12, 15, 17, 18, 21, 24, 25, 27, 30, 32]  # every 3, each new cycle's first, the last
    assert [rows[s]["cycle"] for s in (3, 9, 17, 24, 25)] == [1, 2, 3, 3, 4] and rows[17]["step_in_cycle"] == 1
    assert rows[15]["teacher"] is None and "ce" not in rows[15] and rows[17]["teacher"] == "t0-c002"
    for r in rows.values():  # one micro-batch a step on one rank: the logged loss is exactly its two parts, weighted
        if "kl" in r:
            assert r["loss"] == pytest.approx(0.55 * r["ce"] + 0.45 * 1.2 ** 2 * r["kl"], rel=1e-5) and r["kl"] >= 0
    assert any("kl" in r for r in rows.values())
    line = next(x for x in out.splitlines() if "step     24/32" in x)  # the console line: one line, the same fields
    assert "| cycle 3 (8/8) |" in line and "(ce " in line and " kl " in line and "| gn " in line


@pytest.mark.slow
def test_tensorboard_holds_every_row_the_config_and_the_report(distilled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _ = distilled
    track = EventAccumulator(str(run_dir / "tensorboard" / "track0"))
    track.Reload()
    rows = read_log(run_dir)
    assert [(e.step, e.value) for e in track.Scalars("train/loss")] == [(s, pytest.approx(r["loss"])) for s, r in rows.items()]
    assert [e.step for e in track.Scalars("train/kl")] == [s for s, r in rows.items() if "kl" in r]
    assert [e.step for e in track.Scalars("eval/val")] == sorted(read_log(run_dir, kind="eval"))
    config = track.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config)["config"]["num_cycles"] == 4 and json.loads(config)["provenance"]
    report = EventAccumulator(str(run_dir / "tensorboard" / "eval"))
    report.Reload()
    k_table = json.loads((run_dir / "eval.json").read_text())["ensemble"]["prior"]
    assert {e.step: e.value for e in report.Scalars("k_table/prior")} == {int(k): pytest.approx(v) for k, v in k_table.items()}
    assert len(report.Scalars("budget_curve/prior_val")) == 4


@pytest.mark.slow
def test_train_png_and_a_tracker_that_is_not_installed(distilled, tiny_data, tmp_path):
    run_dir, _ = distilled
    assert (run_dir / "train.png").stat().st_size > 10_000
    code, _, err = run_train(train_argv(tiny_data, tmp_path / "r", **dict(Q0, tracker="wandb")))
    if code == 0:
        pytest.skip("wandb is installed here")
    assert code == 2 and "the wandb package is not installed: pip install -r requirements-tracker.txt" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_status_of_a_run_killed_half_way_writes_nothing(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    argv = train_argv(tiny_data, run_dir, **dict(Q0, num_cycles=4, distill_after_cycles=8))
    proc = subprocess.run([PYTHON, "tests/fault_runner.py", "call:torch.optim.Muon.step:19", "q0", *argv], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9
    digest = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    before = digest()
    status = subprocess.run([PYTHON, "eval.py", str(run_dir), "--status"], cwd=ROOT, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert lines[0] == f"status of {run_dir} (q0, 1 track(s); read only, nothing written)"
    assert lines[1].startswith("track 0 | step 18/32 (56.2%) | cycle 3/4 | members 2/4 | val ") and lines[1].endswith("| stopped")
    assert lines[2].startswith("run | members 2/4 | eta ")
    assert digest() == before  # nothing written, nothing removed
