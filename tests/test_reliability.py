"""Reliability, fourth pass (issue 38): where a file was trusted without the check its twin path makes, and where a
printed fix failed when followed. Each case is injected from outside on a tiny run (the quick start's config at the
issue's sizes: 4 cycles of 8 steps, a checkpoint every 4) and asserts the number that must come out, or the one line
whose fix, followed here, succeeds. Each adds a row to the fault table printed at the end of the session."""
import json
import os
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import torch

import eval as ev
import scores
import store
from conftest import PYTHON, ROOT, child_env, error_line, run_train

T = ["--batch_tokens=512", "--micro_batch_size=4", "--eval_tokens=2048", "--eval_every_epochs=0", "--epochs_per_cycle=0.25",
     "--ckpt_every_epochs=0.125", "--num_cycles=4", "--log_every=1"]
STUDENT = ["configs/quickstart_student.py", "--batch_tokens=512", "--micro_batch_size=4", "--eval_tokens=2048",
           "--eval_every_epochs=0", "--epochs=0.5", "--ckpt_every_epochs=0.125"]


def q0_argv(data, out, *extra):
    return ["configs/quickstart.py", *T, f"--data_dir={data}", f"--out_dir={out}", *extra]


def student_argv(data, teacher, out, *extra):
    return [*STUDENT, f"--data_dir={data}", f"--teacher_run={teacher}", f"--out_dir={out}", *extra]


def student_refused_then_fixed(data, teacher, out, k, *line):
    """A student against `teacher` at teacher_k=k is refused (exit 1, no run folder, one line with these parts); the fix
    the line names (eval.py on the teacher run) is followed, and the same command then trains."""
    code, _, err = run_train(student_argv(data, teacher, out, f"--teacher_k={k}"))
    assert code == 1 and not out.exists()
    error_line(err, *line)
    ev.main([str(teacher), "--eval_tokens=2048"])  # rescores, refits on the files as they are now
    code, _, err = run_train(student_argv(data, teacher, out, f"--teacher_k={k}"))
    assert code == 0, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The quick start's data: python prepare_data.py, its default pydoc split."""
    out = tmp_path_factory.mktemp("data") / "pydoc-byte"
    subprocess.run([PYTHON, "prepare_data.py", f"--out_dir={out}"], cwd=ROOT, env=child_env(), check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """runs/a (the quick start at the issue's sizes, scored, its prior fit) and runs/b (distillation and noise on)."""
    d = tmp_path_factory.mktemp("runs")
    for name, extra in (("a", []), ("b", ["--distill_after_cycles=1", "--perturb_scale_start=0.25",
                                          "--perturb_scale_end=0.05"])):
        code, _, err = run_train(q0_argv(data, d / name, *extra))
        assert code == 0, err
    ev.main([str(d / "a"), "--eval_tokens=2048"])
    return d


@pytest.mark.slow
def test_the_student_refuses_a_teacher_member_changed_after_the_prior(runs, data, tmp_path, fault):
    row = fault("a teacher member replaced after prior.json was fit", "student.py --teacher_k=2 (item 1)")
    e1 = tmp_path / "e1"
    shutil.copytree(runs / "a", e1)
    first = json.loads((e1 / "prior.json").read_text())["per_k"]["2"]["members"][0]
    shutil.copy(runs / "b" / "members" / f"{first}.pt", e1 / "members" / f"{first}.pt")  # the cp
    student_refused_then_fixed(data, e1, tmp_path / "s1", 2,
                               f"member {first}", f"changed since {e1 / 'prior.json'} was fit", f"python eval.py {e1}")
    row.trials, row.result = 2, "refused before its run folder, naming the member and eval.py; after it, trains"


@pytest.mark.slow
def test_a_changed_fitness_score_file_is_not_read_for_a_k_prior_json_lacks(runs, data, tmp_path, fault):
    row = fault("a score file changed on disk (+0.8)", "student.py --teacher_k=3: the K prior.json lacks (item 2)")
    e2 = tmp_path / "e2"
    shutil.copytree(runs / "a", e2)
    assert "3" not in json.loads((e2 / "prior.json").read_text())["per_k"]
    path = scores.score_path(e2, "t0-c003", "fitness")
    np.save(path, np.load(path) + 0.8)  # the change: the sha256 beside it is the old one
    student_refused_then_fixed(data, e2, tmp_path / "s2", 3,
                               "teacher_k=3: ", f"score file {path} does not match its sha256", f"python eval.py {e2}")
    truth = ev.members_at(json.loads((runs / "a" / "prior.json").read_text()), 3, runs / "a")
    assert store.read_manifest(tmp_path / "s2")[0]["teacher"].startswith(
        "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in truth))  # the true scores' mixture, not the changed one
    row.trials, row.result = 2, "one line naming the file and eval.py; after it, the true scores' mixture teaches"


@pytest.mark.slow
def test_score_files_copied_under_another_members_name_are_rescored(runs, tmp_path, fault, capsys):
    row = fault("score files copied under another member's name", "eval.py on a scored run (item 3)")
    e3 = tmp_path / "e3"
    shutil.copytree(runs / "a", e3)
    for split in ("fitness", "val"):
        for ext in ("npy", "npy.sha256"):
            shutil.copy(e3 / "scores" / f"t0-c001.{split}.{ext}", e3 / "scores" / f"t0-c003.{split}.{ext}")
    capsys.readouterr()
    rep = ev.main([str(e3), "--eval_tokens=2048"])[0]
    err = capsys.readouterr().err
    truth = json.loads((runs / "a" / "eval.json").read_text())
    val = {m["name"]: m["val"] for m in rep["members"]}
    assert val == {m["name"]: m["val"] for m in truth["members"]}  # t0-c003's own, not t0-c001's
    assert rep["summary"] == truth["summary"] and rep["scored_now"] == ["t0-c003"]
    assert "is not the one recorded for member t0-c003" in err
    row.trials, row.result = 1, "named and rescored; every val and the summary equal the untouched run's"


@pytest.mark.slow
def test_a_diverged_model_is_never_checkpointed_so_the_printed_fix_works(data, tmp_path, fault):
    row = fault("real divergence (--muon_lr=1e6)", "weights finite but ~1e21 at step 4, NaN at step 5 (item 4)")
    run_dir = tmp_path / "div"
    code, _, err = run_train(q0_argv(data, run_dir, "--muon_lr=1e6"))
    assert code == 1
    line = error_line(err, "track 0: weight ", "(diverged: beyond 10000) after step 4, before writing the checkpoint",
                    "Last good checkpoint: none yet", "lower learning rates")
    assert not (run_dir / "track0" / "ckpt.pt").exists()  # nothing diverged on disk to resume from
    code, _, err = run_train(q0_argv(data, run_dir, "--resume=True", "--muon_lr=0.02"))  # the fix it prints
    assert code == 0, err
    ref = tmp_path / "ref"
    assert run_train(q0_argv(data, ref))[0] == 0
    for name in ("t0-c001", "t0-c004"):  # restarted from step 0 at the sane LR: the run that never diverged
        a = torch.load(run_dir / "members" / f"{name}.pt", weights_only=True)["model"]
        b = torch.load(ref / "members" / f"{name}.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    row.trials, row.result = 2, f"stopped before writing: {line[7:60]}...; the printed fix finishes, bit-identical"


@pytest.mark.slow
def test_a_bad_byte_in_the_log_is_dropped_on_resume_with_a_warning(data, runs, tmp_path, fault):
    row = fault("one bad byte in track0/log.jsonl", "resume after a kill at step 14 (item 5)")
    run_dir = tmp_path / "run"
    proc = subprocess.run([PYTHON, "tests/fault_runner.py", "call:torch.optim.Muon.step:14", "q0", *q0_argv(data, run_dir)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    log = run_dir / "track0" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"loss"', b'"lo\xffss"')  # a row with a byte that is not UTF-8
    log.write_bytes(b"".join(lines))
    code, _, err = run_train(q0_argv(data, run_dir, "--resume=True"))
    assert code == 0 and "Traceback" not in err, err
    assert f"warning: {log} holds" in err and "1 log rows were lost" in err
    for name in ("t0-c002", "t0-c004"):
        a = torch.load(run_dir / "members" / f"{name}.pt", weights_only=True)["model"]
        b = torch.load(runs / "a" / "members" / f"{name}.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    log.read_text()  # the log is UTF-8 again
    row.trials, row.result = 1, "the row dropped with one warning; the resumed run's members bit-identical"


@pytest.mark.slow
def test_a_truncated_config_json_is_rebuilt_from_a_checkpoint(runs, tmp_path, fault, capsys):
    row = fault("config.json cut in half", "eval.py on a finished, scored run (item 6)")
    e6 = tmp_path / "e6"
    shutil.copytree(runs / "a", e6)
    text = (e6 / "config.json").read_bytes()
    (e6 / "config.json").write_bytes(text[: len(text) // 2])
    capsys.readouterr()
    rep = ev.main([str(e6), "--eval_tokens=2048"])[0]
    err = capsys.readouterr().err
    assert f"warning: {e6 / 'config.json'} was unreadable" in err and "rebuilt it from" in err
    assert rep["summary"] == json.loads((runs / "a" / "eval.json").read_text())["summary"]
    record = store.load_json(e6 / "config.json")  # written back, checked
    assert record["config"]["num_cycles"] == 4 and record["rebuilt"]["checkpoint"].endswith("track0/ckpt.pt")
    row.trials, row.result = 1, "rebuilt with one warning (config from the checkpoint, data sha256 from the metas); same report"


@pytest.mark.slow
def test_the_printed_command_before_config_json_exists_and_with_a_space(data, tmp_path, fault):
    row = fault("SIGINT before config.json exists; --out_dir with a space", "first start, mid-write of config.json (item 7)")
    run_dir = tmp_path / "my runs" / "a"
    argv = q0_argv(data, run_dir)
    proc = subprocess.run([PYTHON, "tests/fault_runner.py", "signal:*config.json:1:sig=INT", "q0", *argv], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 130 and not (run_dir / "config.json").exists(), proc.stdout + proc.stderr
    command = proc.stderr.strip().splitlines()[-1].strip()
    assert command == shlex.join(["python", "q0.py", *argv])  # no --resume=True: there is no run yet; quoted
    code, _, err = run_train(shlex.split(command)[2:])  # pasted: it starts the run
    assert code == 0, err
    row.trials, row.result = 2, "the command without --resume=True, the space quoted; pasted, it trains"


def test_a_second_writer_of_the_same_file_keeps_the_others_temp_file(tmp_path, fault):
    """Two eval.py --score on one run: each write's clean-up of temp files left by a killed writer deleted the other
    process's temp file mid-write (its rename then failed, "free space?"). Only a dead writer's file is stale now."""
    row = fault("a second writer of one file", "store.atomic_write's clean-up (item 8)")
    path = tmp_path / "t0-c001.fitness.npy"  # the other writer: a live process (this one's parent)
    theirs, dead = tmp_path / f".{path.name}.tmp{os.getppid()}", tmp_path / f".{path.name}.tmp{2**22 + 7}"
    theirs.write_bytes(b"half a write in flight")
    dead.write_bytes(b"left by a SIGKILL")
    store.save_array(np.zeros(3, np.float32), path)
    assert theirs.exists() and not dead.exists()
    row.trials, row.result = 1, "a live writer's temp file kept; a dead one's removed"


def test_the_disk_full_line_never_reads_the_same_need_and_free(tmp_path, monkeypatch):
    """Item 9: 'need about 1 MiB, 1 MiB free' (both rounded) read as a contradiction."""
    monkeypatch.setattr(store, "free_bytes", lambda path: (1 << 20) + 5)  # need 1 MiB + 11 bytes: both "1,024 KiB"
    with pytest.raises(store.UserError) as e:
        store.check_disk(tmp_path / "x", 10)
    need, free = str(e.value).split("need about ")[1].split(" free")[0].split(", ")
    assert need != free and e.value.rerun


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_a_config_error(data, tmp_path):
    """Item 9: exit 2 like every other bad value (it was 1), before anything is written."""
    code, _, err = run_train(q0_argv(data, tmp_path / "r", "--batch_tokens=65536", "--micro_batch_size=512"))
    assert code == 2 and not (tmp_path / "r").exists()
    error_line(err, "config key 'batch_tokens'", "too small for one global batch")
