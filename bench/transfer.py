"""
bench/transfer.py: does q0's lead on val loss carry over to a downstream task, and by how much? (BENCHMARKS.md 1l)
The task: given 200 bytes of a Shakespeare text, which of 4 lines comes next? The real next line and 3 distractors,
lines of the same text of about its length. Every item comes from the documents that no split of any data set of
bench/data_efficiency.py uses (train up to 3.2M bytes, val, fitness): text none of the models ever read, nor fit on.
Scored by lm-evaluation-harness through tools/lm_eval_q0.py (a local task YAML, offline), at the headline budget of
64 epochs: the best single model, the naive ensemble (its own uniform average), q0 at K = 1, 4 and all.

    python bench/reproduce.py CORPUS --seeds S             # first: the 64-epoch runs (before their 128 extension)
    python bench/transfer.py CORPUS --seeds S              # the task (built once), then lm-eval on seed S's models
    python bench/transfer.py CORPUS --build                # the task only: bench/out/transfer/next_line.{jsonl,yaml}
    python bench/transfer.py --report                      # the tables, no scoring

q0's population is read from its run folder, which must hold exactly the 64-epoch population (its prior is fit on
fitness over all the members the folder holds): run this before the run is extended to 128 epochs. Each model's lm-eval
result (acc and acc_norm with lm-eval's stderr, and each item's correctness) is cached in bench/out/transfer/s<S>/.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import prepare_data  # noqa: E402
import prior  # noqa: E402
import reproduce as rp  # noqa: E402
from data_efficiency import train_sizes  # noqa: E402

# -----------------------------------------------------------------------------------------------------
num_items = 2000           # questions
num_choices = 4            # the real next line and 3 distractors
context_bytes = 200        # text before the line's newline (a seq_len-128 model sees its last ~128 - len(line) bytes)
line_bytes = (24, 64)      # lengths of the lines asked for and offered (a speaker's name or a stage direction never)
length_tolerance = 0.2     # a distractor's length within 20% of the real line's: length does not give it away
task_seed = 36             # the items are a function of this seed and the corpus only
budget = 64                # epochs: the headline's; q0's population and the naive ensemble's members at it
ks = (1, 4, "all")         # q0: the prior's mixture at these K (prior.select's, as eval.py and tools/ use it)
task_name = "q0_shakespeare_next_line"
# -----------------------------------------------------------------------------------------------------


def unused_documents(corpus, train_tokens=train_sizes[-1]):
    """[(file name, text)] of the documents that no split of prepare_data.py's split of `corpus` with this many train
    bytes takes any byte of (nor of a smaller one: train grows by whole documents in one order), in its order: its
    document shuffle and fill_splits, run on counting writers."""
    paths = prepare_data.resolve_files([str(corpus)])
    docs = prepare_data.FileDocuments(paths)
    order = np.random.default_rng(prepare_data.DataConfig.split_seed).permutation(len(docs))
    tok = prepare_data.get_tokenizer("byte")
    taken = [0]

    def texts():
        for i in order:
            taken[0] += 1
            yield docs[int(i)]
    writers = {s: prepare_data.HeldOutPool() for s in prepare_data.SPLITS}
    targets = dict(val=rp.val_tokens, fitness=rp.fitness_tokens, train=train_tokens)
    prepare_data.fill_splits(prepare_data.encode_docs(texts(), tok, np.uint16), targets, writers, rp.heldout_piece_tokens)
    return [(Path(paths[int(i)]).name, docs[int(i)]) for i in order[taken[0]:]]


def candidate_lines(text):
    """[(offset, line)] of the lines of a text that can be asked for or offered: a line of speech or verse, no
    indentation, line_bytes long, with a lower-case letter (not a speaker's name), not a stage direction or a heading."""
    out, offset = [], 0
    for line in text.split("\n"):
        if (line_bytes[0] <= len(line) <= line_bytes[1] and line == line.strip() and line != line.upper()
                and not line.startswith(("[", "ACT ", "SCENE"))):
            out.append((offset, line))
        offset += len(line) + 1
    return out


def build_items(documents, n=num_items, seed=task_seed):
    """n multiple-choice items, deterministic in (documents, n, seed): a line drawn uniformly from the candidate lines
    with at least context_bytes before it, its context the context_bytes before its newline, and num_choices - 1
    distractors drawn from the other candidate lines of the same document of about its length (length_tolerance),
    all different and none in the context; the choices in random order."""
    rng = np.random.default_rng(seed)
    lines = [(d, off, line) for d, (_, text) in enumerate(documents) for off, line in candidate_lines(text)
             if off > context_bytes]
    by_doc = {}
    for d, off, line in lines:
        by_doc.setdefault(d, []).append(line)
    items = []
    for j in rng.permutation(len(lines)):
        d, off, line = lines[j]
        name, text = documents[d]
        context = text[off - 1 - context_bytes:off - 1]
        pool = sorted({x for x in by_doc[d] if x != line and x not in context
                       and abs(len(x) - len(line)) <= length_tolerance * len(line)})
        if len(pool) < num_choices - 1:
            continue
        choices = [line] + [pool[i] for i in rng.choice(len(pool), num_choices - 1, replace=False)]
        perm = rng.permutation(num_choices)
        items.append(dict(context=context, choices=[choices[i] for i in perm], label=int(np.argmax(perm == 0)),
                          doc=name, offset=off))
        if len(items) == n:
            return items
    raise ValueError(f"only {len(items)} items can be built from these documents, {n} asked for")


TASK_YAML = """# {n} items of bench/transfer.py (seed {seed}): which line comes next?
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(items, folder):
    """folder/next_line.jsonl and the lm-eval task YAML over it (the context's line break is the target delimiter:
    every choice is scored as newline + line; acc_norm divides by the line's length)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "next_line.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "next_line.yaml").write_text(TASK_YAML.format(n=len(items), seed=task_seed, task=task_name, path=path.resolve()))
    return folder


def task_dir(out, corpus):
    """The task's folder, built once from the corpus."""
    folder = out / "transfer"
    if not (folder / "next_line.yaml").exists():
        write_task(build_items(unused_documents(corpus)), folder)
    return folder


def models(out, seed):
    """{label: lm-eval model_args} of seed S's models at `budget` epochs, each the same population the headline suite
    scores: the single model of E* epochs (best on fitness), the naive ensemble's first budget / E* members (uniform),
    q0 at each K of ks (its prior fit on fitness here, by eval.py's writer, over the members the run folder holds)."""
    import eval as ev
    from store import member_sha256
    E = rp.best_single_epochs(out, seed)
    q0_run = out / "runs" / f"q0-s{seed}"
    rows, F, _ = rp.members(q0_run)
    if any(r["budget_epochs"] > budget for r in rows) or not (q0_run / "DONE").exists():
        raise SystemExit(f"{q0_run} holds another population than the {budget:g}-epoch one (its members' budgets reach "
                         f"{max(r['budget_epochs'] for r in rows):g}): score it before it is extended")
    names = [r["name"] for r in rows]
    ev.current_prior(q0_run, names, F, member_sha256={n: member_sha256(q0_run / "members" / f"{n}.pt") for n in names})
    return {f"single model ({E} epochs)": f"run={out / 'runs' / f'single-E{E}-s{seed}'},weights=uniform,k=1",
            f"naive ensemble ({int(budget // E)} x {E} epochs)":
                f"run={out / 'runs' / f'ensemble-E{E}-s{seed}'},weights=uniform,k={int(budget // E)}",
            **{f"q0, prior, K={k}": f"run={q0_run},k={k}" for k in ks}}


def lm_eval_score(model_args, folder):
    """acc and acc_norm (lm-eval's stderr beside each) of one model on the task, and each item's correctness."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from tools import lm_eval_q0  # noqa: F401 (registers q0-mixture)
    res = lm_eval.simple_evaluate(model="q0-mixture", model_args=model_args, tasks=[task_name], device="cpu",
                                  task_manager=TaskManager(include_path=str(folder)), batch_size=16, log_samples=True)
    r = res["results"][task_name]
    samples = sorted(res["samples"][task_name], key=lambda s: s["doc_id"])
    return dict(model_args=model_args, acc=r["acc,none"], acc_stderr=r["acc_stderr,none"], acc_norm=r["acc_norm,none"],
                acc_norm_stderr=r["acc_norm_stderr,none"], items=len(samples),
                item_acc=[s["acc"] for s in samples], item_acc_norm=[s["acc_norm"] for s in samples])


def score(out, corpus, seed):
    """lm-eval every model of seed S (models) on the task; each result cached, so a killed run resumes."""
    folder = task_dir(out, corpus)
    (folder / f"s{seed}").mkdir(exist_ok=True)
    for i, (label, args) in enumerate(models(out, seed).items()):
        path = folder / f"s{seed}" / f"{i}.json"
        if not path.exists():
            print(f"lm-eval seed {seed}: {label} ({args})", flush=True)
            path.write_text(json.dumps(dict(label=label, **lm_eval_score(args, folder))))


def val_losses(out, seed):
    """Val loss of the same models (from the scores bench/reproduce.py read): {label: val}."""
    E = rp.best_single_epochs(out, seed)
    _, _, V = rp.members(out / "runs" / f"single-E{E}-s{seed}")
    val = {f"single model ({E} epochs)": float(-V[0].mean())}
    k = int(budget // E)
    _, _, V = rp.members(out / "runs" / f"ensemble-E{E}-s{seed}", first=k)
    val[f"naive ensemble ({k} x {E} epochs)"] = prior.mixture_nll(V, np.full(k, 1 / k))
    summary = rp.population_summary(rp.members(out / "runs" / f"q0-s{seed}", budget=budget), ks=[k for k in ks if k != "all"])
    val.update({f"q0, prior, K={k}": v for k, _, v in summary["by_k"]}, **{"q0, prior, K=all": summary["val_prior"]})
    return val


def report(out, seeds=rp.seeds):
    for seed in seeds:
        folder = out / "transfer" / f"s{seed}"
        results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: int(p.stem))] \
            if folder.exists() else []
        if not results:
            continue
        val = val_losses(out, seed)
        print(f"\nseed {seed}: the next-line task ({results[0]['items']} items, {num_choices} choices, chance "
              f"{1 / num_choices:.2f}) at {budget:g} epochs, lm-eval's stderr; val loss from the same models")
        print("| model | val loss | acc | acc_norm (primary) | acc_norm minus the single model's | minus the naive "
              "ensemble's |\n|---|---|---|---|---|---|")
        paired = lambda r, base: np.array(r["item_acc_norm"]) - np.array(base["item_acc_norm"])
        for r in results:
            diffs = [paired(r, base) for base in results[:2]]  # results[0]: the single model, [1]: the naive ensemble
            print(f"| {r['label']} | {val[r['label']]:.4f} | {r['acc']:.4f} ± {r['acc_stderr']:.4f} | {r['acc_norm']:.4f} ± "
                  f"{r['acc_norm_stderr']:.4f} | " + " | ".join(f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}"
                                                                  for d in diffs) + " |")
        print("(the last two columns: paired differences over the same items, with their standard error)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(rp.seeds))
    ap.add_argument("--build", action="store_true", help="build the task only")
    args = ap.parse_args()
    args.out, corpus = rp.from_root(args.out), rp.corpus_arg(args.corpus)
    os.chdir(ROOT)
    if args.build:
        return print(f"wrote {task_dir(args.out, corpus)}")
    for seed in args.seeds:
        score(args.out, corpus, seed)
    report(args.out, args.seeds)


if __name__ == "__main__":
    if (out := rp.report_out()) is not None:
        report(out)
    else:
        main()
