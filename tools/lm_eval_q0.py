"""
tools/lm_eval_q0.py: the learned prior's mixture at K as an lm-evaluation-harness model, "q0-mixture". A continuation's
log-likelihood is sum over its tokens of log sum_i w_i p_i(token | prefix): the probability average eval.py scores,
summed as tools/downstream.py sums a choice (the same numbers, up to fp32 rounding). lm-eval is optional
(`pip install -r requirements-lm-eval.txt`) and imported only here.

    python tools/lm_eval_q0.py run --model q0-mixture --model_args run=runs/quickstart,k=4 --tasks hellaswag
    python tools/lm_eval_q0.py run --model q0-mixture --model_args export=runs/quickstart/export/top4 --tasks arc_easy
    # from Python: import tools.lm_eval_q0, then lm_eval.simple_evaluate(model="q0-mixture", model_args="run=RUN,k=4")

model_args: run=RUN (its prior.json, as eval.py wrote it) and k=K (default 1; k=all: every member), or export=DIR
(tools/export.py's folder, read without pickle); weights=uniform: the run's first K members in training order, averaged
uniformly (the naive ensemble's own rule; no prior.json needed). The harness's --device and --batch_size apply.
Contexts are BOS + context, left-cut to the model's seq_len as tools/downstream.py does; a context's trailing spaces
move to the continuation (lm-eval's HF models do the same). generate_until is greedy decoding from the mixture (no KV
cache). acc_norm divides by the choice's length without the " " delimiter, here as in tools/downstream.py.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: the project's modules are one up
import runtime  # noqa: E402
import store  # noqa: E402
from config import UserError  # noqa: E402
from prepare_data import get_tokenizer  # noqa: E402
from scores import eval_windows  # noqa: E402
from tools.export import load_export, prior_mixture  # noqa: E402


def load_mixture(run=None, k=1, export=None, device="cpu", weights="prior"):
    """([(model, weight), ...], tokenizer) from a run's prior.json (eval.members_at through tools/export.py's reader),
    or its first k members with uniform weights (weights="uniform"), or from an export folder. k="all": every member."""
    if weights not in ("prior", "uniform"):
        raise UserError(f"weights={weights}: use prior (the learned prior's mixture at K) or uniform (the first K members)")
    if export:
        pairs, config = load_export(export, device)
        tok = config["tokenizer"]
    elif run:
        names = [r["name"] for r in store.read_manifest(Path(run))]
        k = len(names) if str(k) == "all" else int(k)
        if weights == "uniform":
            mix = [(name, 1 / len(names[:k])) for name in names[:k]]
        else:
            mix, _ = prior_mixture(Path(run), k)
        loaded = [store.load_member(Path(run) / "members" / f"{name}.pt", device, expected=name) for name, _ in mix]
        pairs, tok = [(m, w) for (m, _), (_, w) in zip(loaded, mix)], loaded[0][1]["data"]
        tok = dict(name=tok["tokenizer"], vocab_size=tok["vocab_size"], bos_id=tok["bos_id"])
    else:
        raise UserError("q0-mixture needs model_args run=RUN[,k=K] or export=DIR")
    tokenizer = get_tokenizer(tok["name"])
    if (tokenizer.vocab_size, tokenizer.bos_id) != (tok["vocab_size"], tok["bos_id"]):
        raise UserError(f"the members were trained with {tok}, tokenizer {tokenizer.name} now has vocab "
                        f"{tokenizer.vocab_size}, BOS {tokenizer.bos_id}")
    return pairs, tokenizer


@register_model("q0-mixture")
class Q0Mixture(LM):
    def __init__(self, run=None, k=1, export=None, device=None, batch_size=16, weights="prior", **unused):
        super().__init__()
        self.dev = runtime.pick_device("auto" if device in (None, "", "auto") else str(device).split(":")[0])
        self.pairs, self.tok = load_mixture(run, k, export, self.dev, weights)
        self.log_w = torch.tensor([w for _, w in self.pairs], dtype=torch.float32, device=self.dev).log()
        self.seq_len = self.pairs[0][0].cfg.seq_len
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not supported: 16

    @torch.no_grad()
    def mixture_logprobs(self, x):
        """x (B, L) -> log sum_i w_i softmax(z_i) over the vocab, (B, L, V): one model's logits at a time."""
        out = None
        for (model, _), log_w in zip(self.pairs, self.log_w):
            with runtime.autocast(self.dev):
                lp = F.log_softmax(model(x).float(), dim=-1) + log_w
            out = lp if out is None else torch.logaddexp(out, lp)
        return out

    def score(self, seqs, n_cont):
        """[(sum of the last n tokens' mixture log p, whether each is the mixture's argmax)] of each id sequence."""
        res = []
        for b in range(0, len(seqs), self.batch_size):
            chunk = seqs[b:b + self.batch_size]
            x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # right padding: causal, so harmless
            for j, ids in enumerate(chunk):
                x[j, :len(ids)] = torch.tensor(ids)
            x = x.to(self.dev)
            lp = self.mixture_logprobs(x[:, :-1])  # (B, L-1, V): lp[j, t] predicts ids[t + 1]
            for j, (ids, n) in enumerate(zip(chunk, n_cont[b:b + self.batch_size])):
                rows, target = lp[j, len(ids) - 1 - n:len(ids) - 1], x[j, len(ids) - n:len(ids)]
                res.append((rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
        return res

    def loglikelihood(self, requests):
        seqs, n_cont = [], []
        for context, continuation in (r.args for r in requests):
            spaces = len(context) - len(context.rstrip())
            if spaces:  # lm-eval's convention: the context's trailing spaces belong to the continuation
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx, cont = [self.tok.bos_id] + self.tok.encode(context), self.tok.encode(continuation)
            ids = (ctx + cont)[-(self.seq_len + 1):]
            seqs.append(ids)
            n_cont.append(min(len(cont), len(ids) - 1))
        return self.score(seqs, n_cont)

    def loglikelihood_rolling(self, requests):
        """log p of a whole text: BOS + its tokens in windows of seq_len + 1 (scores.eval_windows), every token once."""
        out = []
        for (text,) in (r.args for r in requests):
            ids = [self.tok.bos_id] + self.tok.encode(text)
            windows = eval_windows(ids, self.seq_len)
            out.append(sum(ll for ll, _ in self.score([ids[s:e] for s, e in windows], [e - s - 1 for s, e in windows])))
        return out

    @torch.no_grad()
    def generate_until(self, requests):
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids, new, text = [self.tok.bos_id] + self.tok.encode(context), [], ""
            for _ in range(int(kwargs.get("max_gen_toks", 256))):
                x = torch.tensor([ids[-self.seq_len:]], device=self.dev)
                nxt = int(self.mixture_logprobs(x)[0, -1, :self.tok.vocab_size].argmax())
                if nxt == self.tok.bos_id:  # BOS ends a document
                    break
                ids.append(nxt)
                new.append(nxt)
                text = self.tok.decode(new)
                if any(s in text for s in until):
                    break
            cut = min([text.index(s) for s in until if s in text], default=len(text))
            out.append(text[:cut])
        return out


if __name__ == "__main__":  # lm-eval's own CLI, with q0-mixture registered
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
