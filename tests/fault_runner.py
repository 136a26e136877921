"""Run train.py, eval.py or prior.py with one fault armed: SIGKILL at an exact point, after leaving the partial
file a real crash would leave. The production scripts carry no fault code; this wrapper patches one function.

    python tests/fault_runner.py FAULT SCRIPT [args...]        # SCRIPT: train | eval | prior
    torchrun --standalone --nproc_per_node=2 tests/fault_runner.py FAULT train [args...]

FAULT is KIND:TARGET:N[:rank=R], armed on the Nth call (1-based) that matches TARGET:
    save:GLOB:N        torch.save to a path matching GLOB: write half the bytes to that (temporary) path, then die
    json:GLOB:N        train.atomic_write_json to GLOB: write half the JSON to its .tmp name, then die (no rename)
    after_json:GLOB:N  train.atomic_write_json to GLOB: write it completely (renamed), then die
    pjson:GLOB:N       prior.write_json_atomic to GLOB: write half the JSON to its temporary name, then die
    npy:GLOB:N         eval.save_atomic to GLOB: write half the .npy to its temporary name, then die
    call:MOD.ATTR:N    die on entering the Nth call of MOD.ATTR (e.g. torch.optim.Muon.step: mid-step)
rank=R arms it on that global rank only; under torchrun it is armed in the first attempt only
(TORCHELASTIC_RESTART_COUNT 0), so a restarted worker runs clean."""
import fnmatch
import importlib
import io
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def write_half(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())


def counter(pattern, n):
    """-> hit(path): True on the nth call whose path matches the glob pattern."""
    seen = [0]

    def hit(path):
        if fnmatch.fnmatch(str(path), pattern):
            seen[0] += 1
            return seen[0] == n
        return False
    return hit


def arm(kind, target, n):
    import torch
    if kind == "save":
        real, hit = torch.save, counter(target, n)

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and hit(f):
                buf = io.BytesIO()
                real(obj, buf, *args, **kwargs)
                write_half(f, buf.getvalue())
                die()
            return real(obj, f, *args, **kwargs)
        torch.save = save
    elif kind in ("json", "after_json"):
        import train
        real, hit = train.atomic_write_json, counter(target, n)

        def atomic_write_json(obj, path):
            if hit(path):
                if kind == "json":
                    write_half(Path(path).with_name(Path(path).name + ".tmp"), json.dumps(obj, indent=1).encode())
                else:
                    real(obj, path)
                die()
            return real(obj, path)
        train.atomic_write_json = atomic_write_json
    elif kind == "pjson":
        import prior
        real, hit = prior.write_json_atomic, counter(target, n)

        def write_json_atomic(path, obj):
            if hit(path):
                path = Path(path)
                write_half(path.with_name(f".{path.name}.tmp{os.getpid()}"), json.dumps(obj, indent=1).encode())
                die()
            return real(path, obj)
        prior.write_json_atomic = write_json_atomic
    elif kind == "npy":
        import numpy as np
        import eval as ev
        real, hit = ev.save_atomic, counter(target, n)

        def save_atomic(path, array):
            if hit(path):
                buf = io.BytesIO()
                np.save(buf, array)
                write_half(path.with_name(f".{path.name}.tmp{os.getpid()}"), buf.getvalue())
                die()
            return real(path, array)
        ev.save_atomic = save_atomic
    elif kind == "call":
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest importable prefix is the module
            try:
                owner = importlib.import_module(".".join(parts[:i]))
                attrs = parts[i:]
                break
            except ImportError:
                continue
        else:
            raise SystemExit(f"fault_runner: cannot import {target}")
        for a in attrs[:-1]:
            owner = getattr(owner, a)
        real, calls = getattr(owner, attrs[-1]), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return real(*args, **kwargs)
        setattr(owner, attrs[-1], wrapper)
    else:
        raise SystemExit(f"fault_runner: unknown fault kind {kind!r}")


def main(argv):
    fault, script, args = argv[0], argv[1], argv[2:]
    kind, target, n, *opts = fault.split(":")
    rank = dict(o.split("=") for o in opts).get("rank")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and (rank is None or rank == os.environ.get("RANK", "0")):
        arm(kind, target, int(n))
    module = importlib.import_module(script)
    module.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
