"""
tools/sample.py: what needs the mixture's full next-token distribution, K models in memory at once: text sampled from
the prior's mixture at K, and logit averaging measured against probability averaging. Run through eval.py's flags
(eval.py scores the run and fits the prior first; this file is imported only when a flag asks for it):

    python eval.py runs/RUN --sample "def main(" --k 4    # text from the prior's 4-member mixture
    python eval.py runs/RUN --logit_avg 4                 # logit vs probability averaging, prior's top 4
    python tools/sample.py runs/RUN "def main(" --k 4     # the same as eval.py's --sample, from here

The mixture at K is prior.members_at(prior.json, K), as for every other consumer of the prior.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: the project's modules are one up
import eval as ev  # noqa: E402
import model as gpt  # noqa: E402
import prior  # noqa: E402
from common import autocast, window_batches  # noqa: E402
from prepare_data import tokenizer_for_meta  # noqa: E402

# -----------------------------------------------------------------------------
logits_floats = 2**26    # --logit_avg: cap on the B x T x V logits held at once (256 MiB in fp32)
# -----------------------------------------------------------------------------
# --sample's defaults (--k, --max_new_tokens, --temperature, --seed) are eval.py's, beside its other flags


@torch.no_grad()
def logit_average(run, pj, k, dev):
    """Val loss of the prior's mixture at K (prior.json `pj`) combined two ways, same members and weights:
        logit average   -log softmax(sum_i w_i z_i)[y]   (on the fly; holds K models, B x T x V logits)
        prob average    -log sum_i w_i p_i(y)            (from the cached arrays)"""
    mix = prior.members_at(pj, k, run["dir"])
    models = [ev.load(run, name, dev) for name, _ in mix]
    total, rows = 0.0, max(1, min(ev.batch_size, logits_floats // (run["seq_len"] * models[0].cfg.vocab_size)))
    for x in window_batches(run["val"]["tokens"], run["val"]["windows"], rows, dev):
        with autocast(dev):
            z = sum(wi * m(x[:, :-1]) for (_, wi), m in zip(mix, models))  # (B, T, V)
        total -= gpt.token_logprobs(z.float(), x[:, 1:]).double().sum().item()
    return dict(k=len(mix), members=[n for n, _ in mix], weights=[wi for _, wi in mix],
                logit_avg_val=total / run["val"]["n"],
                prob_avg_val=prior.mixture_nll(ev.run_scores(run, "val"), ev.weights_of(run["names"], mix)))


@torch.no_grad()
def sample(run, pj, prompt, k, dev, new_tokens=ev.max_new_tokens, temp=ev.temperature, seed=ev.seed):
    """Sample from the prior's mixture at K: p = sum_i w_i softmax(z_i / temp), then a seeded multinomial draw.
    Holds K models; no KV cache (each step reruns the last seq_len tokens). -> (text, new token ids)."""
    mix = prior.members_at(pj, k, run["dir"])
    models = [ev.load(run, name, dev) for name, _ in mix]
    tok = tokenizer_for_meta(run["val"]["meta"])
    ids, gen = [tok.bos_id] + tok.encode(prompt), torch.Generator().manual_seed(seed)
    new = []
    for _ in range(new_tokens):
        x = torch.tensor([ids[-run["seq_len"]:]], device=dev)
        p = sum(wi * torch.softmax(m(x)[0, -1].float() / temp, -1) for (_, wi), m in zip(mix, models))  # (V,)
        p = p[:tok.vocab_size].cpu()  # the padded vocab rows are never real tokens
        new.append(int(torch.multinomial(p / p.sum(), 1, generator=gen)))
        ids.append(new[-1])
    return tok.decode(new), new


if __name__ == "__main__":  # python tools/sample.py RUN PROMPT [eval.py flags]: eval.py RUN --sample PROMPT
    ev.main([*sys.argv[1:2], "--sample", *sys.argv[2:]])
