"""config.json's "provenance" (runtime.prepare_run_dir): what each start ran with, recorded and never compared on
resume. Calls prepare_run_dir directly on a hand-made data record: no training, milliseconds."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import runtime  # noqa: E402
import store  # noqa: E402
import train  # noqa: E402

ENV = dict(rank=0, world=1)
META = dict(sha256="ab" * 32, source="fineweb", source_detail="HuggingFaceFW/fineweb/sample-10BT", tokenizer="gpt2",
            dataset_revision="main")
DATA = {f"{s}_meta": META for s in ("train", "fitness", "val")}


def start(run_dir, **flags):
    cfg = train.Config(out_dir=str(run_dir), data_dir="data/x", **flags)
    runtime.prepare_run_dir(cfg, ENV, DATA)
    return store.load_json(run_dir / "config.json")


def test_config_json_records_the_provenance_of_each_start(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = start(run)
    (p,) = first["provenance"]
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    if git("rev-parse", "--show-toplevel") and Path(git("rev-parse", "--show-toplevel")).resolve() == ROOT.resolve():
        assert p["git_commit"] == git("rev-parse", "HEAD") and p["git_dirty"] == bool(git("status", "--porcelain"))
    assert p["python"] == sys.version.split()[0] and p["torch"] == torch.__version__ and p["cuda"] == torch.version.cuda
    assert p["world_size"] == 1 and p["threads"] == torch.get_num_threads() and isinstance(p["gpus"], list)
    assert p["data"] == dict(source="fineweb", source_detail="HuggingFaceFW/fineweb/sample-10BT", tokenizer="gpt2",
                             dataset_revision="main")
    assert p["host"] and p["at"].endswith("+00:00")
    written = (run / "config.json").read_bytes()
    start(run, resume=True)  # the same code on the same machine: nothing to record, nothing written
    assert (run / "config.json").read_bytes() == written
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # another machine's thread count: recorded, not refused
    record = start(run, resume=True, log_every=5)
    assert [x["threads"] for x in record["provenance"]] == [p["threads"], 7]
    assert record["resumes"][-1]["keys"]["log_every"][1] == 5 and record["config"] == first["config"]


def test_outside_a_git_checkout_there_is_no_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROOT", tmp_path)  # a copy of the code that is no git checkout
    (p,) = start(tmp_path / "run")["provenance"]
    assert p["git_commit"] is None and p["git_dirty"] is None
