"""Run q0.py, train.py, eval.py (or another entry point) with one fault armed: SIGKILL at an exact point, after leaving the
partial file a real crash would leave. The production scripts carry no fault code; this wrapper patches one function.

    python tests/fault_runner.py FAULT SCRIPT [args...]        # SCRIPT: q0 | train | eval | variants | student
    torchrun --standalone --nproc_per_node=2 tests/fault_runner.py FAULT q0 [args...]

FAULT is KIND:TARGET:N[:rank=R], armed on the Nth call (1-based) that matches TARGET:
    write:GLOB:N        store.atomic_write to a path matching GLOB (checkpoints, members, manifests, logs, scores,
                        JSON): write half the bytes to its temporary name, then die (no rename)
    after_write:GLOB:N  store.atomic_write to GLOB: write it completely (renamed), then die
    call:MOD.ATTR:N     die on entering the Nth call of MOD.ATTR (e.g. torch.optim.Muon.step: mid-step); an ATTR
                        that is a dict is entered by key (prior.FITS.adamw: the fit registry's AdamW)
    signal:GLOB:N:sig=INT|TERM   send this process SIGINT or SIGTERM in the middle of that write (half written to its
                        temporary name), then let the write go on: a signal arriving while a file is written
rank=R arms it on that global rank only; under torchrun it is armed in the first attempt only
(TORCHELASTIC_RESTART_COUNT 0), so a restarted worker runs clean."""
import fnmatch
import importlib
import io
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


def arm(kind, target, n, opts=None):
    if kind == "signal":
        import store
        real, hit, sig = store.atomic_write, counter(target, n), getattr(signal, f"SIG{(opts or {}).get('sig', 'INT')}")

        def atomic_write(path, write, size=0):
            if hit(path):
                def write_and_signal(f):
                    buf = io.BytesIO()
                    write(buf)
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2])
                    os.kill(os.getpid(), sig)
                    f.write(data[len(data) // 2:])
                return real(path, write_and_signal, size)
            return real(path, write, size)
        store.atomic_write = atomic_write
    elif kind in ("write", "after_write"):
        import store  # every writer calls store.atomic_write by that name, so the patch reaches them all
        real, hit = store.atomic_write, counter(target, n)

        def atomic_write(path, write, size=0):
            if hit(path):
                if kind == "write":
                    buf = io.BytesIO()
                    write(buf)
                    path = Path(path)
                    write_half(path.with_name(f".{path.name}.tmp{os.getpid()}"), buf.getvalue())
                else:
                    real(path, write, size)
                die()
            return real(path, write, size)
        store.atomic_write = atomic_write
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
        get = lambda owner, a: owner[a] if isinstance(owner, dict) else getattr(owner, a)
        for a in attrs[:-1]:
            owner = get(owner, a)
        real, calls = get(owner, attrs[-1]), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return real(*args, **kwargs)
        if isinstance(owner, dict):
            owner[attrs[-1]] = wrapper
        else:
            setattr(owner, attrs[-1], wrapper)
    else:
        raise SystemExit(f"fault_runner: unknown fault kind {kind!r}")


def main(argv):
    fault, script, args = argv[0], argv[1], argv[2:]
    kind, target, n, *opts = fault.split(":")
    opts = dict(o.split("=") for o in opts)
    rank = opts.get("rank")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and (rank is None or rank == os.environ.get("RANK", "0")):
        arm(kind, target, int(n), opts)
    module = importlib.import_module(script)
    module.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
