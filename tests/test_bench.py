"""Tests for bench/reproduce.py's arithmetic: the headline ratio comes from budget_to_reach and loss_at
(interpolation in log-budget), the populations from existing_at, the recipe grid from distill_start; and the
claim that keeps parallel shards from training one run twice. Hand-computed values; nothing here trains."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).resolve().parents[1] / "bench" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

CURVE = [(4, 2.2, 9.9), (16, 2.0, 9.9), (64, 1.9, 9.9)]  # (budget, loss, extra columns ignored)


def test_budget_to_reach_interpolates_in_log_budget():
    # 2.1 is half-way from 2.2 (at 4) to 2.0 (at 16): half-way in log-budget is sqrt(4 * 16) = 8
    assert reproduce.budget_to_reach(CURVE, 2.1) == pytest.approx(8.0)
    assert reproduce.budget_to_reach(CURVE, 2.0) == pytest.approx(16.0)  # reached exactly at a point
    assert reproduce.budget_to_reach(CURVE, 2.5) == 4   # already below at the first point: no extrapolation
    assert reproduce.budget_to_reach(CURVE, 1.8) is None  # never reached


def test_loss_at_interpolates_and_refuses_to_extrapolate():
    assert reproduce.loss_at(CURVE, 8) == pytest.approx(2.1)
    assert reproduce.loss_at(CURVE, 32) == pytest.approx(2.0 - 0.1 * 0.5)  # log2 32 is half-way from 16 to 64
    assert reproduce.loss_at(CURVE, 4) == pytest.approx(2.2)
    assert reproduce.loss_at(CURVE, 2) is None and reproduce.loss_at(CURVE, 128) is None


def test_existing_at_counts_snapshots_by_the_budget_spent_when_they_were_saved():
    rows = [{"budget_epochs": b} for b in (4, 4, 8, 8, 12)]
    assert reproduce.existing_at(rows, 3) == []
    assert reproduce.existing_at(rows, 8) == [0, 1, 2, 3]
    assert reproduce.existing_at(rows, 64) == [0, 1, 2, 3, 4]


def test_distill_start_is_the_saturation_length_capped_at_half_the_trajectory():
    assert reproduce.distill_start(16, 16) == 8          # 16 epochs of 2-epoch cycles
    assert reproduce.distill_start(16, 8) == 4           # capped: half of 8 cycles
    assert reproduce.distill_start(8, 64, 1.0) == 8
    assert reproduce.distill_start(1, 16) == 1           # never before the first snapshot exists


def test_recipe_grid_spends_the_budget_and_contains_the_headline_run():
    grid = reproduce.recipe_grid(16)
    assert [(P, epc) for P, epc, *_ in grid] == [(1, 2.0), (2, 2.0), (1, 1.0)]
    for P, epc, cycles, d in grid:
        assert P * epc * cycles == 64
        assert d is None or 1 <= d <= cycles // 2
    headline = (reproduce.q0_trajectories, reproduce.q0_epochs_per_cycle, reproduce.q0_cycles)
    assert [e[:3] for e in grid].count(headline) == 1  # the headline's allocation, run once for both suites
    name, flags = reproduce.recipe_run(1, 16, next(e for e in grid if e[:3] == headline))
    assert name == "q0-s1" and flags == reproduce.q0_flags(1, **reproduce.headline_flags())
    name, flags = reproduce.recipe_run(1, 16, grid[1])  # another allocation: the headline's recipe otherwise
    assert name.startswith("recipe-P2-c2-") and flags["num_cycles"] == 16
    assert {k: flags[k] for k in reproduce.headline_flags()} == {**reproduce.headline_flags(), **(
        {} if reproduce.q0_distill is None else {"distill_after_cycles": grid[1][3]})}


def test_steps_grid_is_the_headline_recipe_at_the_small_batch_with_one_distillation_change_each(monkeypatch):
    monkeypatch.setattr(reproduce, "steps_muon_lr", 0.03)
    grid = reproduce.steps_grid(2, 16)
    assert list(grid) == [f"steps-b1024-{v}-s2" for v in ("off", "a0.1", "mix-a0.45", "a0.45")]
    off = grid["steps-b1024-off-s2"]
    # the headline's flags but the batch, the Muon LR and 16 cycles (32 epochs; 100,000 / 1,024 -> 97 steps per epoch)
    assert off == {**reproduce.q0_flags(2, **reproduce.headline_flags()), "num_cycles": 16, "muon_lr": 0.03,
                   "batch_tokens": 1024, "micro_batch_size": 8}
    assert off["distill_after_cycles"] >= off["num_cycles"]  # never distils
    changed = lambda name: {k: v for k, v in grid[name].items() if off.get(k) != v}
    start = dict(distill_after_cycles=8)  # E* = 16 epochs = 8 cycles of 2 epochs
    assert all(flags["distill_temperature"] == 1.2 for flags in grid.values())  # the reference's T, from q0_flags
    assert changed("steps-b1024-a0.1-s2") == {**start, "distill_alpha": 0.1}
    assert changed("steps-b1024-a0.45-s2") == start  # q0_flags's alpha is the reference's 0.45 already
    assert changed("steps-b1024-mix-a0.45-s2") == {**start, "distill_teacher": "mixture", "distill_teacher_k": 4}
    longer = reproduce.steps_grid(2, 16, budget=64)  # the same runs extended: only the number of cycles grows
    assert list(longer) == list(grid)
    assert all(longer[n] == {**grid[n], "num_cycles": 32} for n in grid)


def test_best_k_is_chosen_on_fitness_and_val_only_reported():
    # member 0 is better on fitness (log p = -1 vs -3 on every token), member 1 on val: K=1 (member 0) wins on
    # fitness with NLL exactly 1; its val is member 0's 2.0, not the 0.5 that choosing on val would give
    F = np.array([[-1.0] * 50, [-3.0] * 50])
    V = np.array([[-2.0] * 50, [-0.5] * 50])
    fit, k, val = reproduce.best_k_on_fitness(F, V)
    assert (k, fit, val) == (1, pytest.approx(1.0), pytest.approx(2.0))


def test_k_selection_is_cross_fitted_on_alternate_blocks_of_fitness():
    """fold_halves: even blocks fit, odd ones score, and back (a partial block dropped). Member 0 has p 0.5 on every
    token; member 1 p 0.25 on the even blocks and 1 on the odd ones. At K=1 each rule fit on the even blocks keeps
    member 0 (scores log 2 on the odd ones), fit on the odd blocks member 1 (scores log 4 on the even ones): the
    cross-fitted loss is their token-weighted mean, 1.5 log 2, where fitting on all tokens would score log 2."""
    even, odd = reproduce.fold_halves(9, 2)[0]
    assert even.tolist() == [0, 1, 4, 5] and odd.tolist() == [2, 3, 6, 7]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import k_select
    p1 = np.array([0.25, 0.25, 1.0, 1.0] * 2)
    F = np.log(np.stack([np.full(8, 0.5), p1]))
    for name, rule in k_select.RULES.items():
        assert k_select.crossfit(F, rule, 1, block=2) == pytest.approx(1.5 * math.log(2), abs=1e-6), name
    assert reproduce.prior.mixture_nll(F, [1.0, 0.0]) == pytest.approx(math.log(2))


def test_population_curve_uses_one_prior_fit_per_budget(monkeypatch):
    """Budget 2 holds members 0-1 (one 2 epochs in), budget 4 all three. Member 2 is perfect on fitness, so the
    prior at 4 is all on it; the matched curve (K <= 1) and the free one read the same fit, done once per budget."""
    rows = [dict(budget_epochs=2.0), dict(budget_epochs=2.0), dict(budget_epochs=4.0)]
    F = np.log(np.array([[0.5] * 8, [0.25] * 8, [1.0] * 8]))
    V = np.log(np.array([[0.5] * 8, [0.25] * 8, [0.125] * 8]))
    fits = []
    real = reproduce.prior.fit_em
    monkeypatch.setattr(reproduce.prior, "fit_em", lambda L, **kw: fits.append(len(L)) or real(L, **kw))
    priors = reproduce.budget_priors((rows, F, V))
    free = reproduce.population_curve((rows, F, V), priors)
    matched = reproduce.population_curve((rows, F, V), priors, max_k=1)
    assert fits == [2, 3]
    assert [b for b, *_ in free] == [2.0, 4.0]
    assert free[0][1] == pytest.approx(math.log(2), abs=1e-6)  # EM puts all weight on member 0 (p 0.5 > 0.25)
    assert free[0][2] == pytest.approx(-math.log(0.375))       # uniform over members 0-1
    assert free[1][1] == pytest.approx(math.log(8), abs=1e-6) and matched[1][1] == pytest.approx(math.log(8), abs=1e-6)
    assert free[1][2] == pytest.approx(-math.log((0.5 + 0.25 + 0.125) / 3))


def test_a_finished_run_is_extended_for_more_cycles_or_members_and_read_by_prefix(tmp_path, monkeypatch):
    import store
    store.write_json(dict(config=dict(mode="q0", num_cycles=4, ensemble_size=4),
                           resumes=[dict(keys=dict(num_cycles=[2, 4]), at="")]), tmp_path / "config.json", checked=True)
    assert reproduce.grows(tmp_path, dict(num_cycles=8)) and not reproduce.grows(tmp_path, dict(num_cycles=4))
    assert not reproduce.grows(tmp_path, dict(num_cycles=3, epochs=2.0)) and reproduce.grows(tmp_path, dict(ensemble_size=5))
    rows = [dict(name=f"t0-c00{c}", budget_epochs=2.0 * c) for c in (1, 2, 3, 4)]
    monkeypatch.setattr(store, "read_manifest", lambda run_dir: rows)
    monkeypatch.setattr(reproduce.scores, "open_scores", lambda run_dir, names, split: names)
    assert reproduce.members(tmp_path, budget=4.0) == (rows[:2], ["t0-c001", "t0-c002"], ["t0-c001", "t0-c002"])
    assert reproduce.members(tmp_path, first=3)[0] == rows[:3] and reproduce.members(tmp_path)[0] == rows


def test_a_run_being_extended_is_not_finished_until_it_is_scored(tmp_path, monkeypatch):
    """run() on a finished run that the flags extend drops its DONE before training: another process (the other half
    of a split budget) then waits for it instead of reading a manifest whose new members have no scores yet."""
    import store
    out, seen = tmp_path, []
    run_dir = out / "runs" / "q0-s1"
    store.write_json(dict(config=dict(mode="q0", num_cycles=2, ensemble_size=4)), run_dir / "config.json", checked=True)
    (run_dir / "DONE").write_text("1 s\n")
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **kw: seen.append((cmd[1], (run_dir / "DONE").exists())))
    assert reproduce.run("q0-s1", out, dict(mode="q0", num_cycles=4)) == run_dir
    assert [done for _, done in seen] == [False, False]  # neither the training nor the scoring saw a DONE
    assert (run_dir / "DONE").exists() and not (run_dir / "TRAINING").exists()
    # that extension killed half-way (no DONE), then a smaller budget asks for the run: it resumes to its own size
    seen.clear()
    store.write_json(dict(config=dict(mode="q0", num_cycles=8, ensemble_size=4)), run_dir / "config.json", checked=True)
    (run_dir / "DONE").unlink()
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    reproduce.run("q0-s1", out, dict(mode="q0", num_cycles=4))
    assert "--num_cycles=8" in seen[0] and "--resume=True" in seen[0] and "--num_cycles=4" not in seen[0]


def test_from_root_keeps_a_relative_path_pointing_at_the_same_folder_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (reproduce.ROOT / reproduce.from_root(Path("mine/out"))).resolve() == tmp_path.resolve() / "mine" / "out"
    assert reproduce.from_root(tmp_path / "x") == tmp_path / "x"  # absolute: unchanged
    monkeypatch.chdir(reproduce.ROOT)
    assert reproduce.from_root(Path("bench/out-pydoc")) == Path("bench/out-pydoc")  # as runs launched there recorded it


@pytest.mark.slow
def test_a_relative_out_means_the_folder_under_the_callers_working_directory(tmp_path):
    # the training subprocesses run in the repository root: --out relative to another directory must still be
    # that directory's folder, for them and for the report
    row = dict(members=16, fitness_crossfit=1.7001, val_prior=1.8, val_uniform=1.9, mean_member_val=2.0,
               best_member_val=1.95, last_member_val=1.96, late_member_val=1.97, diversity_gain=0.1,
               by_k=[[1, 1.9, 1.95]])
    (tmp_path / "mine" / "results").mkdir(parents=True)
    (tmp_path / "mine" / "results" / "steps-s1.json").write_text(json.dumps({"run-a": row}))
    r = subprocess.run([sys.executable, str(reproduce.ROOT / "bench" / "reproduce.py"), "--report", "--out", "mine"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| run-a | 16 | 1.7001 | 1.8000 |" in r.stdout


@pytest.mark.slow
def test_claim_keeps_a_live_trainer_and_takes_over_a_dead_ones(tmp_path):
    run_dir = tmp_path / "runs" / "q0-s1"
    assert reproduce.claim(run_dir) and (run_dir / "TRAINING").read_text() == str(os.getpid())
    assert reproduce.claim(run_dir)                      # ours already
    (run_dir / "TRAINING").write_text(str(os.getppid()))  # a live process (a parallel shard) holds it
    assert not reproduce.claim(run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "TRAINING").write_text(str(dead.pid))     # its trainer was killed: take it over
    assert reproduce.claim(run_dir) and (run_dir / "TRAINING").read_text() == str(os.getpid())


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_cpu():
    """bench/gpu_check.py is meant for the first CUDA machine; its dry run on CPU exercises every part but the
    flash check and the CUDA numbers, and prints the JSON a GPU run fills in."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--no_compile",
                           "--steps", "2", "--seq_len", "64", "--vocab", "320"], cwd=root, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layers"] == 2 and out["sdpa_flash"] == "n/a" and out["checkpoint"]["equal"] is True
    assert out["ms_per_step"] > 0 and out["distill_ratio"] > 0 and out["mfu"] is None  # timings: noisy on CPU


@pytest.mark.slow
def test_smoke_dry_run_kills_resumes_and_scores_on_two_gloo_processes(tmp_path):
    """bench/smoke.py --dry_run: the 1.8B smoke's stages on CPU (data, preflight, train, a SIGKILL of the torchrun job
    in cycle 2, the resume, eval.py --score under torchrun, the report), through the code path the GPU run takes."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/smoke.py", "--dry_run", "--out_dir", str(tmp_path / "run"),
                           "--data_dir", str(tmp_path / "data")], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["ok"], proc.stderr[-2000:]
    assert out["stages"] == dict.fromkeys(("data", "preflight", "train", "kill", "resume", "score", "report"), "pass")
    assert out["world_size"] == 2 and out["devices"] == ["cpu"] and out["eval_summary"]["members"] == "6 of 6"
    cycle = out["steps_per_track"] // 3  # killed inside cycle 2, after its first eval with a teacher
    assert all(cycle < s < 2 * cycle for s in out["killed"]["checkpoint_steps"].values())
    assert out["peak_mem_gb_max"] == {"t0": None, "t1": None} and out["memory_estimate_gb"]["peak_train"] > 0


# -----------------------------------------------------------------------------------------------------
# issue 36: data efficiency (bench/data_efficiency.py), the allocation grid (bench/allocations.py), the downstream
# task (bench/transfer.py)
sys.path.insert(0, str(reproduce.ROOT / "bench"))
CORPUS = reproduce.ROOT.parent / "shared" / "data" / "shakespeare"
real_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="the Shakespeare corpus is not at ../shared/data/shakespeare")


def prepare_like_reproduce(corpus, out, n):
    """prepare_data.py in-process, with the arguments reproduce.prepare() passes it, at n train bytes."""
    import io
    from contextlib import redirect_stdout
    import prepare_data
    with redirect_stdout(io.StringIO()):
        prepare_data.main(["--source", "files", "--files", str(corpus), "--tokenizer", "byte", "--out_dir", str(out),
                           f"--train_tokens={n}", f"--val_tokens={reproduce.val_tokens}",
                           f"--fitness_tokens={reproduce.fitness_tokens}",
                           f"--heldout_piece_tokens={reproduce.heldout_piece_tokens}"])
    return out


def synthetic_corpus(folder, docs=40, lines=400, seed=0):
    """docs .txt files of numbered lines of random words (every line unique): text no other document holds."""
    rng = np.random.default_rng(seed)
    words = ["when", "the", "king", "doth", "speak", "of", "love", "and", "war", "thou", "art", "my", "lord", "sweet"]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        body = [f"{' '.join(rng.choice(words, rng.integers(4, 9)))} {d}.{i}".capitalize() for i in range(lines)]
        (folder / f"doc{d:02d}.txt").write_text("TITLE\n\n" + "\n".join(body) + "\n")
    return folder


def assert_held_out_splits_do_not_move_with_n(corpus, tmp_path, ns):
    """val and fitness byte-identical (files and sha256) at every train size, and a smaller train a prefix of a larger."""
    dirs = [prepare_like_reproduce(corpus, tmp_path / f"data-N{n}", n) for n in ns]
    for split in ("val", "fitness"):
        assert len({(d / f"{split}.bin").read_bytes() for d in dirs}) == 1, split
        assert len({json.loads((d / f"{split}.json").read_text())["sha256"] for d in dirs}) == 1, split
    trains = [(d / "train.bin").read_bytes() for d in dirs]
    assert [len(t) // 2 for t in trains] == list(ns)  # uint16 tokens
    assert all(b.startswith(a) for a, b in zip(trains, trains[1:]))


def test_the_held_out_splits_are_the_same_bytes_for_every_train_size(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")  # ~40 x 14 KB: the pool (150K), then train
    assert_held_out_splits_do_not_move_with_n(corpus, tmp_path, (20_000, 40_000, 80_000))


@real_corpus
def test_the_held_out_splits_of_the_shakespeare_data_sets_do_not_move_with_n(tmp_path):
    assert_held_out_splits_do_not_move_with_n(CORPUS, tmp_path, (100_000, 200_000))


def test_data_efficiency_is_piecewise_linear_in_tokens_and_none_off_the_table():
    import eval as ev
    table = [(400, 1.7), (100, 2.0), (200, 1.8)]  # any order: read sorted by tokens
    eff = lambda loss: ev.data_efficiency(loss, table, 100)
    assert eff(2.0) == pytest.approx(1.0) and eff(1.7) == pytest.approx(4.0)  # at the points
    assert eff(1.9) == pytest.approx(1.5)   # half-way from 2.0 (100) to 1.8 (200): 150 tokens / 100 seen
    assert eff(1.75) == pytest.approx(3.0)  # half-way from 1.8 (200) to 1.7 (400): 300 tokens
    assert eff(2.1) is None and eff(1.69) is None  # worse than the first point, better than every point
    bumpy = [(100, 2.0), (200, 1.8), (400, 1.9), (800, 1.6)]  # the first point of the curve at the loss
    assert ev.data_efficiency(1.85, bumpy, 100) == pytest.approx(1.75)
    assert ev.data_efficiency(1.7, bumpy, 100) == pytest.approx((400 + 400 * 0.2 / 0.3) / 100)
    assert ev.data_efficiency(1.5, [(100, 1.5)], 50) == 2.0 and ev.data_efficiency(1.4, [(100, 1.5)], 50) is None
    for loss in (3.703, 3.5, 3.048, 2.95, 2.892):  # eval.py's FineWeb figure reads the same function
        assert ev.slowrun_efficiency(loss) == ev.data_efficiency(loss, ev.SLOWRUN_TABLE, 100e6)


def test_the_baseline_is_the_single_model_best_on_fitness_over_epochs_and_sizes(tmp_path, monkeypatch):
    import data_efficiency as de
    early = {1: (2.8, 2.8), 2: (2.5, 2.5), 4: (2.2, 2.2)}
    curve = lambda **points: {**early, **{int(E[1:]): p for E, p in points.items()}}  # E8=(val, fitness), ...
    runs = {  # (prefix, seed): {epochs: (val, fitness)}
        ("single", 1): curve(E8=(1.95, 1.93), E16=(1.93, 1.91), E32=(1.99, 1.97)),
        ("single-mini-N200000", 1): curve(E8=(1.85, 1.84)),  # unfinished: its longest is the best, 16 not yet trained
        ("single-mini-N400000", 1): {1: (2.2, 2.2), 2: (1.9, 1.88), 4: (1.80, 1.79), 8: (1.82, 1.81)},
        ("single-small-N400000", 1): {1: (2.0, 2.0), 2: (1.78, 1.785), 4: (1.7, 1.795)},  # best val, not best fitness
        ("single-mini-N800000", 1): curve(E2=(1.75, 1.74)), ("single-small-N800000", 1): curve(E2=(1.6, 1.6)),
        ("single-mini-N800000", 2): curve(E2=(1.76, 1.75)),
        ("single-mini-N1600000", 1): {1: (1.7, 1.7), 2: (1.6, 1.6)}}  # unfinished: 4 not trained
    monkeypatch.setattr(de, "measured", lambda out, seed, n, size: sorted(
        (E, v, f) for E, (v, f) in runs.get((de.prefix(n, size), seed), {}).items()))
    t = de.baseline_table(tmp_path, 1)
    assert list(t) == [100_000, 400_000, 800_000]  # 200K and 1.6M unfinished: not points of the curve
    assert (t[100_000]["epochs"], t[100_000]["val"]) == (16, 1.93)  # the headline's own singles
    assert (t[400_000]["size"], t[400_000]["epochs"], t[400_000]["val"]) == ("small", 2, 1.78)  # on fitness, not val
    assert t[800_000]["size"] == "small"
    t2 = de.baseline_table(tmp_path, 2)  # seed 2 has no small run: seed 1's stands in
    assert t2[800_000] == dict(size="small", epochs=2, val=1.6, fitness=1.6, seed=1)


def test_small_beyond_800k_and_on_a_second_seed_only_where_a_method_needs_it(tmp_path, monkeypatch):
    import data_efficiency as de
    row = lambda val, size="mini": dict(size=size, epochs=2, val=val, fitness=val, seed=1)
    table = {100_000: row(1.93), 200_000: row(1.83), 400_000: row(1.74, "small"), 800_000: row(1.66),
             1_600_000: row(1.60)}
    losses = {"q0": 1.78}  # between 200K and 400K
    monkeypatch.setattr(de, "baseline_table", lambda out, seed: table)
    monkeypatch.setattr(de, "method_losses", lambda out, seed: losses)
    assert de.need_small(tmp_path, 400_000, 1) and de.need_small(tmp_path, 800_000, 1)  # always, seed 1
    assert not de.need_small(tmp_path, 1_600_000, 1) and not de.need_small(tmp_path, 3_200_000, 1)
    assert de.need_small(tmp_path, 400_000, 2)  # small is the baseline at 400K, an end of q0's segment
    assert not de.need_small(tmp_path, 800_000, 2)
    losses["q0"] = 1.62  # below the 800K point: the 1.6M point bounds its segment
    assert de.need_small(tmp_path, 1_600_000, 1) and not de.need_small(tmp_path, 3_200_000, 1)
    assert not de.need_small(tmp_path, 400_000, 2)


def test_the_allocation_grid_spends_64_epochs_each_and_shares_the_headline_and_recipes_runs():
    import allocations as al
    g = al.grid(2)
    assert set(g) == {(P, c) for P in (1, 2) for c in (0.5, 1.0, 2.0, 4.0)}
    for (P, c), (name, flags) in g.items():
        assert P * c * flags["num_cycles"] == 64
        assert (flags["num_trajectories"], flags["epochs_per_cycle"]) == (P, c)
        assert flags["distill_after_cycles"] >= flags["num_cycles"]  # no chain distillation
        headline = reproduce.q0_flags(2, **reproduce.headline_flags())
        assert all(flags[k] == headline[k] for k in ("lr_floor", "wd_floor", "perturb_scale_start", "perturb_scale_end"))
    assert g[(1, 2.0)] == ("q0-s2", reproduce.q0_flags(2, **reproduce.headline_flags()))  # the headline's own run
    recipes = dict(reproduce.recipe_run(2, 16, e) for e in reproduce.recipe_grid(16))
    assert {g[(2, 2.0)][0], g[(1, 1.0)][0]} <= set(recipes)  # and the recipes suite's (BENCHMARKS 1g)
    assert recipes[g[(2, 2.0)][0]] == g[(2, 2.0)][1] and recipes[g[(1, 1.0)][0]] == g[(1, 1.0)][1]
    assert len({name for name, _ in g.values()}) == 8
    assert al.budgets == (2, 4, 8, 16, 32, 64)  # which allocations have a snapshot at each: P * c <= budget
    assert [sum(P * c <= b for P, c in g) for b in al.budgets] == [5, 7, 8, 8, 8, 8]


@real_corpus
def test_the_next_line_task_is_deterministic_and_built_from_text_no_split_ever_used(tmp_path):
    import transfer
    docs = transfer.unused_documents(CORPUS)  # runs prepare_data's fill at 3.2M train bytes: it fits (else UserError)
    items = transfer.build_items(docs)
    assert items == transfer.build_items(transfer.unused_documents(CORPUS))  # deterministic
    assert len(items) >= 1000 and len(items) == transfer.num_items
    # the documents: none of those the largest data set (3.2M train bytes) takes any byte of
    used = prepare_like_reproduce(CORPUS, tmp_path / "data", 100_000)  # (its held-out splits are every N's)
    names = {n for n, _ in docs}
    assert "winters_tale_gut.txt" not in names and "cymbeline_gut.txt" not in names  # 100K's train, the held-out pool
    text = {name: t for name, t in docs}
    split_bytes = b"".join((used / f"{s}.bin").read_bytes()[::2] for s in ("train", "fitness", "val"))  # byte tokens
    for item in items:
        line = item["choices"][item["label"]]
        full = text[item["doc"]]
        assert full[item["offset"] - 1 - transfer.context_bytes:item["offset"] + len(line)] == item["context"] + "\n" + line
        assert len(item["choices"]) == len(set(item["choices"])) == transfer.num_choices
        assert all(abs(len(c) - len(line)) <= transfer.length_tolerance * len(line) for c in item["choices"])
        assert all(c in full for c in item["choices"])  # distractors: lines of the same text
        assert item["context"].encode() not in split_bytes


def test_the_task_builder_draws_the_true_line_and_distractors_of_the_same_text(tmp_path):
    import transfer
    corpus = synthetic_corpus(tmp_path / "corpus", docs=3, lines=300)
    docs = [(p.name, p.read_text()) for p in sorted(corpus.glob("*.txt"))]
    items = transfer.build_items(docs, n=50, seed=3)
    assert items == transfer.build_items(docs, n=50, seed=3) and items != transfer.build_items(docs, n=50, seed=4)
    for item in items:
        line, doc = item["choices"][item["label"]], item["doc"].removeprefix("doc").removesuffix(".txt")
        assert dict(docs)[item["doc"]][item["offset"]:].startswith(line + "\n")
        assert all(c.endswith(f" {int(doc)}." + c.rsplit(".", 1)[1]) for c in item["choices"])  # all of that document
    assert {item["label"] for item in items} == set(range(transfer.num_choices))
    with pytest.raises(ValueError, match="only"):
        transfer.build_items(docs, n=10_000)


def test_the_lm_eval_adapter_averages_a_runs_first_k_members_uniformly(tmp_path):
    """weights=uniform (the naive ensemble's rule): the run's first K members in training order, weight 1/K each."""
    pytest.importorskip("lm_eval")
    import torch
    import config
    import eval as ev
    import store
    from test_tools import fake_run
    from tools import lm_eval_q0
    names, pj = fake_run(tmp_path / "run")  # 3 members and a prior.json
    weights_of = lambda model: model.state_dict()["embed.weight"]
    for k, want in (("2", names[:2]), ("all", names)):
        pairs, _ = lm_eval_q0.load_mixture(str(tmp_path / "run"), k, weights="uniform")
        assert [w for _, w in pairs] == [1 / len(want)] * len(want)
        files = [store.load_member(tmp_path / "run" / "members" / f"{n}.pt")[0] for n in want]
        assert all(torch.equal(weights_of(m), weights_of(f)) for (m, _), f in zip(pairs, files))
    pairs, _ = lm_eval_q0.load_mixture(str(tmp_path / "run"), "all")  # the prior's mixture of every member
    assert [w for _, w in pairs] == pytest.approx([w for _, w in ev.members_at(pj, len(names))])
    with pytest.raises(config.UserError, match="weights=best"):
        lm_eval_q0.load_mixture(str(tmp_path / "run"), 1, weights="best")


def test_the_allocation_pick_is_the_lowest_mean_over_the_seeds_measured_on_every_seed():
    import allocations as al
    # {(P, c): {seed: (cross-fitted fitness, val, members)}}: (2, 1) leads on seed 1 alone, (1, 2) on the mean
    table = {(1, 2.0): {1: (1.80, 0, 4), 2: (1.70, 0, 4)}, (2, 1.0): {1: (1.79, 0, 4), 2: (1.75, 0, 4)},
             (1, 0.5): {1: (1.50, 0, 4)}}  # one seed only: not a candidate for both, the pick of seed 1 alone
    assert al.rank(table, [1, 2]) == [(pytest.approx(1.75), (1, 2.0)), (pytest.approx(1.77), (2, 1.0))]
    assert [a for _, a in al.rank(table, [1])] == [(1, 0.5), (2, 1.0), (1, 2.0)]
    assert al.rank(table, [2])[0][1] == (1, 2.0)


def test_the_grids_picks_given_by_hand_size_the_distill_and_pydoc_runs(tmp_path):
    """--picks (the grid's report, its runs gone): the pick at each distill budget is distilled from E*, and on pydoc
    each budget's pick meets the headline's allocation, or the allocation named after it where the pick is the headline's."""
    import allocations as al
    ranking = al.given_picks(["8:1x4", "32:1x2", "64:1x2,1x4"])
    assert ranking == {8: [(None, (1, 4.0))], 32: [(None, (1, 2.0))], 64: [(None, (1, 2.0)), (None, (1, 4.0))]}
    assert al.pydoc_allocations(tmp_path, [1, 2], ranking) == {8: ((1, 4.0), (1, 2.0)), 64: ((1, 2.0), (1, 4.0))}
    reproduce.save(tmp_path, "headline", 1, {"best_single_epochs": 16})
    runs = al.distill_runs(tmp_path, [1, 2], 1, ranking)
    assert set(runs) == {(32, (1, 2.0)), (64, (1, 2.0))}  # 8 is not a distill budget
    name, flags = runs[(32, (1, 2.0))]
    assert name == "alloc-distill-P1-c2-b32-s1" and flags["num_cycles"] == 16
    assert flags["distill_after_cycles"] == 8 and flags["distill_alpha"] == 0.45  # E* = 16 epochs: half-way at 32
    assert runs[(64, (1, 2.0))][1]["distill_after_cycles"] == 8  # 16 epochs of 2-epoch cycles
    with pytest.raises(SystemExit, match="budget:PxC"):
        al.given_picks(["64=1x2"])
    with pytest.raises(SystemExit, match="name the one to compare"):  # the headline's pick alone: nothing to compare
        al.pydoc_allocations(tmp_path, [1, 2], al.given_picks(["64:1x2"]))


def test_the_allocation_report_sets_each_distilled_run_beside_the_undistilled_prefix(tmp_path, monkeypatch, capsys):
    import allocations as al
    rng = np.random.default_rng(0)
    F = np.log(rng.dirichlet(np.ones(3), size=4096).T)  # (3 members, 4,096 tokens) log-probs
    monkeypatch.setattr(al.rp, "finished", lambda out, name, **_: ([{}] * 3, F, F))
    monkeypatch.setattr(al, "scores", lambda out, seeds, b: {(1, 2.0): {s: (9.0, 8.0, 3) for s in seeds}})
    for name in ("alloc-distill-P1-c2-b32-s1", "alloc-distill-P1-c4-b64-s1", "alloc-distill-P1-c2-b64-s3"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    al.report(tmp_path, [1, 2])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| 32 | 1 x 2 | 1", "| 64 |"))]
    on_fit = f"{reproduce.crossfit_nll(F, reproduce.heldout_piece_tokens):.4f}"
    on_val = f"{al.prior.mixture_nll(F, al.prior.fit_em(F)[0]):.4f}"
    assert rows == [f"| 32 | 1 x 2 | 1 | 9.0000 / {on_fit} | 8.0000 / {on_val} |",  # seed 3: not asked for
                    f"| 64 | 1 x 4 | 1 | not run / {on_fit} | not run / {on_val} |"]  # no undistilled 1 x 4 run
