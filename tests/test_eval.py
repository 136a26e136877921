"""eval.py and tools/: cached-array ensembles against direct forward passes, resumable scoring, reports, downstream
(tools/downstream.py), sampling and logit averaging (tools/sample.py) and bad input. Hermetic (no network) and
small: one tiny q0 run (2 trajectories x 2 cycles, seq_len 32, ~1K-token fitness and val) trained once per session
in a few seconds."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import scores  # noqa: E402
import store  # noqa: E402
import eval as ev  # noqa: E402
import prepare_data  # noqa: E402
import prior  # noqa: E402
from test_prior import synthetic_population, without_timings  # noqa: E402
import q0  # noqa: E402
from tools import downstream as ds, sample as ts  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "mc_tiny.jsonl"
CPU = dict(world=1, rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on 2 shared cores: one thread is ~20x faster than fighting for both."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import socket
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


TINY_Q0 = ["--mode=q0", "--model_size=tiny", "--seq_len=32", "--batch_tokens=512", "--micro_batch_size=16",
           "--num_trajectories=2", "--num_cycles=2", "--epochs_per_cycle=1", "--distill_after_cycles=1",
           "--eval_every_epochs=0", "--ckpt_every_epochs=0", "--log_every=1000"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("eval")
    prepare_data.main(["--out_dir", str(base / "data"), "--val_tokens", "1024", "--fitness_tokens", "1024",
                       "--train_tokens", "8192"])
    q0.main([f"--out_dir={base / 'run'}", f"--data_dir={base / 'data'}", *TINY_Q0])
    return base / "run"


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """A copy of the run after the default action of the CLI: (run folder, report dict, printed text)."""
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(tiny_run, run_dir)
    return run_dir, *run_cli([str(run_dir)])


def prior_json(run_dir):
    return json.loads((Path(run_dir) / "prior.json").read_text())


def run_cli(argv):
    """eval.main in-process (no second torch import), returning (first report, stdout)."""
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        reps = ev.main(argv)
    return (reps[0] if reps else None), buf.getvalue()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def test_cached_mixture_equals_direct_forward(evaluated):
    """prior.mixture_nll on the score files == -mean log sum_i w_i softmax(z_i)[y] from the models directly."""
    run_dir, rep, _ = evaluated
    run = ev.open_run(run_dir)
    names, w = run["names"][:3], np.array([0.5, 0.3, 0.2])
    cached = prior.mixture_nll(scores.open_scores(run_dir, names, "val"), w)
    models = [store.load_member(run_dir / "members" / f"{n}.pt")[0] for n in names]
    tokens, total, n = run["val"]["tokens"], 0.0, 0
    with torch.no_grad():
        for s, e in scores.eval_windows(tokens, run["seq_len"]):
            x = torch.from_numpy(tokens[s:e].astype(np.int64))[None]  # (1, T+1)
            p = sum(wi * torch.softmax(m(x[:, :-1]).double(), -1) for wi, m in zip(w, models))  # (1, T, V)
            total -= p.gather(-1, x[:, 1:, None]).log().sum().item()
            n += e - s - 1
    assert n == run["val"]["n"] == len(np.load(scores.score_path(run_dir, names[0], "val")))
    assert cached == pytest.approx(total / n, abs=2e-6)
    # and each member's loss in the report is its own mean -log p
    direct = {m["name"]: m["val"] for m in rep["members"]}
    assert direct[names[0]] == pytest.approx(prior.mixture_nll(scores.open_scores(run_dir, names[:1], "val"), [1.0]), abs=1e-9)


def test_scoring_resumes(run_copy):
    run = ev.open_run(run_copy)
    names = run["names"]
    assert ev.score_run(run, CPU) == dict(scored=names, skipped=[])
    files = sorted((run_copy / "scores").glob("*.npy"))
    assert len(files) == 2 * len(names)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert ev.score_run(run, CPU) == dict(scored=[], skipped=names)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # delete one, truncate another (as a kill mid-copy would): only those are recomputed, with the same values
    gone, cut = scores.score_path(run_copy, names[1], "val"), scores.score_path(run_copy, names[2], "fitness")
    before = {p: np.load(p) for p in (gone, cut)}
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[:100])
    assert ev.score_run(ev.open_run(run_copy), CPU) == dict(scored=[names[1], names[2]], skipped=[names[0], names[3]])
    for p, a in before.items():
        np.testing.assert_array_equal(np.load(p), a)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p not in before)
    # a different cap is a different set of positions: everything is rescored, and the length says so
    capped = ev.open_run(run_copy, max_tokens=300)
    assert ev.score_run(capped, CPU, out_dtype="float16")["scored"] == names
    a = np.load(scores.score_path(run_copy, names[0], "val"))
    assert a.dtype == np.float16 and a.shape == (capped["val"]["n"],) and capped["val"]["n"] == 300


def test_end_to_end_reports(evaluated):
    run_dir, rep, out = evaluated
    for heading in ("member       track cycle budget  fitness      val   weight", "      prior | uniform last-K | greedy, uniform",
                    "uniform over all 4", "val loss against epoch budget"):
        assert heading in out
    assert "Slowrun" not in out  # byte-tokenized pydoc: not the Slowrun setting
    saved = json.loads((run_dir / "eval.json").read_text())
    for key in ("members", "ensemble", "budget_curve", "best_member", "eval_tokens", "num_tokens", "weights", "summary"):
        assert key in saved
    assert [m["name"] for m in saved["members"]] == [r["name"] for r in store.read_manifest(run_dir)]
    e = saved["ensemble"]
    assert e["ks"] == [1, 2, 4] and set(e["prior"]) == set(e["uniform_last"]) == set(e["greedy"]) == {"1", "2", "4"}
    assert np.isfinite(e["uniform_all"])
    budgets = sorted({r["budget_epochs"] for r in store.read_manifest(run_dir)})
    assert [c["budget_epochs"] for c in saved["budget_curve"]] == budgets == [2.0, 4.0]
    assert saved["budget_curve"][-1]["prior_val"] == pytest.approx(e["prior"]["4"], abs=1e-6)  # all members: same fit
    pj = json.loads((run_dir / "prior.json").read_text())
    assert set(pj["weights"]) == {m["name"] for m in saved["members"]} and set(pj["per_k"]) == {"1", "2", "4"}
    try:
        import matplotlib  # noqa: F401  optional, not in requirements.txt
    except ImportError:
        assert not (run_dir / "eval.png").exists() and "no eval.png" in out
    # the comparison table of several runs
    _, cmp_out = run_cli([str(run_dir), str(run_dir), "--out", str(run_dir.parent / "cmp")])
    assert "best member val | uniform val | prior val" in cmp_out
    assert len(json.loads((run_dir.parent / "cmp" / "compare.json").read_text())) == 2


def test_eval_keeps_a_current_prior_json(run_copy, capsys):
    """eval.py is the one writer of prior.json: it reports with a current prior.json as it is (here AdamW's) and says
    so; it refits (and rewrites) only when asked for another method or when the file is stale."""
    run_cli([str(run_copy), "--method", "adamw"])
    written = (run_copy / "prior.json").read_bytes()
    rep, out = run_cli([str(run_copy)])
    assert (run_copy / "prior.json").read_bytes() == written  # not rewritten
    assert rep["prior_method"] == "adamw" and rep["prior_refit"] is None
    assert rep["weights"] == json.loads(written)["weights"]
    assert "prior: adamw weights, read from prior.json" in out and "wrote" in out and "prior.json, " not in out
    k_all = rep["ensemble"]["ks"][-1]
    assert rep["budget_curve"][-1]["prior_val"] == pytest.approx(rep["ensemble"]["prior"][k_all], abs=1e-9)  # AdamW too
    rep, out = run_cli([str(run_copy), "--method", "em"])  # another method asked for: refit with it
    assert rep["prior_method"] == "em" and "adamw weights" in rep["prior_refit"]
    assert json.loads((run_copy / "prior.json").read_text())["method"] == "em" and "fitted and written" in out
    names = rep["members"][0]["name"], rep["members"][1]["name"]
    # a sub-population's prior.json: stale for the whole run
    ev.write_prior(run_copy / "prior.json", list(names), scores.open_scores(run_copy, list(names), "fitness"))
    rep, out = run_cli([str(run_copy)])
    assert "other members" in rep["prior_refit"] and set(rep["weights"]) == {m["name"] for m in rep["members"]}
    capsys.readouterr()

def test_warm_started_budget_curve_equals_cold(evaluated):
    """On a real run's scores: the budget curve warm-started from the previous budget's weights gives the cold
    (uniform-start) curve's val losses within 1e-6 nats, at every population size (3 of the 4 points warm)."""
    run = ev.open_run(evaluated[0])
    P, L_val = scores.as_probs(ev.run_scores(run, "fitness"), hold=True), ev.run_scores(run, "val")
    sizes = list(range(1, len(P) + 1))
    val = lambda ws: prior.mixture_nlls(L_val, [np.pad(w, (0, len(P) - len(w))) for w in ws])
    warm, cold = ev.budget_curve(P, sizes, "em", warm=True), ev.budget_curve(P, sizes, "em", warm=False)
    assert not np.array_equal(warm[-1], cold[-1])  # different starts, so different points near the optimum
    np.testing.assert_allclose(val(warm), val(cold), rtol=0, atol=1e-6)


def test_curve_budgets_every_one_small_log_spaced_large():
    assert ev.curve_budgets([2.0, 4.0]) == [2.0, 4.0] and ev.curve_budgets(list(range(32))) == list(range(32))
    picked = ev.curve_budgets([2.0 * (i + 1) for i in range(96)])  # the target: 96 cycles
    assert 16 <= len(picked) <= 25 and picked[0] == 2.0 and picked[-1] == 192.0 and picked == sorted(set(picked))


def test_device_cpu_keeps_the_prior_off_a_gpu(run_copy, monkeypatch):
    """--device=cpu on a machine with CUDA: the prior's maths runs in numpy (backend auto follows eval.py's own
    device; here, where CUDA is only pretended, a CUDA tensor would fail in torch). The backend is eval.py's key,
    carried by the scores it opens: nothing is set from outside."""
    assert scores.backend_device("auto", torch.device("cpu")) is None
    assert scores.backend_device("auto", torch.device("cuda:1")) == torch.device("cuda:1")
    assert scores.backend_device("numpy", torch.device("cuda:1")) is None and scores.backend_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    real = scores.open_scores
    monkeypatch.setattr(scores, "open_scores", lambda *a, **k: seen.append(a[3:] or k.get("device")) or real(*a, **k))
    ev.main([str(run_copy), "--device=cpu"])
    assert seen and all(d in ((None,), None) for d in seen) and (run_copy / "prior.json").exists()


def test_compare_adamw_only_when_asked(run_copy):
    rep, out = run_cli([str(run_copy)])
    assert set(prior_json(run_copy)["compare"]) == {"em"} and "prior fits compared" not in out
    assert "prior fit | em |" in out and "val mixtures |" in out and "budget curve |" in out  # the progress lines
    rep, out = run_cli([str(run_copy), "--compare_adamw"])  # a current prior.json without AdamW: refit with it
    assert "--compare_adamw" in rep["prior_refit"] and set(prior_json(run_copy)["compare"]) == {"em", "adamw"}
    assert "prior fits compared on fitness: em objective" in out and rep["prior_method"] == "em"
    rep, _ = run_cli([str(run_copy)])  # a prior.json with more than asked is current
    assert rep["prior_refit"] is None


def test_slowrun_efficiency_matches_the_method_file():
    assert ev.slowrun_efficiency(3.048) == pytest.approx(9.95, abs=0.05)  # "about 10x"
    assert ev.slowrun_efficiency(3.003) == pytest.approx(12.8, abs=0.05)
    assert ev.slowrun_efficiency(3.2) == pytest.approx(6.0) and ev.slowrun_efficiency(2.5) is None
    assert ev.is_slowrun(dict(tokenizer="gpt2", source="fineweb", source_detail="HuggingFaceFW/fineweb/sample-10BT"))
    assert not ev.is_slowrun(dict(tokenizer="byte", source="fineweb", source_detail=""))


def test_downstream_local_fixture(evaluated):
    run_dir, rep, _ = evaluated
    res = ds.downstream(ev.open_run(run_dir), prior_json(run_dir), rep["best_member"]["name"], str(FIXTURE),
                        torch.device("cpu"))
    assert res["questions"] == 8
    assert set(res["results"]) == {f"best member {rep['best_member']['name']}", "prior K=1", "prior K=2", "prior K=4"}
    for r in res["results"].values():
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    # a mixture of one is that member alone
    if max(rep["weights"], key=rep["weights"].get) == rep["best_member"]["name"]:
        assert res["results"]["prior K=1"] == res["results"][f"best member {rep['best_member']['name']}"]


def test_choice_logprobs_padding_truncation_and_by_hand(evaluated):
    run_dir, rep, _ = evaluated
    run = ev.open_run(run_dir)
    tok = prepare_data.tokenizer_for_meta(run["val"]["meta"])
    qs = ds.read_questions(str(FIXTURE))
    seqs, n_cont, chars, first = ds.choice_sequences(qs, tok, run["seq_len"])
    assert len(seqs) == sum(len(q["choices"]) for q in qs) and max(map(len, seqs)) == run["seq_len"] + 1  # truncated
    assert all(seqs[f][0] == tok.bos_id for f, q in zip(first, qs) if len(q["context"]) < 20)  # short ones keep BOS
    model = store.load_member(run_dir / "members" / f"{run['names'][-1]}.pt")[0]
    batched = ds.continuation_logprobs(model, seqs, n_cont, torch.device("cpu"), size=16)
    alone = ds.continuation_logprobs(model, seqs, n_cont, torch.device("cpu"), size=1)
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # right padding changes nothing
    ids = [tok.bos_id] + tok.encode("The sun rises in the west.")  # question 0, choice 0
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]  # (T, V)
    n = len(tok.encode(" west."))
    by_hand = sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1 - n, len(ids) - 1))
    # acc_norm divides by len(choice), as lm-eval does: without the space put before the choice
    assert n_cont[0] == n and chars[0] == len("west.") and batched[:n].sum() == pytest.approx(by_hand, abs=1e-4)


def test_hub_benchmarks_normalise_to_the_local_schema(monkeypatch):
    """The hub loaders, fed one row of each dataset's own schema (no download): lm-eval's zero-shot prompts."""
    datasets = pytest.importorskip("datasets")
    rows = {"Rowan/hellaswag": [dict(activity_label="Baking", ctx_a="A man mixes flour.", ctx_b="he",
                                     endings=["bakes [title] bread.", "sings [step] loudly.", "x", "y"], label="1")],
            "allenai/ai2_arc": [dict(question="What is H2O?", choices=dict(text=["salt", "water"], label=["A", "B"]),
                                     answerKey="B")],
            "baber/piqa": [dict(goal="Open a jar", sol1="twist the lid", sol2="eat the lid", label=0)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None, split=None: rows[path])
    assert ds.read_questions("hellaswag") == [dict(context="Baking: A man mixes flour. He",
                                                   choices=["bakes. bread.", "sings loudly.", "x", "y"], label=1)]
    for name in ("arc_easy", "arc_challenge"):
        assert ds.read_questions(name) == [dict(context="Question: What is H2O?\nAnswer:", choices=["salt", "water"], label=1)]
    assert ds.read_questions("piqa") == [dict(context="Question: Open a jar\nAnswer:",
                                              choices=["twist the lid", "eat the lid"], label=0)]


def test_sample_length_and_seed(evaluated):
    run_dir, rep, _ = evaluated
    run = ev.open_run(run_dir)
    text, ids = ts.sample(run, prior_json(run_dir), "The ", 2, torch.device("cpu"), new_tokens=23, seed=3)
    assert isinstance(text, str) and len(ids) == 23
    assert ts.sample(run, prior_json(run_dir), "The ", 2, torch.device("cpu"), new_tokens=23, seed=3)[1] == ids


def test_logit_average_k1_is_the_member(evaluated):
    run_dir, rep, _ = evaluated
    la = ts.logit_average(ev.open_run(run_dir), prior_json(run_dir), 1, torch.device("cpu"))
    member = next(m for m in rep["members"] if m["name"] == la["members"][0])
    assert la["weights"] == [1.0]
    assert la["logit_avg_val"] == pytest.approx(member["val"], abs=1e-5)
    assert la["prob_avg_val"] == pytest.approx(member["val"], abs=1e-9)


def test_bad_input_is_one_clear_message(run_copy, tmp_path, capsys):
    def fails(argv, *needles):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
    fails([str(tmp_path / "nope")], "nope", "not found", "q0.py")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "config.json", "missing")
    shutil.copy(run_copy / "config.json", tmp_path / "empty" / "config.json")
    fails([str(tmp_path / "empty")], "no members", "train")
    cfg = store.load_json(run_copy / "config.json")
    moved = dict(cfg, config=dict(cfg["config"], data_dir=str(tmp_path / "gone")))
    store.write_json(moved, run_copy / "config.json", checked=True)  # as if it had been trained on data now gone
    fails([str(run_copy)], str(tmp_path / "gone" / "fitness.json"), "prepare_data.py")
    store.write_json(cfg, run_copy / "config.json", checked=True)
    member = run_copy / "members" / f"{store.read_manifest(run_copy)[0]['name']}.pt"
    member.write_bytes(member.read_bytes()[:1000])
    fails([str(run_copy), "--score"], str(member), "truncated")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    with pytest.raises(config.UserError, match="bad.jsonl:1"):
        ds.read_questions(str(bad))


# --- prior.json: one writer, kept while current ------------------------------------

def test_write_prior_atomic_and_repeatable(tmp_path, monkeypatch):
    L, _ = synthetic_population(3_000, seed=2)
    out = tmp_path / "prior.json"
    ev.write_prior(out, ["a", "b", "c"], L)
    first = json.loads(out.read_text())
    ev.write_prior(out, ["a", "b", "c"], L)
    second = json.loads(out.read_text())
    assert without_timings(first) == without_timings(second)  # everything but wall-clock time
    assert os.listdir(tmp_path) == ["prior.json"]  # no temp file left behind

    def write_then_die(obj, path):  # a fit killed half-way through writing its file

        def half(f):
            f.write(b'{"method": "em", "wei')
            raise KeyboardInterrupt
        store.atomic_write(path, half)
    monkeypatch.setattr(store, "write_json", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ev.write_prior(out, ["a", "b", "c"], L)
    assert json.loads(out.read_text()) == second  # the old file, whole
    assert os.listdir(tmp_path) == ["prior.json"]


def test_current_prior_keeps_a_current_file_and_refits_a_stale_one(tmp_path):
    L, _ = synthetic_population(2_000, seed=8)
    names = ["a", "b", "c"]
    pj, why = ev.current_prior(tmp_path, names, L)
    assert why and "no readable" in why and pj["method"] == "em"
    first = (tmp_path / "prior.json").read_bytes()
    ev.write_prior(tmp_path / "prior.json", names, L, "adamw")  # what `eval.py RUN --method adamw` does
    adamw = (tmp_path / "prior.json").read_bytes()
    assert adamw != first
    pj, why = ev.current_prior(tmp_path, names, L)  # no method asked: the file as it is
    assert why is None and pj["method"] == "adamw" and (tmp_path / "prior.json").read_bytes() == adamw
    assert ev.current_prior(tmp_path, names, L, "adamw")[1] is None
    pj, why = ev.current_prior(tmp_path, names, L, "em")  # another method asked for: refit with it
    assert "adamw weights" in why and pj["method"] == "em"
    pj, why = ev.current_prior(tmp_path, names[:2], L[:2])  # a member fewer
    assert "other members" in why and pj["members"] == names[:2]
    ev.current_prior(tmp_path, names, L)
    pj, why = ev.current_prior(tmp_path, names, L - 0.01)  # rescored: same members, other numbers
    assert "scores changed" in why and ev.current_prior(tmp_path, names, L - 0.01)[1] is None
    pj, why = ev.current_prior(tmp_path, names, L[:, :1_000])  # rescored on fewer tokens
    assert "scores changed" in why and pj["num_tokens"] == 1_000


# --- faults on the eval side (issue 29): injected from outside, then the message's fix -------------------------

def retrain(run_dir, name, scale=1.05):
    """What retraining a member does to its file, from outside: other weights, saved by store.save_torch (a valid
    sha256 inside, a new one)."""
    path = Path(run_dir) / "members" / f"{name}.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.pop("sha256")
    ckpt["model"] = {k: v * scale if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    store.save_torch(ckpt, path)
    return path


def member_val(run_dir, name):
    """-mean log p of the member file as it is now on the val split: what eval.py must report for it."""
    run = ev.open_run(run_dir)
    model = store.load_member(Path(run_dir) / "members" / f"{name}.pt")[0]
    return float(-ev.score_split(model, run["val"], torch.device("cpu")).astype(np.float64).mean())


def test_a_retrained_member_is_rescored_and_the_prior_refit(evaluated, tmp_path, fault):
    row = fault("member file retrained after scoring", "eval.py RUN on a scored run with prior.json")
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    pj = prior_json(run_dir)
    name = next(n for n in pj["members"] if n != pj["per_k"]["1"]["members"][0])  # the old K=1 check misses it
    before = {m["name"]: m["val"] for m in evaluated[1]["members"]}
    retrain(run_dir, name)
    rep, out = run_cli([str(run_dir)])
    assert f"member {name}: cached scores not used, {run_dir / 'members' / (name + '.pt')} changed since" in out
    assert "4 members, 3 already scored, 1 to score" in out
    got = {m["name"]: m["val"] for m in rep["members"]}
    assert got[name] == pytest.approx(member_val(run_dir, name), abs=1e-6) and abs(got[name] - before[name]) > 1e-4
    assert all(got[n] == before[n] for n in got if n != name)  # the others came from the cache, unchanged
    assert rep["prior_refit"] == f"member(s) {name} changed since prior.json was fit"
    assert prior_json(run_dir)["member_sha256"][name] == torch.load(run_dir / "members" / f"{name}.pt",
                                                                     weights_only=True, mmap=True)["sha256"]
    rep, out = run_cli([str(run_dir)])  # the fix is the same command: now everything is current
    assert "0 to score" in out and rep["prior_refit"] is None and {m["name"]: m["val"] for m in rep["members"]} == got
    scores.record_path(run_dir, name).unlink()  # the record gone: its scores are not trusted
    rep, out = run_cli([str(run_dir)])
    assert "3 already scored, 1 to score" in out and {m["name"]: m["val"] for m in rep["members"]} == got
    row.trials, row.result = 2, "named, rescored (val = a direct forward of the new file); prior refit, naming it"


@pytest.mark.parametrize("where", ["per_k", "weights"])
def test_a_prior_json_changed_on_disk_is_refit_not_reported(evaluated, tmp_path, fault, where):
    """One digit changed in prior.json: the first decimal of the K=2 entry's first weight (what q0.py's student
    reads) or of the heaviest member's weight (the K = all mixture and the budget curve's last point)."""
    row = fault("one digit of prior.json changed on disk", f"prior.json {where}")
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    pj, text = prior_json(run_dir), (run_dir / "prior.json").read_text()
    value = repr(pj["per_k"]["2"]["weights"][0] if where == "per_k" else max(pj["weights"].values()))
    at = text.index(value, text.index('"per_k"' if where == "per_k" else '"weights"'))  # that entry, not a copy
    assert value.startswith("0.")
    (run_dir / "prior.json").write_text(f"{text[:at + 2]}{(int(value[2]) + 1) % 10}{text[at + 3:]}")
    rep, out = run_cli([str(run_dir)])
    assert "fitted and written to prior.json (prior.json changed on disk since eval.py wrote it" in out
    assert rep["ensemble"] == evaluated[1]["ensemble"] and rep["weights"] == evaluated[1]["weights"]  # clean numbers
    assert prior_json(run_dir)["per_k"] == prior_json(evaluated[0])["per_k"]
    rep, out = run_cli([str(run_dir)])  # rewritten whole: kept from now on
    assert rep["prior_refit"] is None and "read from prior.json" in out
    row.trials, row.result = 1, "refit with one line saying prior.json changed on disk; the clean run's numbers"


def test_a_member_with_nan_weights_and_a_valid_checksum_is_named_and_excludable(evaluated, tmp_path, fault, capsys,
                                                                                 monkeypatch):
    row = fault("member saved with a NaN weight (valid sha256)", "eval.py --score on a scored run; --exclude")
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    name = evaluated[1]["members"][1]["name"]
    path = run_dir / "members" / f"{name}.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.pop("sha256")
    key = next(k for k, v in ckpt["model"].items() if v.dim() == 2)
    ckpt["model"][key][0, 0] = float("nan")
    store.save_torch(ckpt, path)  # saved so: its sha256 matches
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_dir), "--score"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"member file {path} holds non-finite weights (1 of" in err and f"the first {key}" in err
    assert f"--exclude {name}`" in err and "retrain" not in err
    for p in (run_dir / "scores").glob("*.npy"):
        assert np.isfinite(np.load(p)).all(), p  # no NaN score file; the old scores of it stay unused
    rep, out = run_cli([str(run_dir), "--exclude", name])  # the fix it names
    assert rep["num_members"] == 3 and name not in rep["weights"] and np.isfinite(rep["summary"]["prior_val"])
    assert {m["name"]: m["val"] for m in rep["members"]} == {m["name"]: m["val"] for m in evaluated[1]["members"]
                                                             if m["name"] != name}
    # finite weights whose log-probs are not (an overflow on the device, say): refused before anything is written
    shutil.rmtree(run_dir / "scores")
    monkeypatch.setattr(scores, "score_windows", lambda model, tokens, windows, *rest: torch.full(
        (sum(e - s - 1 for s, e in windows),), float("nan")))
    with pytest.raises(SystemExit):
        ev.main([str(run_dir), "--score", "--exclude", name])
    err = capsys.readouterr().err
    assert "gives non-finite log-probs on fitness" in err and "--exclude" in err
    assert not list((run_dir / "scores").glob("*.npy"))
    row.trials, row.result = 2, "one line naming the file, tensor and --exclude; no NaN score file; --exclude reports 3"


@pytest.mark.parametrize("where", ["scores", "prior.json"])
def test_a_full_disk_names_the_eval_command_not_resume(run_copy, fault, capsys, monkeypatch, where):
    """A full disk while eval.py writes: one line naming the file and the command to run again, eval.py's own (no
    --resume=True, a trainers' flag), and that command then finishes, scoring only what is missing."""
    row = fault("disk full", f"eval.py writing {where}")
    calls = [0]

    def free_bytes(path):  # full after member 1 (2 score files, 2 digests, its record), or for the run folder
        calls[0] += Path(path).name == "scores"
        return 0 if (calls[0] > 5 if where == "scores" else Path(path) == run_copy) else 1 << 40
    monkeypatch.setattr(store, "free_bytes", free_bytes)
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_copy)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    second = store.read_manifest(run_copy)[1]["name"]
    target = run_copy / "prior.json" if where == "prior.json" else scores.score_path(run_copy, second, "fitness")
    assert e.value.code == 1 and f"not enough disk to write {target}" in err and "Earlier files are intact" in err
    assert "--resume" not in err and err.strip().endswith(f"Then run: python eval.py {run_copy}")
    assert len(err.strip().splitlines()) == 1
    rep, out = run_cli([str(run_copy)])  # space freed: the command it names
    assert ("4 members, 1 already scored, 3 to score" if where == "scores" else "4 members, 4 already scored") in out
    assert json.loads((run_copy / "eval.json").read_text())["summary"] == rep["summary"]
    row.trials, row.result = 1, "one line: not enough disk, re-run the same eval.py command; that rerun finishes"


def test_the_first_line_says_an_unfinished_run_and_where_the_scores_came_from(evaluated, tmp_path, fault, capsys):
    """Track 1 never ran (its folder, members and scores removed from outside): 2 of the 4 planned members. The report's first
    line says UNFINISHED and that every score came from the cache; after the fix it names (training with
    --resume=True), finished, with 2 members scored now and 2 from the cache."""
    row = fault("unfinished run (one track never ran)", "eval.py RUN; the resume it names; eval.py RUN")
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    first_line = lambda out: out.split("\n== ", 1)[1].splitlines()[0]  # of the report
    assert first_line(evaluated[2]).endswith("| finished | scores: all scored now ==")
    shutil.rmtree(run_dir / "track1")
    for p in [*(run_dir / "members").glob("t1-*"), *(run_dir / "scores").glob("t1-*")]:
        p.unlink()
    rep, out = run_cli([str(run_dir)])
    assert rep["num_members"] == 2 and first_line(out).endswith(
        "| UNFINISHED: 2 of 4 planned members (continue its training with --resume=True) | scores: all from the cache ==")
    data_dir = json.loads((run_dir / "config.json").read_text())["config"]["data_dir"]
    q0.main([f"--out_dir={run_dir}", f"--data_dir={data_dir}", *TINY_Q0, "--resume=True"])  # the fix it names
    rep, out = run_cli([str(run_dir)])
    assert first_line(out).endswith("| finished | scores: 2 scored now, 2 from the cache ==")
    assert rep["summary"] == evaluated[1]["summary"]  # track 1 retrained bit for bit: the finished run's numbers
    capsys.readouterr()
    row.trials, row.result = 1, "UNFINISHED 2 of 4, all cached; after --resume=True: finished, 2 scored now, same numbers"
