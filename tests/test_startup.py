"""One start-up for every entry point (runtime.session, config.load): a bad input ends in one line, exit 2, nothing
written, and the fix it names works; Ctrl-C and SIGTERM end eval.py as they end training (one message, the command
that continues, exit 130 or 143). The cases found from outside on 22bce07, where each ended otherwise."""
import shutil
import subprocess

import numpy as np
import pytest

import config
import eval as ev
from conftest import PYTHON, ROOT, child_env, error_line, run_train, train_argv

Q0 = dict(mode="q0", batch_tokens=1024, micro_batch_size=8, num_trajectories=1, num_cycles=2, epochs_per_cycle=0.125,
          distill_after_cycles=2, ckpt_every_epochs=0.125)
STUDENT = dict(mode="student", batch_tokens=1024, micro_batch_size=8, epochs=0.05)


@pytest.fixture(scope="module")
def population(tiny_data, tmp_path_factory):
    """A tiny q0 run (2 members), scored and with its prior.json."""
    run_dir = tmp_path_factory.mktemp("startup") / "q0"
    code, out, err = run_train(train_argv(tiny_data, run_dir, **Q0))
    assert code == 0, err
    ev.main([str(run_dir)])
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--eval_every_epochs=1e999", "--ckpt_every_epochs=nan", "--epochs=inf"])
def test_a_number_that_is_not_finite_is_one_line(tiny_data, tmp_path, flag):
    """Before: `--eval_every_epochs=1e999` was an OverflowError traceback once the run folder existed."""
    run_dir = tmp_path / "r"
    code, _, err = run_train(train_argv(tiny_data, run_dir, mode="single") + [flag])
    assert code == 2 and not run_dir.exists()
    error_line(err, f"config key '{flag[2:].split('=')[0]}' must be a finite number")


@pytest.mark.slow
def test_a_config_file_that_is_not_utf8_is_one_line(tiny_data, tmp_path):
    """Before: one non-UTF-8 byte in a comment was a UnicodeDecodeError traceback."""
    path = tmp_path / "recipe.py"
    path.write_bytes(b'mode = "single"  # caf\xe9\nepochs = 0.05\n')
    argv = [str(path), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'r'}", "--batch_tokens=1024",
            "--micro_batch_size=8", "--seq_len=32", "--eval_tokens=1024"]
    code, _, err = run_train(argv)
    assert code == 2 and not (tmp_path / "r").exists()
    error_line(err, f"{path}: byte 22 is not UTF-8", "save the config file as UTF-8")
    path.write_bytes(path.read_bytes().replace(b"\xe9", b"e"))  # the fix it names
    code, _, err = run_train(argv)
    assert code == 0, err


@pytest.mark.slow
def test_a_data_dir_that_is_a_file_names_the_folder_to_use(tiny_data, tmp_path):
    """Before: load_split's advice (re-run prepare_data.py --out_dir FILE) failed when followed (FileExistsError)."""
    bogus = tmp_path / "data.bin"
    bogus.write_bytes(b"x")
    code, _, err = run_train(train_argv(bogus, tmp_path / "r", mode="single", epochs=0.05))
    assert code == 2 and not (tmp_path / "r").exists()
    error_line(err, f"--data_dir={bogus} is a file, not a folder of prepared data")
    code, _, err = run_train(train_argv(tiny_data, tmp_path / "r", mode="single", epochs=0.05))  # the folder: runs
    assert code == 0, err
    proc = subprocess.run([PYTHON, "prepare_data.py", f"--out_dir={bogus}"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)  # prepare_data.py into that file: one line too
    assert proc.returncode == 2 and bogus.read_bytes() == b"x"
    error_line(proc.stderr, f"--out_dir={bogus} cannot hold the token files: {bogus} is a file")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["student_init=best, another size", "teacher_topk above the vocab"])
def test_the_students_checks_come_before_its_run_folder(population, tiny_data, tmp_path, case):
    """Before: both were refused after the run folder was written, so the fixed command in the same --out_dir was
    then refused as "already holds a run"."""
    bad, fix, needle = {
        "student_init=best, another size": (dict(student_init="best", model_size="mini"), dict(student_init="best"),
                                            "student_init=best needs the student's model_size to be the teacher's"),
        "teacher_topk above the vocab": (dict(teacher_topk=300), dict(teacher_topk=8),
                                         "config key 'teacher_topk' = 300: more than the vocab (257)")}[case]
    run_dir = tmp_path / "student"
    base = dict(STUDENT, teacher_run=str(population), teacher_k=2)
    code, _, err = run_train(train_argv(tiny_data, run_dir, **dict(base, **bad)))
    assert code == 2 and not run_dir.exists()
    error_line(err, needle)
    code, _, err = run_train(train_argv(tiny_data, run_dir, **dict(base, **fix)))  # the fix, same --out_dir
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143)])
def test_a_signal_stops_eval_with_the_command_that_continues(population, tmp_path, sig, code):
    """Before: SIGINT mid-scoring printed a KeyboardInterrupt traceback and SIGTERM died with no word. The signal is
    sent in the middle of writing the second member's first score file (tests/fault_runner.py): every file written is
    whole, the printed command finishes the job, scoring only what is missing, to the same numbers."""
    run_dir = tmp_path / "run"
    shutil.copytree(population, run_dir)
    shutil.rmtree(run_dir / "scores")
    (run_dir / "prior.json").unlink()
    proc = subprocess.run([PYTHON, "tests/fault_runner.py", f"signal:*scores/t0-c002.fitness.npy:1:sig={sig}", "eval",
                           str(run_dir)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == code, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and err[-2].startswith(f"interrupted (SIG{sig}); every file written so far")
    assert err[-1].strip() == f"python eval.py {run_dir}"
    assert not list(run_dir.rglob(".*.tmp*"))
    rerun = subprocess.run(err[-1].split(), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0 and "2 members, 1 already scored, 1 to score" in rerun.stdout, rerun.stdout + rerun.stderr
    for split in ("fitness", "val"):
        for name in ("t0-c001", "t0-c002"):
            assert np.array_equal(np.load(run_dir / "scores" / f"{name}.{split}.npy"),
                                  np.load(population / "scores" / f"{name}.{split}.npy"))


def test_flag_forms_and_a_flag_without_its_value(tmp_path):
    """--key=value and --key value read alike; a bool alone is true; a list takes the arguments up to the next flag;
    a value-taking flag with none is one line naming the two forms."""
    cfg = config.load(ev.EvalConfig, ["runs/a", "--eval_tokens", "2048", "runs/b", "--score", "--exclude=x"], "")
    assert cfg.runs == ("runs/a", "runs/b") and cfg.eval_tokens == 2048 and cfg.score and cfg.exclude == "x"
    with pytest.raises(config.UserError, match="--eval_tokens needs a value: --eval_tokens=VALUE or --eval_tokens VALUE"):
        config.load(ev.EvalConfig, ["runs/a", "--eval_tokens"], "")
