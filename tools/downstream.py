"""
tools/downstream.py: zero-shot multiple choice (hellaswag, arc_easy, arc_challenge, piqa from the hub, or a local
JSONL file of {context, choices, label}) for the best member and the prior's mixtures at each K. It runs eval.py first
(which scores the run and fits the prior, or reads them), then this; every eval.py flag applies. The results, each
accuracy with its standard error as lm-eval reports it, are printed and written to RUN/downstream.json.

    python tools/downstream.py runs/RUN --tasks hellaswag arc_easy tests/fixtures/mc_tiny.jsonl

Each member runs once over every choice; the mixtures for every K (eval.members_at) reuse its token log-probs.
"""
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: the project's modules are one up
import eval as ev  # noqa: E402
import runtime  # noqa: E402
import store  # noqa: E402
from config import UserError  # noqa: E402
from prepare_data import tokenizer_for_meta  # noqa: E402


@dataclass
class DownstreamConfig(ev.EvalConfig):
    tasks: tuple = ()                # hellaswag, arc_easy, arc_challenge, piqa (hub) or JSONL files

HUB = ("hellaswag", "arc_easy", "arc_challenge", "piqa")


def hub_questions(name):
    """A hub benchmark as [{context, choices, label}], lm-eval's zero-shot prompts (choices joined with a space)."""
    from datasets import load_dataset  # only here: local files and everything else work without it
    def clean(t):  # lm-eval's hellaswag preprocess: drop WikiHow's [title]/[step] markers
        return re.sub(r"\[.*?\]", "", t.strip().replace(" [title]", ". ")).replace("  ", " ")
    spec = {"hellaswag": ("Rowan/hellaswag", None, "validation", lambda d: dict(
                context=clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
                choices=[clean(c) for c in d["endings"]], label=int(d["label"]))),
            "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", None),
            "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", None),
            "piqa": ("baber/piqa", None, "validation", lambda d: dict(
                context=f"Question: {d['goal']}\nAnswer:", choices=[d["sol1"], d["sol2"]], label=int(d["label"])))}
    path, config, split, convert = spec[name]
    convert = convert or (lambda d: dict(context=f"Question: {d['question']}\nAnswer:", choices=d["choices"]["text"],
                                         label=d["choices"]["label"].index(d["answerKey"])))
    try:
        return [convert(d) for d in load_dataset(path, config, split=split)]
    except Exception as e:
        raise UserError(f"cannot load {name} ({path}) from the hub ({type(e).__name__}: {str(e)[:200]}); offline? "
                        f"write it as JSONL lines {{context, choices, label}} and pass the file instead") from None


def read_questions(spec):
    if spec in HUB:
        return hub_questions(spec)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--tasks {spec}: neither a benchmark name ({', '.join(HUB)}) nor a JSONL file")
    qs = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            q = json.loads(line) if line.strip() else None
        except ValueError:
            q = {}
        ok = isinstance(q, dict) and isinstance(q.get("context"), str) and isinstance(q.get("label"), int)
        if q is not None and not (ok and isinstance(q.get("choices"), list) and 0 <= q["label"] < len(q["choices"])
                                  and all(isinstance(c, str) for c in q["choices"])):
            raise UserError(f"{path}:{i + 1}: each line must be {{\"context\": str, \"choices\": [str, ...], \"label\": int}}")
        qs += [q] if q is not None else []
    if not qs:
        raise UserError(f"{path}: no questions")
    return qs


def choice_sequences(qs, tok, T):
    """Every (question, choice) as BOS + context + continuation ids, left-truncated to T + 1 tokens, as lm-eval builds
    them: the continuation is its target_delimiter " " + choice (api/task.py, always), and the context's trailing
    whitespace moves to the continuation (LM._encode_pair), so context "Answer: " with choice "yes" scores "  yes"
    after "Answer:". The context then ends in a non-space and the continuation starts with one, so encoding the two
    apart gives the ids lm-eval's encode-whole-then-split gives (byte and GPT-2 tokens never span that boundary)."""
    seqs, n_cont, chars, first = [], [], [], []  # per choice; first[q] = index of question q's first choice
    for q in qs:
        context = q["context"].rstrip()
        ctx = [tok.bos_id] + tok.encode(context)
        first.append(len(seqs))
        for c in q["choices"]:
            cont = tok.encode(q["context"][len(context):] + " " + c)
            ids = (ctx + cont)[-(T + 1):]
            seqs.append(ids)
            n_cont.append(min(len(cont), len(ids) - 1))
            chars.append(max(1, len(c)))  # lm-eval's acc_norm: the choice's own length, without the space
    return seqs, np.array(n_cont), np.array(chars), first


@torch.no_grad()
def continuation_logprobs(model, seqs, n_cont, dev, size=DownstreamConfig.batch_size):
    """One member's log p of every continuation token, all choices concatenated in order: (sum(n_cont),)."""
    out = []
    for b in range(0, len(seqs), size):
        chunk = seqs[b:b + size]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # right padding: causal, so harmless
        for j, ids in enumerate(chunk):
            x[j, :len(ids)] = torch.tensor(ids)
        x = x.to(dev)
        with runtime.autocast(dev):
            lp = model(x[:, :-1], x[:, 1:]).float().cpu().numpy()  # (B, L-1): lp[j, t] = log p(ids[t + 1])
        out += [lp[j, len(ids) - 1 - n:len(ids) - 1] for j, (ids, n) in enumerate(zip(chunk, n_cont[b:b + size]))]
    return np.concatenate(out)


def downstream(run, pj, best, spec, dev):
    """Multiple choice for member `best` alone and the prior's mixture (prior.json `pj`) at each of its K: a choice's
    score = sum over its tokens of log sum_i w_i p_i(token), after the context (choice_sequences). acc = argmax score;
    acc_norm = argmax score / len(choice) in characters (lm-eval's, without the space put before it). Each with
    lm-eval's standard error (metrics.mean_stderr): the sample standard deviation of the 0/1 scores over sqrt(n), that is
    sqrt(p (1 - p) / (n - 1)); None for one question, where lm-eval says N/A."""
    qs = read_questions(spec)
    seqs, n_cont, chars, first = choice_sequences(qs, tokenizer_for_meta(run["val"]["meta"]), run["seq_len"])
    names = pj["members"]
    lp = np.stack([continuation_logprobs(ev.load(run, name, dev), seqs, n_cont, dev) for name in names])  # (M, tokens)
    ends = np.cumsum(n_cont)

    def accuracy(w):
        with np.errstate(divide="ignore"):
            mix = torch.logsumexp(torch.from_numpy(np.log(w)[:, None] + lp), 0).numpy()  # log sum_i w_i p_i, per token
        score = np.array([mix[e - n:e].sum() for e, n in zip(ends, n_cont)])  # (choices,) log p(continuation)
        norm = score / chars
        right = np.array([[np.argmax(s[f:f + len(q["choices"])]) == q["label"] for s in (score, norm)]
                          for f, q in zip(first, qs)], dtype=np.float64)  # (questions, 2): acc, acc_norm per question
        mean = right.mean(0)
        err = [float(e) for e in right.std(0, ddof=1) / np.sqrt(len(qs))] if len(qs) > 1 else [None, None]
        return dict(acc=float(mean[0]), acc_stderr=err[0], acc_norm=float(mean[1]), acc_norm_stderr=err[1])

    res = {f"best member {best}": accuracy(np.eye(len(names))[names.index(best)])}
    res |= {f"prior K={k}": accuracy(ev.weights_of(names, ev.members_at(pj, int(k)))) for k in pj["per_k"]}
    return dict(benchmark=spec, questions=len(qs), results=res)


def main(argv):
    """eval.py's report of each run, then every task -> {run: [result, ...]} (also RUN/downstream.json)."""
    out = {}
    with runtime.session(argv, DownstreamConfig, __doc__) as cfg:
        if not cfg.tasks:
            raise UserError("give one or more tasks: --tasks hellaswag arc_easy FILE.jsonl ...", status=2)
        done, env = ev.evaluate(cfg)
        for run, rep, pj in done:
            results = out[str(run["dir"])] = [downstream(run, pj, rep["best_member"]["name"], spec, env["device"])
                                              for spec in cfg.tasks]
            for d in results:
                print(f"downstream {d['benchmark']} ({d['questions']} questions): accuracy ± its standard error")
                print(f"  {'':<28} | {'acc':^13} | {'acc_norm':^13}")
                for who, r in d["results"].items():
                    print(f"  {who:<28} | {pm(r['acc'], r['acc_stderr'])} | {pm(r['acc_norm'], r['acc_norm_stderr'])}")
            store.write_json(results, run["dir"] / "downstream.json")
    return out


def pm(value, stderr):
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}        "


if __name__ == "__main__":
    main(sys.argv[1:])
