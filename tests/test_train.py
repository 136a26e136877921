"""train.py: config resolution and rejection, batch arithmetic, the epoch loader, the single-model schedule, CPU
training (single and ensemble), 2-process DDP against 1 process, kill-and-resume, refused resumes, NaN and a full
disk. One tiny single-mode run (32 steps of 1K tokens) is trained once and shared by the tests below."""
import json
import math
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import runtime
import store
import model as gpt
import train
from conftest import (PYTHON, ROOT, TINY, assert_same_weights, child_env, error_line, kill_when, load_config, member_weights, read_log, run_train,
                      run_train_subprocess, spawn_train, train_argv, validate)

SINGLE = dict(mode="single", epochs=0.5)  # 63 steps/epoch at 1K tokens/step -> 32 steps, a checkpoint every 3


@pytest.fixture(scope="module")
def single_run(tiny_data, tmp_path_factory):
    """The reference: an uninterrupted 1-process single-mode run. -> (run dir, argv, stdout)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    argv = train_argv(tiny_data, run_dir, **SINGLE)
    code, out, err = run_train(argv)
    assert code == 0, err
    return run_dir, argv, out


@pytest.fixture
def run_copy(single_run, tmp_path):
    shutil.copytree(single_run[0], tmp_path / "run")
    return tmp_path / "run"


def fake_data(spe, seq_len=128, batch_tokens=4096):
    """Train tokens for exactly `spe` steps per epoch (one document), as a plan sees them."""
    rows = batch_tokens // seq_len
    n = spe * rows * seq_len + seq_len
    return {"train": np.zeros(n, np.uint16), "meta": {"doc_starts": [0]}}


# -----------------------------------------------------------------------------------------------------
# config

def test_config_file_and_flags_resolve(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text('"""a recipe"""\nmode = "q0"\nseq_len = 64\nmuon_lr = 0.01\nadam_betas = (0.9, 0.99)\n')
    cfg = load_config([str(path), "--seq_len=32", "--dropout=0.1", "--resume=True", "--epochs=3",
                             "--compile"])
    assert (cfg.mode, cfg.seq_len, cfg.muon_lr, cfg.adam_betas) == ("q0", 32, 0.01, (0.9, 0.99))  # flags win
    assert cfg.dropout == 0.1 and cfg.resume is True and cfg.compile is True
    assert cfg.epochs == 3.0 and isinstance(cfg.epochs, float)  # an int literal for a float key is fine
    assert cfg.out_dir == str(Path("runs") / "recipe")  # default run folder from the file name
    assert load_config(["--adam_betas=[0.5, 0.6]"]).adam_betas == (0.5, 0.6)


@pytest.mark.parametrize("argv,key", [
    (["--bogus=1"], "bogus"),
    (["--seq_len=abc"], "seq_len"),
    (["--seq_len=1.5"], "seq_len"),
    (["--micro_batch_size=True"], "micro_batch_size"),
    (["--resume=maybe"], "resume"),
    (["--muon_lr=fast"], "muon_lr"),
    (["--adam_betas=0.9"], "adam_betas"),
])
def test_bad_flag_is_rejected_naming_the_key(argv, key):
    with pytest.raises(config.UserError, match=f"'{key}'"):
        load_config(argv)


def test_bad_config_file_keys_and_types(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("seq_len = 32\nwarmup_step = 10\n")
    with pytest.raises(config.UserError, match="'warmup_step'.*bad.py:2"):
        load_config([str(path)])
    for text, key in [("seq_len = 32.5\n", "seq_len"), ('dropout = "high"\n', "dropout"), ("compile = 1\n", "compile"),
                      ("mode = 0\n", "mode")]:
        path.write_text(text)
        with pytest.raises(config.UserError, match=f"'{key}' expects .*bad.py:1"):
            load_config([str(path)])


def test_config_file_with_code_is_rejected_unexecuted(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.py"
    for text, pattern in [("import os\nseq_len = 32\n", r"evil.py:1: only `key = value`"),
                          (f"seq_len = __import__('pathlib').Path({str(marker)!r}).touch()\n",
                           "'seq_len' must be a literal"),
                          ("seq_len = len('abc')\n", "'seq_len' must be a literal"),
                          ("def f():\n    pass\n", "only `key = value`"),
                          ("seq_len = 32 +\n", r"evil.py:1")]:  # a syntax error is a config error too
        path.write_text(text)
        with pytest.raises(config.UserError, match=pattern):
            load_config([str(path)])
    assert not marker.exists()


@pytest.mark.slow
def test_cli_config_errors_exit_nonzero_with_one_line(tmp_path, tiny_data):
    code, out, err = run_train(["--bogus_key=1", f"--out_dir={tmp_path / 'r'}"])
    assert code == 2
    error_line(err, "'bogus_key'")
    code, out, err = run_train(train_argv(tiny_data, tmp_path / "r", seq_len="long"))
    assert code == 2
    error_line(err, "'seq_len'")
    assert not (tmp_path / "r").exists()  # rejected before any work
    # the real command line: exit status 2, one line on stderr, no traceback
    proc = subprocess.run([PYTHON, "train.py", "--seq_len=abc", f"--out_dir={tmp_path / 'r'}"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error_line(proc.stderr, "'seq_len'", "expects int")


def test_resolved_config_is_saved(single_run):
    run_dir, argv, _ = single_run
    record = json.loads((run_dir / "config.json").read_text())
    expected = json.loads(json.dumps(asdict(load_config(argv))))  # tuples become lists in JSON
    assert record["config"] == expected
    assert record["config"]["seq_len"] == 32 and record["config"]["batch_tokens"] == 1024
    assert set(record["data"]) == {"train", "fitness", "val"} and all(len(h) == 64 for h in record["data"].values())


# -----------------------------------------------------------------------------------------------------
# batch arithmetic

def test_accum_is_derived(tiny_data, tmp_path, single_run):
    cfg = load_config(train_argv(tiny_data, tmp_path / "r", batch_tokens=2048, micro_batch_size=8))
    data = runtime.load_data(cfg)
    for group_size, accum in [(1, 8), (2, 4), (4, 2), (8, 1)]:
        env = dict(device=torch.device("cpu"), group_size=group_size, group_rank=0, world=group_size)
        assert accum * group_size * 8 * 32 == 2048
        assert f"x {accum} accum x {group_size} ranks/track = 2,048 tokens/step | 31 steps/epoch" in runtime.describe_setup(cfg, env, data, 31)
        assert train.SinglePlan(cfg, 0, None, data, env).loader.steps_per_epoch == (65536 - 1) // 2048 == 31
    # the start-up line states it: 8 seqs x 32 tokens x 4 accum x 1 rank = 1,024 tokens/step, 63 steps/epoch
    assert "8 seqs x 32 tokens x 4 accum x 1 ranks/track = 1,024 tokens/step | 63 steps/epoch" in single_run[2]


def test_batch_tokens_not_divisible_is_rejected(tiny_data, tmp_path):
    cfg = load_config(train_argv(tiny_data, tmp_path / "r", batch_tokens=1000))
    with pytest.raises(config.UserError, match="'batch_tokens'"):
        validate(cfg, 1, 65536)
    cfg = load_config(train_argv(tiny_data, tmp_path / "r", batch_tokens=768))  # 3 x 8 x 32
    validate(cfg, 1, 65536)
    with pytest.raises(config.UserError, match="'batch_tokens'.*ranks per track"):
        validate(cfg, 2, 65536)  # 2 ranks share the batch: no longer divisible


# -----------------------------------------------------------------------------------------------------
# the epoch loader

def synthetic_loader(seed=5, seq_len=8, rows=8, n_docs=40, n_tokens=2000, track=0):
    """Tokens 0 .. n-1 (each one unique, so where it lands is traceable) in documents of random lengths."""
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(np.arange(1, n_tokens), n_docs - 1, replace=False))
    starts = np.concatenate([[0], starts]) if n_docs > 1 else np.array([0])
    return train.EpochLoader(np.arange(n_tokens, dtype=np.uint32), starts.tolist(), seq_len, rows, seed, track), starts


def epoch_rows(loader, epoch, micro_rows=4):
    """Every (x, y) row of an epoch, in order."""
    xs, ys = [], []
    for b in range(loader.steps_per_epoch):
        for j in range(loader.R // micro_rows):
            x, y = loader.micro_batch(epoch * loader.steps_per_epoch + b, j, micro_rows, "cpu")
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def window_set(loader, epoch):
    return {tuple(r) for r in epoch_rows(loader, epoch)[0].tolist()}


def test_one_document_gets_fresh_windows_every_epoch_and_per_track():
    """The CPU benchmark's train split is one document: the windows (not only their order) must change with the
    epoch and the trajectory, or every cycle and trajectory re-reads the same windows."""
    loader, _ = synthetic_loader(n_docs=1)
    epochs = [window_set(loader, e) for e in range(6)]
    assert all(a != b for i, a in enumerate(epochs) for b in epochs[i + 1:])  # new window grids, not a new order
    assert len({loader.window_starts(e, slice(0, 1))[0] % loader.T for e in range(20)}) > 3  # offsets vary
    other_track, _ = synthetic_loader(n_docs=1, track=1)
    other_seed, _ = synthetic_loader(n_docs=1, seed=6)
    assert window_set(other_track, 0) != epochs[0] and window_set(other_seed, 0) != epochs[0]
    assert not torch.equal(epoch_rows(other_track, 0)[0], epoch_rows(synthetic_loader(n_docs=1, track=2)[0], 0)[0])


def test_epochs_are_reproducible_in_any_order():
    loader, _ = synthetic_loader()
    x1, y1 = epoch_rows(loader, 1)
    x0, _ = epoch_rows(loader, 0)
    assert not torch.equal(x0, x1)
    assert torch.equal(epoch_rows(loader, 1)[0], x1)  # back to epoch 1 after epoch 0
    fresh, _ = synthetic_loader()
    assert torch.equal(epoch_rows(fresh, 1)[1], y1)  # same (seed, track, epoch), new loader: a resume reads the same


def test_epoch_stream_is_whole_documents_in_shuffled_order():
    loader, starts = synthetic_loader()
    ends = np.append(starts[1:], 2000)
    stream = loader.stream(3, 0, 2000)
    assert np.array_equal(np.sort(stream), np.arange(2000))  # a permutation of the split
    assert not np.array_equal(stream, loader.stream(4, 0, 2000))
    docs = np.split(stream, np.flatnonzero(np.isin(stream, starts)))[1:]  # cut where a document starts
    assert len(docs) == len(starts)
    for d in docs:  # each document intact and in its own order
        k = np.searchsorted(starts, d[0])
        assert np.array_equal(d, np.arange(starts[k], ends[k]))
    assert np.array_equal(loader.stream(3, 123, 456), stream[123:456])


def test_rows_are_stream_windows_on_the_epochs_grid_each_token_at_most_once():
    loader, _ = synthetic_loader()
    spe, R, T = loader.steps_per_epoch, loader.R, loader.T
    assert loader.windows_per_epoch == (2000 - T) // T == 249 and spe == 249 // R == 31
    for epoch in (0, 1, 2):
        x, y = epoch_rows(loader, epoch)
        stream = torch.from_numpy(loader.stream(epoch, 0, 2000).astype(np.int64))
        starts = loader.window_starts(epoch, slice(0, spe * R))
        offset = starts[0] % T
        assert all(s % T == offset for s in starts) and 0 <= offset < T and max(starts) + T + 1 <= 2000
        for i, s in enumerate(starts):  # row i is the window at stream position s: input s..s+T-1, target shifted
            assert torch.equal(x[i], stream[s:s + T]) and torch.equal(y[i], stream[s + 1:s + T + 1])
        assert np.unique(x.numpy()).size == spe * R * T  # no input token twice in an epoch
        assert len(set(s // T for s in starts)) == spe * R  # distinct windows, in a shuffled order
        assert starts != sorted(starts)


def test_global_batch_is_the_same_for_any_number_of_ranks():
    loader, _ = synthetic_loader(rows=16)
    for step in (0, 5, loader.steps_per_epoch + 2):
        layouts = {}
        for world, micro_rows in [(1, 4), (2, 4), (4, 2), (1, 16), (2, 8)]:
            accum = loader.R // (micro_rows * world)
            # rank r, accumulation a reads micro-batch r * accum + a, as Track.train does
            xs = [loader.micro_batch(step, r * accum + a, micro_rows, "cpu")[0]
                  for r in range(world) for a in range(accum)]
            layouts[(world, micro_rows, accum)] = torch.cat(xs)
        ref = layouts[(1, 4, 4)]
        for key, x in layouts.items():
            assert torch.equal(x, ref), key
        epoch, b = divmod(step, loader.steps_per_epoch)
        s = loader.window_starts(epoch, slice(b * 16, b * 16 + 1))[0]
        assert torch.equal(ref[0], torch.from_numpy(loader.stream(epoch, s, s + 8).astype(np.int64)))


def test_weight_decay_on_embedding_and_head_as_the_reference(tiny_data, tmp_path):
    """The reference applies the base WD to the Muon matrices and to the embedding and head (AdamW) alike, all
    scaled by the schedule's multiplier; embed_head_wd=False keeps it on the matrices only."""
    for flag, adam_wd in ((True, 1.3), (False, 0.0)):
        cfg = train.Config(data_dir=str(tiny_data), weight_decay=1.3, embed_head_wd=flag, out_dir=str(tmp_path / str(flag)), **TINY)
        model = gpt.build(gpt.config_for("tiny", seq_len=32), "cpu")
        muon, adam = train.make_optimizers(cfg, model, torch.device("cpu"))
        assert [g["weight_decay"] for g in muon.param_groups] == [1.3]
        assert [g["weight_decay"] for g in adam.param_groups] == [adam_wd, adam_wd]
        train.set_multipliers(cfg, muon, adam, 0.5, 0.7)
        assert [g["weight_decay"] for g in adam.param_groups] == [pytest.approx(adam_wd * 0.7)] * 2


# -----------------------------------------------------------------------------------------------------
# single/ensemble schedule

def test_single_plan_schedule():
    cfg = train.Config(epochs=1.0, warmup_steps=4, decay="cosine", min_lr_frac=0.1)
    plan = train.SinglePlan(cfg, 0, None, fake_data(spe=20), {"device": torch.device("cpu")})
    assert plan.total_steps == 20 and plan.save_steps == [20]
    lr = lambda s: plan.multipliers(s)[0]
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert lr(4) == 1.0  # decay starts at the peak
    assert lr(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # progress 4/16
    assert lr(12) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr(19) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(plan.multipliers(s)[1] == 1.0 for s in range(20))  # WD constant
    cfg.decay = "linear"
    assert lr(8) == pytest.approx(0.1 + 0.9 * 0.75) and lr(12) == pytest.approx(0.55) and lr(2) == 0.75
    cfg.decay = "none"
    assert lr(12) == 1.0


# -----------------------------------------------------------------------------------------------------
# training on CPU

def test_single_run_learns_and_writes_its_member(single_run):
    run_dir = single_run[0]
    evals = read_log(run_dir, kind="eval")
    assert sorted(evals) == [0, 32]
    assert evals[0]["val"] == pytest.approx(math.log(257), abs=1e-4)  # head N(0, 0.001): log(real vocab), 257 bytes
    assert evals[32]["val"] < evals[0]["val"] - 1.0
    losses = read_log(run_dir)
    assert sorted(losses) == list(range(1, 33))  # log_every=1
    assert losses[32]["loss"] < losses[1]["loss"] - 1.0
    rows = store.read_manifest(run_dir)
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["mode"], row["track"], row["seed"], row["epochs"], row["budget_epochs"]) == \
        ("single", "single", 0, 1337, 0.5, 0.5)
    assert row["teacher"] is None and row["train_loss"] == losses[32]["loss"]
    model, ckpt = store.load_member(run_dir / row["path"])
    final = torch.load(run_dir / "track0" / "ckpt.pt", weights_only=True)
    assert final["step"] == 32
    assert_same_weights(model.state_dict(), final["model"])


@pytest.mark.slow
def test_ensemble_members_have_their_own_seeds_and_budgets(tiny_data, tmp_path):
    run_dir = tmp_path / "ens"
    code, out, err = run_train(train_argv(tiny_data, run_dir, mode="ensemble", ensemble_size=2, epochs=0.125,
                                          log_every=100, ckpt_every_epochs=0))
    assert code == 0, err
    rows = store.read_manifest(run_dir)
    assert [r["name"] for r in rows] == ["member0", "member1"]
    assert [r["seed"] for r in rows] == [1337, 1338]
    assert [r["epochs"] for r in rows] == [0.125, 0.125] and [r["budget_epochs"] for r in rows] == [0.125, 0.25]
    w0, w1 = member_weights(run_dir, "member0"), member_weights(run_dir, "member1")
    assert not torch.equal(w0["embed.weight"], w1["embed.weight"])
    for track in (0, 1):
        assert torch.load(run_dir / f"track{track}" / "ckpt.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
def test_ensemble_grown_on_resume_is_the_larger_ensemble(tiny_data, tmp_path):
    """--resume=True with a larger ensemble_size trains only the new members, bit for bit those of a fresh run."""
    flags = dict(mode="ensemble", epochs=0.125, log_every=100, ckpt_every_epochs=0)
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    assert run_train(train_argv(tiny_data, grown, ensemble_size=1, **flags))[0] == 0
    first = (grown / "members" / "member0.pt").read_bytes()
    code, out, err = run_train(train_argv(tiny_data, grown, ensemble_size=2, resume=True, **flags))
    assert code == 0, err
    assert "track 0: already finished" in out and (grown / "members" / "member0.pt").read_bytes() == first
    assert run_train(train_argv(tiny_data, fresh, ensemble_size=2, **flags))[0] == 0
    assert store.read_manifest(grown) == store.read_manifest(fresh)
    for name in ("member0", "member1"):
        assert_same_weights(member_weights(grown, name), member_weights(fresh, name))
    record = json.loads((grown / "config.json").read_text())
    assert record["resumes"][-1]["keys"] == {"ensemble_size": [1, 2]}
    code, out, err = run_train(train_argv(tiny_data, grown, ensemble_size=1, resume=True, **flags))
    assert code == 1 and "config key 'ensemble_size' was 2, now 1" in err  # it may grow, never shrink


@pytest.mark.slow
def test_ddp_two_processes_match_one(single_run, tmp_path):
    """torchrun, 2 ranks on gloo, 4 -> 2 accumulation steps each: the same global batch, so the same losses up to
    floating-point reduction order (measured: at most rel 2e-5 over the 32 steps; bound: rel 1e-4). The weights
    agree less tightly: Muon orthogonalises each update to a fixed size, so the reduction-order noise in the tiny
    early gradients of the zero-initialised proj/down matrices moves them by up to ~3% of their norm (measured);
    bound 10% per tensor, where an unrelated run (another seed) differs by ~140%."""
    run_dir, argv, _ = single_run
    argv2 = [a for a in argv if not a.startswith("--out_dir")] + [f"--out_dir={tmp_path / 'ddp'}"]
    out = run_train_subprocess(argv2, nproc=2)
    assert "x 2 accum x 2 ranks/track = 1,024 tokens/step" in out
    one, two = read_log(run_dir), read_log(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == list(range(1, 33))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step
    val_one, val_two = read_log(run_dir, kind="eval")[32]["val"], read_log(tmp_path / "ddp", kind="eval")[32]["val"]
    assert val_two == pytest.approx(val_one, rel=1e-4)
    a, b = member_weights(run_dir, "single"), member_weights(tmp_path / "ddp", "single")
    for k in a:
        assert (a[k] - b[k]).norm() <= 0.1 * a[k].norm(), k


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(single_run, tmp_path, tiny_data):
    ref_dir, argv, _ = single_run
    run_dir = tmp_path / "killed"
    argv2 = [a for a in argv if not a.startswith("--out_dir")] + [f"--out_dir={run_dir}"]
    ckpt = run_dir / "track0" / "ckpt.pt"
    kill_when(spawn_train(argv2), ckpt.exists)
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 32 and not (run_dir / "members" / "single.pt").exists()  # stopped mid-epoch
    code, out, err = run_train(argv2 + ["--resume=True"])
    assert code == 0, err
    assert f"resumed from {ckpt} at step {killed_at}" in out
    assert_same_weights(member_weights(run_dir, "single"), member_weights(ref_dir, "single"))
    assert_same_weights(torch.load(ckpt, weights_only=True)["model"],
                        torch.load(ref_dir / "track0" / "ckpt.pt", weights_only=True)["model"])
    ref, resumed = read_log(ref_dir), read_log(run_dir)
    assert sorted(resumed) == list(range(1, 33))
    for step in range(killed_at + 1, 33):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    assert read_log(run_dir, kind="eval")[32] == read_log(ref_dir, kind="eval")[32]  # same final val/fitness
    assert store.read_manifest(run_dir)[0]["train_loss"] == store.read_manifest(ref_dir)[0]["train_loss"]


def test_resume_before_the_first_checkpoint_starts_over_without_duplicate_log_rows(single_run, run_copy):
    """A run killed after it logged but before its first checkpoint: the track restarts from step 0, and the
    rows it had logged are dropped rather than written a second time."""
    ref_dir, argv, _ = single_run
    for p in [run_copy / "track0" / "ckpt.pt", run_copy / "track0" / "started.json", run_copy / "track0" / "manifest.json",
              *(run_copy / "members").iterdir()]:  # what a run killed before its first checkpoint leaves
        p.unlink()
    code, out, err = run_train([a for a in argv if not a.startswith("--out_dir")] + [f"--out_dir={run_copy}", "--resume=True"])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_copy / "track0" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (ref_dir / "track0" / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref]  # each row once
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in ref]


@pytest.mark.parametrize("flag,key", [("--model_size=mini", "model_size"), ("--seed=7", "seed"),
                                      ("--batch_tokens=512", "batch_tokens")])
def test_resume_with_changed_config_is_refused(run_copy, tiny_data, single_run, flag, key):
    before = (run_copy / "config.json").read_text(), (run_copy / "track0" / "ckpt.pt").read_bytes()
    argv = [a for a in single_run[1] if not a.startswith("--out_dir")] + [f"--out_dir={run_copy}"]
    code, out, err = run_train(argv + ["--resume=True", flag])
    assert code == 1
    error_line(err, f"config key '{key}'", "cannot resume")
    assert ((run_copy / "config.json").read_text(), (run_copy / "track0" / "ckpt.pt").read_bytes()) == before
    # changing a key that does not change the result is fine: the finished run says so and stops
    code, out, err = run_train(argv + ["--resume=True", "--log_every=5", "--eval_tokens=512"])
    assert code == 0 and "already finished (32 steps)" in out


def test_second_run_in_the_same_folder_is_refused(run_copy, single_run):
    argv = [a for a in single_run[1] if not a.startswith("--out_dir")] + [f"--out_dir={run_copy}"]
    log = (run_copy / "track0" / "log.jsonl").read_text()
    code, out, err = run_train(argv)
    assert code == 1
    error_line(err, "already holds a run", "--resume=True")
    assert (run_copy / "track0" / "log.jsonl").read_text() == log


# -----------------------------------------------------------------------------------------------------
# failures: NaN and a full disk

def record_saves(monkeypatch):
    saves = []
    real = store.save_torch

    def save_torch(obj, path):
        real(obj, path)
        saves.append((Path(path).name, obj.get("step")))
    monkeypatch.setattr(store, "save_torch", save_torch)
    return saves


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    """A loss that turns NaN at step 8 (injected: the soft-cap and the norms keep even a huge LR finite here)."""
    real_loss, calls = train.SinglePlan.loss, [0]

    def loss(self, model, batch):
        calls[0] += 1
        value = real_loss(self, model, batch)
        return value * float("nan") if calls[0] > 7 * 4 else value  # 4 micro-batches per step
    monkeypatch.setattr(train.SinglePlan, "loss", loss)
    saves = record_saves(monkeypatch)
    run_dir = tmp_path / "nan"
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE))  # checkpoints at steps 3 and 6
    assert code == 1
    ckpt = run_dir / "track0" / "ckpt.pt"
    error_line(err, "loss is nan at step 8", f"Last good checkpoint: {ckpt} (step 6)")
    assert saves == [("ckpt.pt", 3), ("ckpt.pt", 6)]  # nothing written from the NaN state
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run_dir / "members").exists()
    monkeypatch.undo()
    # the advice, followed: resume with lower learning rates and a tighter clip; the change is recorded with its step
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE) + ["--resume=True", "--muon_lr=0.01",
                                                                         "--grad_clip=0.5"])
    assert code == 0, err
    assert "track 0: from step 6 on, muon_lr 0.02 -> 0.01, grad_clip 1.0 -> 0.5" in out
    rows = [json.loads(x) for x in (run_dir / "track0" / "log.jsonl").read_text().splitlines()]
    assert dict(kind="resume", step=6, changed=dict(muon_lr=[0.02, 0.01], grad_clip=[1.0, 0.5])) in rows
    resumes = json.loads((run_dir / "config.json").read_text())["resumes"]
    assert resumes[-1]["keys"]["muon_lr"] == [0.02, 0.01] and resumes[-1]["keys"]["grad_clip"] == [1.0, 0.5]
    assert (run_dir / "members" / "single.pt").exists()


@pytest.mark.slow
def test_full_disk_stops_before_writing(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "full"

    def free_bytes(path):  # room for the first checkpoint (and the record that the track has started) only
        return 0 if Path(path).name == "track0" and (run_dir / "track0" / "started.json").exists() else 1 << 40
    monkeypatch.setattr(store, "free_bytes", free_bytes)
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE))
    assert code == 1
    ckpt = run_dir / "track0" / "ckpt.pt"
    error_line(err, f"not enough disk to write {ckpt}", "Earlier files are intact")
    assert torch.load(ckpt, weights_only=True)["step"] == 3  # the earlier checkpoint, whole
    assert not list(run_dir.rglob("*.tmp*"))
    assert json.loads((run_dir / "config.json").read_text())["config"]["epochs"] == 0.5
    assert max(read_log(run_dir)) == 6  # it trained to the second checkpoint and stopped there


# -----------------------------------------------------------------------------------------------------
# a newcomer's errors: every bad value named before anything is written, --help, Ctrl-C, resume of nothing

@pytest.mark.parametrize("flag, key", [("--muon_lr=-0.1", "muon_lr"), ("--weight_decay=-1", "weight_decay"),
                                       ("--log_every=0", "log_every"), ("--batch_tokens=0", "batch_tokens"),
                                       ("--eval_tokens=-5", "eval_tokens"), ("--mode=q0 --perturb_scale_end=-1", "perturb_scale_end"),
                                       ("--device=cuda", "device"), ("--adam_betas=(0.9,1.5)", "adam_betas"),
                                       ("--mode=bogus", "mode")])
def test_bad_values_are_refused_by_name_before_anything_is_written(tiny_data, tmp_path, flag, key):
    if key == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "r"
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE) + flag.split())
    assert code == 2, err
    line = error_line(err, key)
    assert "must" in line or "not available" in line, line
    assert not run_dir.exists()  # nothing written: the same command with the value fixed starts cleanly


@pytest.mark.slow
@pytest.mark.parametrize("script, keys", [("train.py", ["--epochs", "--muon_lr"]),
                                          ("q0.py", ["--epochs_per_cycle", "--distill_alpha", "--muon_lr"])])
def test_help_lists_every_key_with_its_default_and_meaning(script, keys):
    proc = subprocess.run([PYTHON, script, "--help"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  --")}
    cfg = load_config(["--mode=q0" if script == "q0.py" else "--mode=single"])
    assert set(lines) == {f"--{k}" for k in asdict(cfg)}  # every key, from the dataclass source
    assert "default 0.02" in lines["--muon_lr"] and "Muon" in lines["--muon_lr"]
    assert all(k in lines for k in keys)
    bare = subprocess.run([PYTHON, script], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "--muon_lr" in bare.stdout  # no arguments: the help, not a silent default run


def test_resume_of_a_missing_run_folder_is_refused(tiny_data, tmp_path):
    code, out, err = run_train(train_argv(tiny_data, tmp_path / "nope", **SINGLE) + ["--resume=True"])
    assert code == 1
    error_line(err, "nothing to resume", str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def spawn_until_first_checkpoint(data_dir, run_dir):
    """A 4-epoch single run as a subprocess, returned once its first checkpoint exists. -> (argv, the Popen)."""
    argv = train_argv(data_dir, run_dir, **dict(SINGLE, epochs=4.0))
    proc = spawn_train(argv)
    t0 = time.time()
    while not (run_dir / "track0" / "ckpt.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 120, "no checkpoint before the run ended"
        time.sleep(0.05)
    return argv, proc


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tiny_data, tmp_path):
    """Ctrl-C, sent at an exact point (mid-write of the first checkpoint: tests/fault_runner.py), not raced against
    the run's end: exit 130, no traceback, the checkpoint and the command that continues the run, which works."""
    run_dir = tmp_path / "r"
    argv = train_argv(tiny_data, run_dir, **dict(SINGLE, epochs=4.0))
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "fault_runner.py"), "signal:*track0/ckpt.pt:1:sig=INT", "train",
                           *argv], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted (SIGINT). Checkpoints: " + str(run_dir / "track0" / "ckpt.pt") in out
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith("python train.py ") and command.endswith("--resume=True")
    code, _, err = run_train(shlex.split(command)[2:])  # the printed command continues the run
    assert code == 0, err


def test_process_group_timeout_is_the_config_value(monkeypatch):
    """NCCL's default of 10 minutes kills a job whose ranks wait on a slow checkpoint write: the timeout is a key."""
    import datetime
    seen = {}
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert runtime.init_distributed(torch.device("cpu"), train.Config.dist_timeout_minutes) == (2, 0)
    assert seen["timeout"] == datetime.timedelta(hours=3) and seen["backend"] == "gloo"


def test_a_restart_on_one_node_scopes_the_store_keys_by_attempt(monkeypatch, capsys):
    """torchrun's agent store outlives a worker restart with the dead attempt's keys in it: on one node they are
    scoped by TORCHELASTIC_RESTART_COUNT; across nodes (counts differ) it says the launch fix; first attempts and
    plain launches are left alone."""
    import datetime
    made = []
    monkeypatch.setattr(runtime.dist, "TCPStore", lambda *a, **kw: made.append((a, kw)) or runtime.dist.HashStore())
    env = dict(TORCHELASTIC_RESTART_COUNT="2", TORCHELASTIC_USE_AGENT_STORE="True", GROUP_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    kw = runtime.restart_store(2, 1, datetime.timedelta(minutes=5))
    assert made == [(("127.0.0.1", 29500, 2), dict(is_master=False, timeout=datetime.timedelta(minutes=5)))]
    assert (kw["rank"], kw["world_size"]) == (1, 2)
    kw["store"].set("rank_0", b"x")  # the prefix is the attempt's
    assert made and runtime.dist.PrefixStore("attempt2", kw["store"].underlying_store).get("rank_0") == b"x"
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert runtime.restart_store(4, 0, datetime.timedelta(minutes=5)) == {}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().out
    for k, v in (("GROUP_WORLD_SIZE", "1"), ("TORCHELASTIC_RESTART_COUNT", "0")):
        monkeypatch.setenv(k, v)
    assert runtime.restart_store(2, 0, datetime.timedelta(minutes=5)) == {}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: fresh store
    assert runtime.restart_store(2, 0, datetime.timedelta(minutes=5)) == {} and len(made) == 1


@pytest.mark.slow
def test_nan_gradient_with_a_finite_loss_takes_no_step(tiny_data, tmp_path, monkeypatch, fault):
    """An overflow in the backward pass leaves the loss finite and the gradients NaN (injected at step 8): the step
    must not be taken, nothing written from it, and the message must name the last good checkpoint truly."""
    row = fault("NaN gradient, finite loss (single)", "backward of step 8")
    class NanBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")
    real_loss, calls = train.SinglePlan.loss, [0]

    def loss(self, model, batch):
        calls[0] += 1
        value = real_loss(self, model, batch)
        return NanBackward.apply(value) if calls[0] > 7 * 4 else value  # 4 micro-batches per step
    monkeypatch.setattr(train.SinglePlan, "loss", loss)
    saves = record_saves(monkeypatch)
    run_dir = tmp_path / "nan_grad"
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE))
    assert code == 1
    ckpt = run_dir / "track0" / "ckpt.pt"
    error_line(err, "the gradient is not finite at step 8 (grad norm nan", f"Last good checkpoint: {ckpt} (step 6)")
    assert saves == [("ckpt.pt", 3), ("ckpt.pt", 6)]
    assert all(torch.isfinite(v).all() for v in torch.load(ckpt, weights_only=True)["model"].values())
    monkeypatch.undo()
    code, out, err = run_train(train_argv(tiny_data, run_dir, **SINGLE) + ["--resume=True"])  # the cause gone
    assert code == 0, err
    row.trials = 1
    row.result = "step not taken; one line naming step 8 and ckpt (step 6), which stays finite; resume finishes"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_values_are_in_range(path):
    validate(load_config([str(path)]), 1, 10**8)  # every key's rule, and the run's at a large train split


@pytest.mark.slow
def test_a_second_trainer_on_a_running_track_is_refused(tiny_data, tmp_path, fault):
    """Two trainers on one run would interleave the log and tear checkpoints: the second is refused, naming the
    holder; once the holder is dead (SIGKILL: the kernel drops its lock) the resume goes ahead."""
    row = fault("second trainer on a running track", "--resume=True while the first trains; then after its SIGKILL")
    run_dir = tmp_path / "r"
    argv, proc = spawn_until_first_checkpoint(tiny_data, run_dir)
    code, out, err = run_train(argv + ["--resume=True"])
    assert code == 1
    error_line(err, f"{run_dir / 'track0'} is being trained by pid {proc.pid} on ")
    proc.kill()
    proc.communicate(timeout=60)
    code, out, err = run_train(argv + ["--resume=True"])
    assert code == 0, err
    row.trials = 2
    row.result = "refused with one line naming the holder's pid and host; after the holder's death the resume runs"


def test_a_run_folder_other_ranks_cannot_see_is_refused(tiny_data, tmp_path, monkeypatch):
    """Rank 0 writes config.json; a rank on a node whose disk does not hold it (a node-local run folder) stops."""
    cfg = load_config(train_argv(tiny_data, tmp_path / "r", **SINGLE))
    data = runtime.load_data(cfg)
    env = dict(rank=1, world=1)  # rank 1 writes nothing; world 1: no barrier to wait at
    with pytest.raises(config.UserError, match="file system every node sees"):
        runtime.prepare_run_dir(cfg, env, data)


@pytest.mark.slow
def test_compile_on_cpu_trains_like_eager(tiny_data, tmp_path):
    """compile=True (inductor, on CPU here) runs the GPU configs' code path and trains the same model: each logged
    loss of the first 6 steps agrees with eager within 1e-4 relative (fp32; the fused kernels sum in another order,
    so not bit for bit). Dropout off: the compiled graph draws its own masks."""
    flags = dict(SINGLE, epochs=0.1, dropout=0.0)
    for name, compiled in (("eager", False), ("compiled", True)):
        code, out, err = run_train(train_argv(tiny_data, tmp_path / name, **flags) + [f"--compile={compiled}"])
        assert code == 0, err
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 6
    for step in eager:
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step


def test_a_log_cut_short_is_noticed_on_resume(single_run, tmp_path, fault):
    """The checkpoint counts the log's rows; a log.jsonl that lost rows (cut short, or rewritten by a killed resume
    before that was atomic) gets one warning naming how many, and the run goes on."""
    row = fault("log.jsonl cut short (single)", "resume of a finished run, 3 rows left")
    run_dir, argv, _ = single_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    log = copy / "track0" / "log.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join(rows[:3]) + "\n")
    code, out, err = run_train([a for a in argv if not a.startswith("--out_dir")] + [f"--out_dir={copy}", "--resume=True"])
    assert code == 0, err
    assert f"warning: {log} holds 3 rows up to step" in err and f"the checkpoint counted {len(rows)}" in err
    row.trials = 1
    row.result = "one warning naming the log and the rows lost; the run (weights, members) goes on intact"
