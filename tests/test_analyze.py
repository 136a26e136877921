"""Tests for bench/analyze.py: the diversity gain, the correlation and the same-track pairing against hand
computations on tiny arrays, then one end-to-end pass on a tiny real q0 run (1 trajectory x 3 cycles,
distillation from cycle 2: members 2 and 3 are distilled), scored by eval.py. A few seconds on 2 cores."""
import importlib.util
import io
import math
from contextlib import redirect_stdout

import numpy as np
import pytest

from conftest import ROOT, run_train, train_argv

spec = importlib.util.spec_from_file_location("analyze", ROOT / "bench" / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


# --- the maths, by hand ----------------------------------------------------------------------------------

def test_diversity_gain_of_identical_members_is_zero():
    L = np.log(np.random.default_rng(0).uniform(0.05, 1.0, size=50))
    assert analyze.diversity_gain(np.stack([L, L, L])) == pytest.approx(0.0, abs=1e-12)
    assert analyze.diversity_gain(np.stack([L, L]), w=[0.9, 0.1]) == pytest.approx(0.0, abs=1e-12)


def test_diversity_gain_of_two_members_matches_the_hand_value():
    # member 1 gives the two true tokens p = 1/2, 1/4; member 2 gives 1/4, 1/2: both have NLL (ln 2 + ln 4)/2
    L = np.log([[0.5, 0.25], [0.25, 0.5]])
    mean_member = 1.5 * math.log(2)
    # uniform: the mixture gives each token 3/8
    assert analyze.diversity_gain(L) == pytest.approx(mean_member + math.log(0.375), abs=1e-12)
    assert analyze.diversity_gain(L) == pytest.approx(0.0588915, abs=1e-6)
    # w = (3/4, 1/4): the mixture gives 7/16 and 5/16
    hand = mean_member + (math.log(7 / 16) + math.log(5 / 16)) / 2
    assert analyze.diversity_gain(L, w=[0.75, 0.25]) == pytest.approx(hand, abs=1e-12)
    assert analyze.diversity_gain(L, w=[3.0, 1.0]) == pytest.approx(hand, abs=1e-12)  # weights are renormalised
    # the last k members: a third, different member in front changes nothing for k = 2; k = 1 is one member
    L3 = np.vstack([np.log([[0.9, 0.01]]), L])
    assert analyze.diversity_gain(L3, k=2) == pytest.approx(mean_member + math.log(0.375), abs=1e-12)
    assert analyze.diversity_gain(L3, k=1) == pytest.approx(0.0, abs=1e-12)
    assert analyze.diversity_gain(L3) > 0  # Jensen


def test_correlation_with_an_affine_copy_is_one():
    a = np.random.default_rng(1).normal(size=100)
    assert analyze.pearson(a, 2.5 * a - 3.0) == pytest.approx(1.0, abs=1e-12)
    assert analyze.pearson(a, -0.5 * a + 1.0) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(analyze.pearson(a, np.full(100, -2.0)))  # a constant member: nothing to correlate


def row(track, cycle, teacher=None):
    return dict(name=f"t{track}-c{cycle:03d}", track=track, cycle=cycle, teacher=teacher)


def test_consecutive_pairing_picks_the_same_track_previous_cycle():
    # manifest order interleaves the tracks (sorted by budget, then track): the predecessor of t0-c002 is
    # t0-c001 (index 0), not the row just before it (t1-c001). t1-c002 is undistilled (its teacher is None).
    rows = [row(0, 1), row(1, 1), row(0, 2, "t0-c001"), row(1, 2), row(0, 3, "t0-c002"), row(2, 5)]
    assert analyze.previous_snapshot(rows) == {2: 0, 3: 1, 4: 2}  # a track's first snapshot has none
    rng = np.random.default_rng(2)
    a, b = -rng.uniform(size=64), -rng.uniform(size=64)
    L = np.stack([a, b, 0.5 * a - 0.1, 2.0 - b, a, b])  # r = 1 (t0), -1 (t1), 1 (t0) with the right partner
    c = analyze.consecutive_correlation(L, rows)
    assert {i: j for i, (j, _) in c["per_member"].items()} == {2: 0, 3: 1, 4: 2}
    assert c["distilled"] == pytest.approx(1.0) and c["n_distilled"] == 2
    assert c["undistilled"] == pytest.approx(-1.0) and c["n_undistilled"] == 1
    assert analyze.last_of_each_track(rows) == ["t0-c003", "t1-c002", "t2-c005"]
    only_first = analyze.consecutive_correlation(L[:2], rows[:2])  # no pairs at all: nan, shown as "–"
    assert math.isnan(only_first["distilled"]) and only_first["n_distilled"] == 0
    assert analyze.fmt(only_first["undistilled"]) == "–"


# --- end to end on a tiny real run -----------------------------------------------------------------------

@pytest.mark.slow
def test_tables_on_a_tiny_distilled_run(tiny_data, tmp_path):
    import eval as ev
    run = tmp_path / "run"
    code, out, err = run_train(train_argv(tiny_data, run, mode="q0", num_trajectories=1, num_cycles=3,
                                          epochs_per_cycle=0.125, distill_after_cycles=1, eval_every_epochs=0,
                                          ckpt_every_epochs=0, log_every=1000, dropout=0.1))
    assert code == 0, err[-2000:]
    with pytest.raises(FileNotFoundError, match="--score"):  # not scored yet: the error names the fix
        analyze.member_table(run)
    with redirect_stdout(io.StringIO()):
        ev.main([str(run), "--score"])

    members = analyze.member_table(run)
    assert [m["name"] for m in members] == ["t0-c001", "t0-c002", "t0-c003"]
    assert [m["distilled"] for m in members] == [False, True, True]
    assert [m["teacher"] for m in members] == [None, "t0-c001", "t0-c002"]
    assert all(np.isfinite([m["val"], m["fitness"]]).all() for m in members)
    assert math.isnan(members[0]["corr_prev"]) and all(-1 <= m["corr_prev"] <= 1 for m in members[1:])

    s = analyze.run_summary(run, k=2)
    assert (s["members"], s["n_distilled"]) == (3, 2)
    assert s["distilled_val"] == pytest.approx((members[1]["val"] + members[2]["val"]) / 2)
    assert s["undistilled_val"] == pytest.approx(members[0]["val"])
    assert math.isnan(s["corr_undistilled"])  # the only undistilled member is a track's first: no predecessor
    assert s["gain"] >= 0 and s["gain_last_k"] >= 0
    assert s["uniform_val"] == pytest.approx(s["mean_val"] - s["gain"], abs=1e-9)  # the decomposition
    assert all(math.isfinite(s[k]) for k in ("mean_val", "best_val", "distilled_val", "corr_distilled", "prior_val"))

    # --budgets: the population at each budget (cycle c ends at 0.125 c epochs); one member: no gain, its own val
    first, whole = analyze.by_budget(run, [0.125, 0.375])
    assert (first["members"], whole["members"]) == (1, 3)
    assert first["prior_val"] == pytest.approx(members[0]["val"], abs=1e-9) and first["gain"] == pytest.approx(0, abs=1e-12)
    assert whole["prior_val"] == pytest.approx(s["prior_val"], abs=1e-9)  # the same EM fit as run_summary's
    for r in (first, whole):
        assert r["prior_val"] == pytest.approx(r["weighted_member"] - r["gain"], abs=1e-9) and r["gain"] >= 0
    assert whole["best_on_fitness"] == pytest.approx(min(members, key=lambda m: m["fitness"])["val"], abs=1e-9)

    buf = io.StringIO()
    with redirect_stdout(buf):
        analyze.main([str(run), str(run), "--train_tokens", "256"])
    text = buf.getvalue()
    lines = text.splitlines()
    assert lines.count(f"### {run}") == 2
    assert sum(line.startswith("| t0-c00") for line in lines) == 2 * 3  # a member table per run argument
    assert sum(line.startswith("| run | 3 (2) | ") for line in lines) == 2  # a comparison row per run
    assert "nan" not in text
    train_rows = [line.split(" | ") for line in text.splitlines() if "| t0-c003 | t0-c002 | 256 |" in line]
    assert len(train_rows) == 2 and all(math.isfinite(float(c.strip(" |"))) for r in train_rows for c in r[4:])
    # the train scores are cached beside, never inside, scores/ (which holds exactly fitness + val per member)
    [cached] = list((run / "analysis").glob("*.npy"))  # and its .sha256 beside it
    assert cached.name.startswith("t0-c003.train-") and np.load(cached).shape == (256,)
    assert len(list((run / "scores").glob("*.npy"))) == 2 * 3
    # a second call reads the cache (same length, file untouched); another token count rescores
    mtime, before = cached.stat().st_mtime_ns, float(train_rows[0][4])
    again = analyze.train_vs_heldout(run, ["t0-c003"], 256)
    assert cached.stat().st_mtime_ns == mtime and again[0]["train"] == pytest.approx(before, abs=1e-4)
    assert again[0]["gap"] == pytest.approx(again[0]["val"] - again[0]["train"])
    analyze.train_vs_heldout(run, ["t0-c003"], 128)
    assert np.load(cached).shape == (128,)
    # does fitness predict val across members: the run's own fitness split, and another folder's (here the same
    # data: it must then agree with the run's own, member for member)
    own, other = analyze.fitness_predicts_val(run, tiny_data)
    assert own["members"] == 3 and -1 <= own["pearson"] <= 1 and 1 <= own["rank_of_fitness_best"] <= 3
    assert other["spearman"] == pytest.approx(own["spearman"]) and other["pearson"] == pytest.approx(own["pearson"], abs=1e-3)

    # --dropout_gap: dropout off is how eval.py scores (its cached val scores, the same windows); on differs from it
    [gap] = analyze.dropout_gap(run, ["t0-c003"], 256)
    assert gap["off"] == pytest.approx(-analyze.scores.open_scores(run, ["t0-c003"], "val")[0][:256].mean(), abs=1e-5)
    assert gap["on"] != gap["off"] and gap["first"] != gap["off"] and math.isfinite(gap["on"] + gap["first"])
    assert gap["gap"] == pytest.approx(gap["off"] - gap["on"])
    assert analyze.dropout_gap(run, ["t0-c003"], 256) == [gap]  # each draw is seeded: the same numbers again
