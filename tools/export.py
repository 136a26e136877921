"""
tools/export.py: a member, or the learned prior's mixture at K, as model.safetensors + config.json: the format the
tools researchers already use read without pickle (safetensors: a JSON header and raw little-endian tensors).

    python tools/export.py runs/quickstart --member t0-c016        # one member  -> runs/quickstart/export/t0-c016/
    python tools/export.py runs/quickstart --k 4                   # prior's top 4 -> runs/quickstart/export/top4/
    python tools/export.py runs/quickstart --k 4 --out /tmp/q0-top4

model.safetensors holds the tensors exactly as the member file stores them (fp32 from CPU runs, bf16 from GPU runs):
one member under its state_dict names (embed.weight, blocks.0.attn.q.weight, ...), K members as
members.{i}.{name} in the mixture's order (the order picked). config.json holds the model config, the tokenizer (name,
vocab_size, bos_id; "byte": UTF-8 bytes 0-255 and BOS 256, "gpt2": tiktoken's gpt2 encoding, BOS <|endoftext|>
50256), each member's name, prior weight and member-file sha256, and the sha256 of model.safetensors. Check an
export with standard tools, no q0 code:

    sha256sum OUT/model.safetensors                               # == "safetensors_sha256" in OUT/config.json
    python -c "from safetensors import safe_open; f = safe_open('OUT/model.safetensors', 'pt'); \\
               print(f.metadata(), {k: f.get_slice(k).get_shape() for k in f.keys()})"

load_export(OUT) rebuilds the models with model.py: every tensor and every logit equal to store.load_member's.
The mixture's next-token distribution is sum_i w_i softmax(z_i) (probability averaging, as eval.py scores it).
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: the project's modules are one up
import eval as ev  # noqa: E402
import model as gpt  # noqa: E402
import runtime  # noqa: E402
import store  # noqa: E402
from config import UserError  # noqa: E402


@dataclass
class ExportConfig:
    run: str = ""                    # a run folder (for --k: evaluated, with prior.json from eval.py)
    member: str = ""                 # one member by name (members/NAME.pt) ...
    k: int = 0                       # ... or the prior's mixture at K members (eval.members_at)
    out: str = ""                    # output folder ("": RUN/export/NAME or RUN/export/topK)
    ARGS = "run"                     # not a key: the plain argument is the run folder

FORMAT = "q0-safetensors/1"


def prior_mixture(run, k):
    """[(name, weight), ...]: RUN/prior.json's mixture at K (eval.members_at), refused when the file was changed on
    disk or is stale for a member file retrained since it was fit, and for a K above the run's number of members
    (members_at would give all of them, under a name that promises K)."""
    pj = ev.read_prior(run)
    if k > len(pj["members"]):
        raise UserError(f"--k {k}: {run} has {len(pj['members'])} member(s) (its prior.json): give --k 1 to "
                        f"{len(pj['members'])}", status=2)
    try:
        mix = ev.members_at(pj, k, run)
    except (FileNotFoundError, ValueError) as e:  # a K prior.json lacks, its fitness scores missing or damaged
        raise UserError(f"--k {k}: {e}") from None
    ev.check_fit_on(run, pj, [n for n, _ in mix])
    return mix, pj


def read_members(run, mix):
    """The member files of a mixture, checked: their sha256 (safe_load), their name, finite weights, one model config
    (prior_mixture checked they are the files the prior was fit on). -> [ckpt, ...] with ckpt["sha256"] added."""
    ckpts = []
    for name, _ in mix:
        path = run / "members" / f"{name}.pt"
        if not path.is_file():
            raise UserError(f"member file {path} not found (members of {run}: {', '.join(sorted(p.stem for p in (run / 'members').glob('*.pt'))) or 'none'})")
        sha = store.member_sha256(path)
        ckpt = dict(store.read_member(path, name, fix="retrain it, or export another member"), sha256=sha)
        bad = [key for key, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise UserError(f"member {name} ({path}) holds non-finite weights (the first {bad[0]}): export another member")
        if ckpts and ckpt["model_config"] != ckpts[0]["model_config"]:
            raise UserError(f"members {mix[0][0]} and {name} have different model configs: export them one at a time")
        ckpts.append(ckpt)
    return ckpts


def export(run, out, member=None, k=None):
    """Write OUT/model.safetensors and OUT/config.json for one member or the prior's mixture at K. -> the config dict."""
    run, out = Path(run), Path(out)
    mix, pj = ([(member, 1.0)], None) if member is not None else prior_mixture(run, k)
    ckpts = read_members(run, mix)
    one = member is not None
    tensors = {(key if one else f"members.{i}.{key}"): v.contiguous()
               for i, ckpt in enumerate(ckpts) for key, v in ckpt["model"].items()}
    blob = st_save(tensors, metadata={"format": "pt", "q0_format": FORMAT})
    store.atomic_write(out / "model.safetensors", lambda f: f.write(blob), len(blob))
    data = ckpts[0]["data"]
    config = dict(format=FORMAT, source_run=str(run), model_config=ckpts[0]["model_config"],
                  dtype=str(next(iter(ckpts[0]["model"].values())).dtype).removeprefix("torch."),
                  tokenizer=dict(name=data["tokenizer"], vocab_size=data["vocab_size"], bos_id=data["bos_id"]),
                  prior=None if one else dict(k=len(mix), method=pj["method"], prior_sha256=pj["sha256"]),
                  members=[dict(name=n, weight=w, prefix="" if one else f"members.{i}.", member_sha256=c["sha256"],
                                row=c["row"]) for i, ((n, w), c) in enumerate(zip(mix, ckpts))],
                  safetensors_sha256=hashlib.sha256(blob).hexdigest())
    store.write_json(config, out / "config.json")
    return config


def load_export(folder, device="cpu"):
    """An export folder -> ([(model in eval mode, weight), ...], config): model.safetensors checked against the sha256
    in config.json, read without pickle, each member rebuilt with model.py as store.load_member does."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    blob = (folder / "model.safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != config["safetensors_sha256"]:
        raise UserError(f"{folder / 'model.safetensors'} does not match the sha256 in its config.json: changed since "
                        f"it was exported; export it again")
    tensors, out = st_load(blob), []
    for m in config["members"]:
        model = gpt.build(gpt.GPTConfig(**config["model_config"]), device)
        n = len(m["prefix"])
        model.load_state_dict({key[n:]: v.float() for key, v in tensors.items() if key.startswith(m["prefix"])})
        out.append((model.eval(), m["weight"]))
    return out, config


def main(argv=None):
    with runtime.session(sys.argv[1:] if argv is None else argv, ExportConfig, __doc__) as cfg:
        if bool(cfg.member) == bool(cfg.k):
            raise UserError("give one of --member NAME or --k K", status=2)
        out = cfg.out or Path(cfg.run) / "export" / (cfg.member or f"top{cfg.k}")
        config = export(cfg.run, out, cfg.member or None, cfg.k)
        names = ", ".join(f"{m['name']} {m['weight']:.4f}" for m in config["members"])
        print(f"wrote {out}/model.safetensors ({config['dtype']}; {names}) and config.json | sha256 "
              f"{config['safetensors_sha256']}")
        return config


if __name__ == "__main__":
    main()
