"""What researchers look at and load elsewhere: tools/export.py (safetensors export and its round trip) on hand-made
member files, eval.py's pictures (eval.png, compare.png) on hand-made reports, and tools/downstream.py against
lm-eval. No training; milliseconds but for lm-eval's (slow)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import store  # noqa: E402
import eval as ev  # noqa: E402
import model as gpt  # noqa: E402
from tools import export as ex  # noqa: E402

META = dict(tokenizer="byte", vocab_size=257, bos_id=256)


def fake_run(run_dir, n=3, dtype=torch.float32):
    """A run folder of n members of random weights (members/*.pt, manifests through store.save_member) and a
    prior.json fit by eval.write_prior on random fitness scores."""
    cfg = gpt.config_for("tiny", vocab_size=320, seq_len=32)
    names = []
    for i in range(n):
        model = gpt.build(cfg, "cpu")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        name = f"t0-c{i + 1:03d}"
        row = dict(name=name, mode="q0", track=0, cycle=i + 1, budget_epochs=2 * (i + 1))
        state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
        store.save_member(run_dir, row, model, META, state)
        names.append(name)
    L = np.log(np.random.default_rng(0).dirichlet(np.ones(n), size=64).T)  # (n, 64) log-probs
    shas = {name: store.member_sha256(Path(run_dir) / "members" / f"{name}.pt") for name in names}
    pj = ev.write_prior(Path(run_dir) / "prior.json", names, L, member_sha256=shas)
    return names, pj


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_round_trip_is_bit_for_bit(tmp_path, dtype):
    run = tmp_path / "run"
    names, pj = fake_run(run, dtype=dtype)
    x = torch.randint(0, 257, (2, 32))
    for kwargs, want in [(dict(member=names[1]), [(names[1], 1.0)]), (dict(k=2), ev.members_at(pj, 2))]:
        out = tmp_path / "out" / str(kwargs)
        config = ex.export(run, out, **kwargs)
        models, read = ex.load_export(out)
        assert read == json.loads((out / "config.json").read_text()) == config
        assert [(m["name"], m["weight"]) for m in config["members"]] == want
        assert config["safetensors_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        assert config["tokenizer"] == dict(name="byte", vocab_size=257, bos_id=256)
        assert config["dtype"] == str(dtype).removeprefix("torch.")
        from safetensors import safe_open  # the standard reader, no q0 code: the stored tensors are the member's
        with safe_open(out / "model.safetensors", "pt") as f:
            for m in config["members"]:
                stored = torch.load(run / "members" / f"{m['name']}.pt", weights_only=True)["model"]
                for key, v in stored.items():
                    assert torch.equal(f.get_tensor(m["prefix"] + key), v) and f.get_tensor(m["prefix"] + key).dtype == dtype
        for (model, w), (name, want_w) in zip(models, want):
            ref, _ = store.load_member(run / "members" / f"{name}.pt", expected=name)
            assert w == want_w
            for (k, a), (k2, b) in zip(model.state_dict().items(), ref.state_dict().items()):
                assert k == k2 and torch.equal(a, b), k
            with torch.no_grad():
                assert torch.equal(model(x), ref(x))


def test_export_refuses_what_it_cannot_vouch_for(tmp_path):
    run = tmp_path / "run"
    names, pj = fake_run(run)
    out = tmp_path / "out"
    ex.export(run, out, k=1)
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(config.UserError, match="does not match the sha256"):
        ex.load_export(out)
    with pytest.raises(config.UserError, match="not found"):
        ex.export(run, out, member="t9-c001")
    pj["weights"][names[0]] = 0.99  # an edit on disk
    (run / "prior.json").write_text(json.dumps(pj))
    with pytest.raises(config.UserError, match="re-run python eval.py"):
        ex.export(run, out, k=2)


def test_export_cli_and_standard_tools(tmp_path):
    """The CLI, then the checks the docstring gives: sha256sum against config.json, safe_open's listing."""
    run = tmp_path / "run"
    _, pj = fake_run(run, n=2)
    config = ex.main([str(run), "--k", "2"])
    out = run / "export" / "top2"
    assert [(m["name"], m["weight"]) for m in config["members"]] == ev.members_at(pj, 2)
    sha = subprocess.run(["sha256sum", str(out / "model.safetensors")], capture_output=True, text=True).stdout.split()[0]
    assert sha == json.loads((out / "config.json").read_text())["safetensors_sha256"]
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert {k.split(".")[1] for k in f.keys()} == {"0", "1"}


def test_export_k_above_the_members_is_one_line_exit_2(tmp_path, capsys):
    """--k past the population is refused by name (members_at would quietly give all of them as 'topK'); K = M is fine."""
    run = tmp_path / "run"
    fake_run(run, n=3)
    with pytest.raises(SystemExit) as e:
        ex.main([str(run), "--k", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: --k 5: {run} has 3 member(s) (its prior.json): give --k 1 to 3"]
    assert not (run / "export").exists()
    assert len(ex.main([str(run), "--k", "3"])["members"]) == 3


def drawn(monkeypatch):
    """The figures eval.py's plots draw, kept when they close (to read their labels and texts back)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    return figs


def words(fig):
    """Every label, title, legend entry and free text of a figure."""
    out = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()] + [t.get_text() for t in ax.get_legend().get_texts()]
    return out


def test_comparison_plot(tmp_path, monkeypatch):
    """compare.png: the population's budget curve and each baseline's own number at its budget, named in words, with
    units on both axes."""
    figs = drawn(monkeypatch)
    curve = [dict(budget_epochs=b, prior_val=3.0 - 0.01 * b) for b in (2, 4, 8)]
    reps = [dict(run="runs/q", mode="q0", num_members=4, budget_epochs=8, budget_curve=curve, summary=dict(prior_val=2.92)),
            dict(run="runs/s", mode="single", num_members=1, budget_epochs=8, summary=dict(best_member_val=2.99)),
            dict(run="runs/e", mode="ensemble", num_members=2, budget_epochs=8, summary=dict(uniform_val=2.95))]
    assert ev.plot_comparison(reps, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = words(figs[-1])
    assert text[:2] == ["budget (epochs of the training data)", "val loss (nats/token; lower is better)"]
    assert text[3:] == ["runs/q: q0, learned prior over the members so far (2.9200 at 8 epochs)",
                        "runs/s: one model (2.9900 at 8 epochs)",
                        "runs/e: naive ensemble: 2 models, equal weights (2.9500 at 8 epochs)"]


def test_eval_plot_in_words_and_units_and_none_for_one_member(tmp_path, monkeypatch):
    """eval.png: the K panel and the budget panel with every axis in units (nats/token, epochs, members) and every line
    named in words (no internal keys); a one-member run gets no panels but a picture that says why, and its loss."""
    figs = drawn(monkeypatch)
    ks, curve = [1, 2, 4], [dict(budget_epochs=b, prior_val=3 - b / 10, uniform_val=3.1 - b / 10, best_member_val=3.05)
                            for b in (2, 4)]
    rep = dict(run="runs/q", mode="q0", num_members=4, budget_epochs=4, budget_curve=curve,
               ensemble=dict(ks=ks, uniform_all=2.8, **{key: {k: 3 - k / 10 for k in ks}
                                                        for key in ("prior", "greedy", "uniform_last")}))
    assert ev.plot(rep, tmp_path / "eval.png") and (tmp_path / "eval.png").stat().st_size > 0
    fig = figs[-1]
    assert [ax.get_xlabel() for ax in fig.axes] == ["K (members in the mixture)", "budget (epochs of the training data)"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["val loss (nats/token; lower is better)"] * 2
    text = " | ".join(words(fig))
    assert "runs/q: q0, 4 members, 4 epochs" in text and "all 4 members, equal weights" in text
    assert not any(key in text for key in ("uniform_last", "prior_val", "uniform_val", "best_member_val", "greedy |"))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4"]
    one = dict(run="runs/s", mode="single", num_members=1, budget_epochs=32, best_member=dict(name="single", val=2.5934))
    assert ev.plot(one, tmp_path / "one.png") and (tmp_path / "one.png").stat().st_size > 0
    assert figs[-1].axes == [] and "val loss 2.5934 nats/token" in words(figs[-1])[0]
    assert "One member: no mixture over K and no budget curve to draw." in words(figs[-1])[0]


MC_TASK = """task: q0_mc_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow  # lm-eval's import and its task machinery take seconds
@pytest.mark.parametrize("k, spaces", [(1, False), (2, False), (1, True)])
def test_lm_eval_adapter_equals_the_projects_multiple_choice_scorer(tmp_path, monkeypatch, k, spaces):
    """tools/lm_eval_q0.py's q0-mixture through lm-eval's own evaluator on a local YAML task over tests/fixtures/
    mc_tiny.jsonl (spaces: its contexts ending in " ", "\\n" or "  ", as prompts ending "Answer: " do): every choice's
    log-likelihood equals tools/downstream.py's mixture score of the same choice up to fp32 rounding (other batches,
    sums in another order), so acc is the same, and acc_norm (both divide by len(choice)), and their standard errors.
    The tokens downstream scores are those lm-eval's own LM._encode_pair gives for the request lm-eval built (the
    " " target delimiter always added, the context's trailing whitespace moved to the continuation)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from tools import downstream as ds, lm_eval_q0  # noqa: F401 (registers q0-mixture)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    names, pj = fake_run(run_dir)
    fixture = ROOT / "tests" / "fixtures" / "mc_tiny.jsonl"
    if spaces:
        qs = [json.loads(line) for line in fixture.read_text().splitlines()]
        fixture = tmp_path / "mc_spaces.jsonl"
        fixture.write_text("".join(json.dumps(dict(q, context=q["context"] + [" ", "", "\n", "  "][i % 4])) + "\n"
                                   for i, q in enumerate(qs)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "q0_mc_tiny.yaml").write_text(MC_TASK.format(path=fixture))
    out = lm_eval.simple_evaluate(model="q0-mixture", model_args=f"run={run_dir},k={k}", tasks=["q0_mc_tiny"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu",
                                  batch_size=4, log_samples=True)
    samples = sorted(out["samples"]["q0_mc_tiny"], key=lambda s: s["doc_id"])
    lls = [[r[0] for r in s["filtered_resps"]] for s in samples]  # (question, choice) log-likelihoods

    rows = store.read_manifest(run_dir)
    run = dict(dir=run_dir, rows=rows, names=names, seq_len=32, cfg=dict(data_dir="none"),
               val=dict(meta=dict(META, split="val")))  # what downstream needs of an open run (eval.open_run)
    qs = ds.read_questions(str(fixture))
    tok = ds.tokenizer_for_meta(run["val"]["meta"])
    seqs, n_cont, _, first = ds.choice_sequences(qs, tok, 32)
    shim = type("Shim", (), dict(backend="causal", tok_encode=lambda self, text, **kw: tok.encode(text)))()
    lm_eval_ids = [[tok.bos_id] + sum(TemplateLM._encode_pair(shim, *args), []) for s in samples for args in s["arguments"]]
    assert [ids[-n:] for ids, n in zip(seqs, n_cont)] == [ids[-n:] for ids, n in zip(lm_eval_ids, n_cont)]
    assert [ids for ids in seqs] == [ids[-33:] for ids in lm_eval_ids]  # and the context before it, left-cut to T + 1
    mix = ev.members_at(pj, k)
    lp = torch.logsumexp(torch.stack([torch.from_numpy(ds.continuation_logprobs(ev.load(run, n, "cpu"), seqs, n_cont,
                                                                                  torch.device("cpu"))) + np.log(w)
                                      for n, w in mix]), 0).numpy()  # downstream's per-token mixture
    ends = np.cumsum(n_cont)
    want = [[float(lp[e - n:e].sum()) for e, n in zip(ends[f:f + len(q["choices"])], n_cont[f:f + len(q["choices"])])]
            for f, q in zip(first, qs)]
    np.testing.assert_allclose(np.concatenate(lls), np.concatenate(want), rtol=0, atol=1e-4)  # measured: 4e-6
    result = out["results"]["q0_mc_tiny"]
    got = ds.downstream(run, pj, names[0], str(fixture), torch.device("cpu"))["results"][f"prior K={k}"]
    assert result["acc,none"] == pytest.approx(got["acc"])
    norm = [int(np.argmax(np.array(w) / [len(c) for c in q["choices"]])) == q["label"] for w, q in zip(want, qs)]
    assert result["acc_norm,none"] == pytest.approx(np.mean(norm))  # lm-eval divides by len(choice)
    assert got["acc_norm"] == pytest.approx(result["acc_norm,none"])  # and so does downstream
    for key in ("acc_stderr", "acc_norm_stderr"):  # lm-eval's mean_stderr: sqrt(p (1 - p) / (n - 1)) for 0/1 scores
        assert got[key] == pytest.approx(result[f"{key},none"], rel=1e-12)
        p = got[key.removesuffix("_stderr")]
        assert got[key] == pytest.approx(np.sqrt(p * (1 - p) / (len(qs) - 1)), rel=1e-12)
