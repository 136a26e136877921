"""
tools/sample.py: what needs the mixture's full next-token distribution, K models in memory at once: text sampled from
the prior's mixture at K, and logit averaging measured against probability averaging. It runs eval.py first (which
scores the run and fits the prior, or reads them), then this; every eval.py flag applies.

    python tools/sample.py runs/RUN --prompt "def main(" --k 4     # text from the prior's 4-member mixture
    python tools/sample.py runs/RUN --logit_avg 4 --max_new_tokens 0   # logit vs probability averaging, prior's top 4

The mixture at K is eval.members_at(prior.json, K), as for every other consumer of the prior.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: the project's modules are one up
import eval as ev  # noqa: E402
import model as gpt  # noqa: E402
import prior  # noqa: E402
import runtime  # noqa: E402
from prepare_data import tokenizer_for_meta  # noqa: E402
from scores import window_batches  # noqa: E402


@dataclass
class SampleConfig(ev.EvalConfig):
    prompt: str = ""                 # the text to continue ("": from the first token)
    k: int = 4                       # members mixed (the prior's mixture at K)
    max_new_tokens: int = 200        # tokens generated (0: no sample)
    temperature: float = 1.0         # each member's softmax(z / temperature), then mixed
    seed: int = 1337                 # the multinomial draws
    logit_avg: int = 0               # K > 0: also the val loss of the prior's mixture at K, logit vs probability averaged


logits_floats = 2**26    # --logit_avg: cap on the B x T x V logits held at once (256 MiB in fp32)


@torch.no_grad()
def logit_average(run, pj, k, dev, batch_size=SampleConfig.batch_size):
    """Val loss of the prior's mixture at K (prior.json `pj`) combined two ways, same members and weights:
        logit average   -log softmax(sum_i w_i z_i)[y]   (on the fly; holds K models, B x T x V logits)
        prob average    -log sum_i w_i p_i(y)            (from the cached arrays)"""
    mix = ev.members_at(pj, k, run["dir"])
    models = [ev.load(run, name, dev) for name, _ in mix]
    total, rows = 0.0, max(1, min(batch_size, logits_floats // (run["seq_len"] * models[0].cfg.vocab_size)))
    for x in window_batches(run["val"]["tokens"], run["val"]["windows"], rows, dev):
        with runtime.autocast(dev):
            z = sum(wi * m(x[:, :-1]) for (_, wi), m in zip(mix, models))  # (B, T, V)
        total -= gpt.token_logprobs(z.float(), x[:, 1:]).double().sum().item()
    return dict(k=len(mix), members=[n for n, _ in mix], weights=[wi for _, wi in mix],
                logit_avg_val=total / run["val"]["n"],
                prob_avg_val=prior.mixture_nll(ev.run_scores(run, "val"), ev.weights_of(run["names"], mix)))


@torch.no_grad()
def sample(run, pj, prompt, k, dev, new_tokens=SampleConfig.max_new_tokens, temp=SampleConfig.temperature,
           seed=SampleConfig.seed):
    """Sample from the prior's mixture at K: p = sum_i w_i softmax(z_i / temp), then a seeded multinomial draw.
    Holds K models; no KV cache (each step reruns the last seq_len tokens). -> (text, new token ids)."""
    mix = ev.members_at(pj, k, run["dir"])
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


def main(argv):
    """eval.py's report of each run, then its logit-averaging line and its sample -> {run: results}."""
    out = {}
    with runtime.session(argv, SampleConfig, __doc__) as cfg:
        done, env = ev.evaluate(cfg)
        for run, rep, pj in done:
            res = out[str(run["dir"])] = {}
            if cfg.logit_avg:
                la = res["logit_avg"] = logit_average(run, pj, cfg.logit_avg, env["device"], cfg.batch_size)
                print(f"logit vs probability averaging, prior top {la['k']} ({', '.join(la['members'])}), same weights: "
                      f"val {la['logit_avg_val']:.4f} (logit avg) vs {la['prob_avg_val']:.4f} (prob avg)")
            if cfg.max_new_tokens:
                text = sample(run, pj, cfg.prompt, cfg.k, env["device"], cfg.max_new_tokens, cfg.temperature, cfg.seed)[0]
                res["sample"] = dict(prompt=cfg.prompt, k=min(cfg.k, rep["num_members"]), text=text)
                print(f"sample (prior top {res['sample']['k']}):\n{cfg.prompt}{text}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
