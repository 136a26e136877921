"""
common.py: the runtime pieces that train.py, q0.py and eval.py share, each in one place: the error type for
"the user must fix something", the config reader (and its --help), the atomic writer, safe loading, the run lock,
the member files and their manifest, the batched window scorer, and a launch's plumbing: device, process groups,
data and run folder. No training logic.
"""
import ast
import datetime
import errno
import fcntl
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import model as gpt
import prior
from prepare_data import UserError, load_split  # the one error type: below us, so data prep needs no torch

ROOT = Path(__file__).resolve().parent  # the project's folder: provenance() asks git about it


# -----------------------------------------------------------------------------------------------------
# config: a file of `key = literal` lines (read with ast, never executed) plus --key=value flags
def parse_value(field, value, where):
    from_flag = where.startswith("from --")  # a flag's value is text; a config file's is already a literal
    if from_flag and field.type in ("bool", bool) and value.lower() in ("true", "false", "1", "0"):
        value = value.lower() in ("true", "1")
    elif from_flag and field.type not in ("str", str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    expected = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[getattr(field.type, "__name__", field.type)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError(f"config key '{field.name}' expects {expected.__name__}, got {value!r} ({where})", status=2)
    return value


def config_help(cls, doc):
    """The script's docstring, then every key with its default and the comment beside it in the class source (base
    classes first, a subclass's own keys under its name): the defaults and their meanings have one source."""
    lines, where = [], {}  # where: key -> its line's index, so a subclass's new default replaces the base's line
    for klass in [k for k in reversed(cls.__mro__) if "__dataclass_fields__" in vars(k)]:
        header = f" {klass.__name__}:" if lines else None
        for line in inspect.getsource(klass).splitlines():
            if m := re.match(r"\s{4}(\w+): \w+ = (.+?)\s*(?:#\s*(.*))?$", line):
                text = f"  --{m[1]:<26} default {m[2]:<18} {m[3] or ''}".rstrip()
                if m[1] in where:
                    lines[where[m[1]]] = text
                    continue
                if header:
                    lines.append(header)
                    header = None
                where[m[1]] = len(lines)
                lines.append(text)
            elif m := re.match(r"\s{4}# (.*)", line):
                lines.append(f" {m[1]}:")
    return "\n".join([doc.strip(), "", "config keys (a config file of `key = value` lines, then --key=value flags override):",
                      *lines])


def load_config(cls, argv, doc, modes):
    """cls() updated from a config file and --key=value flags (flags win). A config file whose mode belongs to
    the other script (`modes` are this script's) is sent there by name."""
    if not argv or argv[0] in ("-h", "--help"):
        print(config_help(cls, doc))
        raise SystemExit(0 if argv else 2)
    known = {f.name: f for f in fields(cls)}
    cfg, path, pairs = cls(), None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            return load_config(cls, [arg], doc, modes)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            pairs.append((key, value if eq else "true", f"from {arg}"))
        elif path is None:
            path = Path(arg)
        else:
            raise UserError(f"unexpected argument {arg!r}: give one config file, then --key=value flags", status=2)
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file {path} not found (the recipes are in configs/)", status=2)
        try:
            body = ast.parse(path.read_text(), str(path)).body
        except SyntaxError as e:
            raise UserError(f"{path}:{e.lineno}: not a config file of `key = value` lines ({e.msg})", status=2) from None
        seen = {}  # key -> the line that set it: a second line would silently override (or be overridden)
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                raise UserError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file", status=2)
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise UserError(f"{path}:{node.lineno}: the value of '{node.targets[0].id}' must be a literal", status=2) from None
            key = node.targets[0].id
            if key in seen:
                raise UserError(f"{path}: '{key}' is set twice, on lines {seen[key]} and {node.lineno}: keep one "
                                f"(a --{key}=value flag overrides the file)", status=2)
            seen[key] = node.lineno
            pairs.insert(0, (key, value, f"{path}:{node.lineno}"))  # file first, flags win
    mode = next((v for k, v, _ in reversed(pairs) if k == "mode"), cfg.mode)
    if mode not in modes and mode in ("single", "ensemble", "q0", "chain", "student"):  # before the other's keys fail
        script = "train.py" if mode in ("single", "ensemble") else "q0.py"
        raise UserError(f"mode {mode!r} is run by {script}: python {script} {' '.join(argv)}", status=2)
    for key, value, where in pairs:
        if key not in known:
            raise UserError(f"unknown config key '{key}' ({where}); known keys: {', '.join(known)} (--help says what each does)",
                            status=2)
        setattr(cfg, key, parse_value(known[key], value, where))
    if cfg.mode not in modes:
        raise UserError(f"config key 'mode' = {cfg.mode!r}: must be {' or '.join(modes)}", status=2)
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / (path.stem if path else "default"))
    return cfg


# -----------------------------------------------------------------------------------------------------
# files: one atomic writer; loading that never runs code and names the file when it fails
def nbytes(obj):
    """Bytes of the tensors and arrays in a (nested) object: what a save of it will roughly write."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def free_bytes(path):
    return shutil.disk_usage(path).free


def check_disk(path, size):
    """Room for size bytes at path (size x 1.1 + 1 MiB), else stop before writing anything."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {path}: {not_a_folder(Path(path).parent)} is a file, not a folder") from None
    need, free = int(size * 1.1) + (1 << 20), free_bytes(Path(path).parent)
    if free < need:
        raise UserError(f"not enough disk to write {path}: need about {need >> 20} MiB, {free >> 20} MiB free. "
                        f"Earlier files are intact; free space and re-run with --resume=True")


def not_a_folder(path):
    """The first of path and the folders above it that exists and is not a folder, else None."""
    return next((p for p in [Path(path), *Path(path).parents] if p.exists() and not p.is_dir()), None)


def atomic_write(path, write, size=0):
    """write(f) into a temporary file beside `path`, fsync, then rename over it: a kill or a full disk leaves the
    old file or the new one, never half of one. The disk must hold size x 1.1 + 1 MiB (size: bytes to write)."""
    path = Path(path)
    check_disk(path, size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # ENOSPC mid-write and the like: the old file is untouched
        raise UserError(f"could not write {path} ({e.strerror or e}). Earlier files are intact; fix it (free space?) and "
                        f"re-run with --resume=True") from None
    finally:  # also on Ctrl-C; a SIGKILL's leftover is removed by the next write of the same file (below)
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed writer of this same file
        stale.unlink(missing_ok=True)


def to_host(obj):
    """A copy of a (nested) state on the CPU, for writing while the original keeps changing."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def digest(obj, h=None):
    """sha256 of what a (nested) object holds: each tensor's dtype, shape and bytes, each array's, every other
    value's repr, dict keys in order. Taken of the object saved and again of the object loaded, so a flipped bit
    anywhere in what a load returns is caught. sha256 rather than the 2.3x faster crc32 (bench/hash_speed.py: 1.8
    vs 4.2 GB/s on one core): 8 s for a 1.8B checkpoint, on the background writer and once at resume, 2 s per
    member, small beside the training that makes them, and no 1-in-4-billion false match."""
    top, h = h is None, h or hashlib.sha256()
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())  # the bytes in place (bf16 too): no copy of a memory-mapped file
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}:".encode())
        h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            h.update(f"{k!r}=".encode())
            digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for v in obj:
            digest(v, h)
    else:
        h.update(f"{obj!r};".encode())
    return h.hexdigest() if top else h


def save_torch(obj, path):
    """A dict of tensors and plain values, with its digest under "sha256": safe_load checks it."""
    atomic_write(path, lambda f: torch.save(dict(obj, sha256=digest(obj)), f), nbytes(obj))


JSON_DIGEST = "json_sha256"  # the key under which write_json(checked=True) stores a record's sha256


def json_digest(obj):
    """sha256 of an object's JSON text: the same for the object written and the object read back (tuples become
    lists, int keys strings, floats round-trip exactly)."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def write_json(obj, path, checked=False):
    """obj as JSON. checked (obj a dict): with the sha256 of the rest as its first key (one line, so a deliberate
    edit can drop it), which read_json verifies: the small records get the check the large files have."""
    if checked:
        obj = {JSON_DIGEST: json_digest(obj), **obj}
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_array(array, path):
    """An .npy file, then its digest beside it (path + .sha256, written second: an array without one is unfinished)."""
    atomic_write(path, lambda f: np.save(f, array), array.nbytes)
    atomic_write(f"{path}.sha256", lambda f: f.write(digest(array).encode()))


def array_intact(path):
    """None when the .npy at path is unfinished or unreadable (no digest beside it: recompute it), False when it
    does not match its digest (corrupted on disk), else True."""
    try:
        want = Path(f"{path}.sha256").read_text().strip()
        return digest(np.load(path, mmap_mode="r")) == want
    except (OSError, ValueError):
        return None


def safe_load(path, what, fix="delete it and re-run with --resume=True to recompute it", check=True):
    """torch.load that never runs code from the file (weights_only), maps it instead of reading it all, and checks
    the digest save_torch stored (a file from before digests has none: loaded unchecked). check=False skips that
    check, which reads every byte: for a listing that reads no weights."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); it is truncated or "
                        f"corrupt: {fix}") from None
    want = obj.pop("sha256", None) if isinstance(obj, dict) else None
    if check and want is not None and digest(obj) != want:
        raise UserError(f"{what} {path} does not match the sha256 stored in it: its contents changed on disk since "
                        f"it was written (flipped bits, a bad copy): {fix}")
    return obj


class Changed(ValueError):
    """A JSON record that does not match the sha256 stored in it."""


def load_json(path):
    """The JSON at path, less the sha256 write_json(checked=True) stored in it; Changed when the rest does not match
    it. A record without one (written before digests, or by another writer) is returned unchecked."""
    obj = json.loads(Path(path).read_text())
    want = obj.pop(JSON_DIGEST, None) if isinstance(obj, dict) else None
    if want is not None and json_digest(obj) != want:
        raise Changed(f"it does not match the sha256 stored in it ({JSON_DIGEST}): its contents changed since it was "
                      f"written (an edit, a bad copy)")
    return obj


def read_json(path, what, fix):
    try:
        return load_json(path)
    except Changed as e:
        raise UserError(f"{what} {path}: {e}: {fix}. To keep a deliberate edit, delete its {JSON_DIGEST} line (it is "
                        f"then read unchecked)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:100]}): {fix}") from None


def lock(folder):
    """An exclusive lock on folder/lock (flock), so two trainers never write one track: the kernel releases it when
    the holder exits or dies, so a dead holder's lock is free at once. The file names the holder for the message.
    Where the file system has no flock (some Lustre and NFS mounts: ENOSYS, EOPNOTSUPP, EINVAL, ENOLCK), a lock
    file created exclusively instead (held_lock). -> an object whose close() releases the lock."""
    f = open(Path(folder) / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        busy(folder, holder)
    except OSError as e:
        f.close()
        if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOLCK):
            raise
        return held_lock(folder)
    f.seek(0)
    f.truncate()
    f.write(holder_line())
    f.flush()
    return f


def holder_line():
    return f"pid {os.getpid()} on {socket.gethostname()}\n"


def busy(folder, holder, fix=""):
    raise UserError(f"{folder} is being trained by {holder or 'another process'}: a second trainer would interleave its "
                    f"log and checkpoints. Let it finish (or stop it), then continue with --resume=True{fix}") from None


class HeldLock:
    """The lock file held_lock created: close() removes it."""

    def __init__(self, path):
        self.path = path

    def close(self):
        self.path.unlink(missing_ok=True)


def held_lock(folder):
    """The lock without flock: folder/lock.held created with O_EXCL (atomic on local disks, NFS v3+ and Lustre),
    naming its holder, removed when the lock is closed. A holder that died leaves it behind: one on this host whose
    pid is gone is taken over, with a warning; one on another host cannot be checked from here."""
    path = Path(folder) / "lock.held"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text() if path.exists() else ""
            m = re.fullmatch(r"pid (\d+) on (\S+)\n", holder)
            if not (m and m[2] == socket.gethostname() and int(m[1]) != os.getpid() and not pid_alive(int(m[1]))):
                busy(folder, holder.strip(), f" (this file system has no flock: if that process is not running, "
                                             f"delete {path})")
            aside = path.with_name(f"{path.name}.stale{os.getpid()}")
            try:
                os.rename(path, aside)  # one taker wins; a second finds the file gone, or a live holder's, and retries
            except FileNotFoundError:
                continue
            if aside.read_text() != holder:  # another taker's live lock, moved by mistake: put it back
                os.rename(aside, path)
                continue
            aside.unlink()
            print(f"warning: {path} named {holder.strip()}, which is no longer running: took the lock over",
                  file=sys.stderr, flush=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(holder_line())
        return HeldLock(path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# -----------------------------------------------------------------------------------------------------
# members: a weights file each, plus one manifest per track that lists them in order
def member_state(model):
    """The weights a member file holds: bf16 on GPU, fp32 on CPU, uncompiled names."""
    on_gpu = next(model.parameters()).is_cuda
    return {k: (v.to(torch.bfloat16) if on_gpu else v).detach().cpu().clone() for k, v in model.state_dict().items()}


def save_member(run_dir, row, model, data_meta, state):
    """A population member: its weights plus what is needed to rebuild it; then its manifest row."""
    path = Path(run_dir) / "members" / f"{row['name']}.pt"
    save_torch({"model_config": asdict(model.cfg), "model": state, "row": row,
                "data": {k: data_meta[k] for k in ("tokenizer", "vocab_size", "bos_id")}}, path)
    manifest = Path(run_dir) / f"track{row['track']}" / "manifest.json"
    # cycles count from 0 (one model) or 1 (q0): a missing manifest at a later cycle lost the rows of earlier ones
    rows = track_manifest(manifest, before_cycle=row["cycle"]) if manifest.exists() or row["cycle"] > 1 else []
    rows = [r for r in rows if r["name"] != row["name"]] + [dict(row, path=str(path.relative_to(run_dir)))]
    write_manifest(rows, manifest)  # the row appears only after its file is complete


def write_manifest(rows, manifest):
    write_json(dict(track=int(Path(manifest).parent.name[len("track"):]), rows=rows), manifest, checked=True)


def track_manifest(manifest, before_cycle=None):
    """The rows of one track's manifest.json ({track, rows, sha256}; a bare list of rows from before digests). One that
    is missing (deleted), unreadable (cut short by a full disk, say) or does not match its sha256 (edited) is derived
    again from the member files, which carry their own rows (only the cycles before before_cycle, if given: the
    later ones are being trained again), and rewritten, with a warning. A missing one no member file names is
    a track that has written none yet: no rows, no warning."""
    missing = not Path(manifest).exists()
    try:
        obj = load_json(manifest)
        return obj["rows"] if isinstance(obj, dict) else obj
    except (OSError, ValueError, KeyError) as e:
        why = "it was missing" if missing else str(e) if isinstance(e, Changed) else f"it was unreadable ({type(e).__name__})"
    run_dir, track = Path(manifest).parents[1], int(Path(manifest).parent.name[len("track"):])
    rows = []
    for path in sorted((run_dir / "members").glob("*.pt")):  # rows only: each file's weights are checked when used
        row = read_member(path, fix=f"move it aside; {manifest} is being rebuilt from the member files", check=False)["row"]
        if row["track"] == track and (before_cycle is None or row["cycle"] < before_cycle):
            rows.append(dict(row, path=str(path.relative_to(run_dir))))
    rows.sort(key=lambda r: r["cycle"])
    if missing and not rows:
        return rows
    write_manifest(rows, manifest)
    print(f"warning: {manifest}: {why}; rebuilt it from {len(rows)} member file(s)", file=sys.stderr, flush=True)
    return rows


def read_member(path, expected=None, what="member file", fix="delete it and re-run with --resume=True to recompute it",
                check=True):
    """The contents of member file `path`, which must be the member the caller means: the row stored in it (its
    manifest row, written by save_member) must carry expected's name, track and cycle (expected: a manifest row, or
    a name; default the file's own name). A valid file under another member's name (a copy, a rename) is refused."""
    ckpt = safe_load(path, what, fix, check)
    row, want = ckpt.get("row"), expected if expected is not None else Path(path).stem
    want = want if isinstance(want, dict) else {"name": want}
    if row is not None:  # every member file save_member wrote holds its row
        got = {k: row.get(k) for k in ("name", "track", "cycle") if k in want}
        if got != {k: want[k] for k in got}:
            expect = ", ".join(f"{k} {want[k]}" for k in got)
            raise UserError(f"{what} {path} holds member {row.get('name')} (track {row.get('track')}, cycle "
                            f"{row.get('cycle')}), not the expected {expect}: a valid file under another member's "
                            f"name (copied or renamed): {fix}")
    return ckpt


def read_prior(run_dir, what="prior"):
    """RUN/prior.json as eval.py wrote it, refused when its content no longer matches the sha256 stored in it (for the
    readers that use it as it is: the student's teachers, the export; eval.py refits a stale one instead)."""
    run, path = Path(run_dir), Path(run_dir) / "prior.json"
    pj = read_json(path, what, f"write it with python eval.py {run}")
    if pj.get("sha256") != prior.digest_of(pj):
        raise UserError(f"{path} does not match the sha256 eval.py stored in it (changed on disk, or written before it "
                        f"kept one): re-run python eval.py {run}, which refits it, then this command")
    return pj


def member_sha256(path):
    """The sha256 common.save_torch stored in a member file, read without rehashing (the file is mapped and only its
    small pickle read): a retrained member has another. None when the file is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("sha256")
    except Exception:
        return None


def load_member(path, device="cpu", fix="delete it and re-run with --resume=True to recompute it", expected=None):
    """(model in eval mode, file contents) of a member file, checked to be `expected` (read_member)."""
    ckpt = read_member(path, expected, fix=fix)
    if any(k.endswith((".qkv.weight", ".gate_up.weight")) for k in ckpt["model"]):
        raise UserError(f"{path} was written by model v1 (fused qkv and gate_up, logits over the padded vocab), which "
                        f"this model.py (v2) cannot read: retrain the run with this code, or read it from a checkout "
                        f"before model v2")
    model = gpt.build(gpt.GPTConfig(**ckpt["model_config"]), device)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    return model.eval(), ckpt


def read_manifest(run_dir):
    """Every member of a run, in training order (budget spent when it existed, then track, cycle)."""
    tracks = sorted(d for d in Path(run_dir).glob("track*") if re.fullmatch(r"track\d+", d.name) and d.is_dir())
    rows = [r for d in tracks for r in track_manifest(d / "manifest.json")]
    if not rows:
        raise UserError(f"no members in {run_dir}: train first (python q0.py <config> --out_dir={run_dir})")
    return sorted(rows, key=lambda r: (r["budget_epochs"], r["track"], r["cycle"]))


# -----------------------------------------------------------------------------------------------------
# scoring: every token of a split once, in windows of T+1 tokens, batched
def eval_windows(tokens, seq_len, max_tokens=0):
    """Non-overlapping windows of T+1 tokens over a split (stride T): every token after the first is scored once."""
    n = len(tokens) if not max_tokens else min(len(tokens), max_tokens + 1)
    return [(s, min(s + seq_len + 1, n)) for s in range(0, n - 1, seq_len)]


def window_batches(tokens, windows, batch_size, device):
    """Consecutive windows of equal length, batch_size at a time, as (B, T+1) int64 rows; order is kept."""
    i = 0
    while i < len(windows):
        n, j = windows[i][1] - windows[i][0], i
        while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == n:
            j += 1
        yield torch.from_numpy(np.stack([tokens[s:e] for s, e in windows[i:j]]).astype(np.int64)).to(device)
        i = j


@torch.no_grad()
def score_windows(model, tokens, windows, device, batch_size=16):
    """log p(y_t | y_<t) of every scored token of `windows` (eval_windows), in window order: (N,) float32 on the CPU."""
    was_training, out = model.training, []
    model.eval()
    for x in window_batches(tokens, windows, batch_size, device):
        with autocast(device):
            out.append(model(x[:, :-1], x[:, 1:]).float().flatten().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# -----------------------------------------------------------------------------------------------------
# device and process group
def pick_device(kind="auto"):
    """cuda (this process's LOCAL_RANK GPU), then mps, then cpu; or the one asked for, if this machine has it."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(kind):
        raise UserError(f"device {kind!r} is not available here (torch {torch.__version__}, cuda "
                        f"{'yes' if torch.cuda.is_available() else 'no'}): use --device=auto or --device=cpu", status=2)
    if kind == "cuda":  # before the first allocation: segments that grow, so eval's and training's peaks do not fragment
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """bf16 autocast on CUDA; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def init_distributed(device, timeout_minutes=180):
    """The default process group under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU. The timeout is long
    (the reference uses 3 hours) because ranks wait for one another through unequal work: one rank writing a
    checkpoint or scoring more members; NCCL's default of 10 minutes would kill the job there."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=timeout, **restart_store(world, rank, timeout))
    return world, rank


def restart_store(world, rank, timeout):
    """torchrun --max-restarts keeps one key-value store (its agent's) for every attempt and does not scope the keys
    by attempt (torch 2.5-2.13, pytorch/pytorch#135712): a restarted rank can read the dead attempt's gloo address
    or NCCL id and fail to connect ("Connection refused" or a hang: 8 of 12 test jobs, BENCHMARKS 5). On one node
    every worker is restarted together, so TORCHELASTIC_RESTART_COUNT names the attempt on every rank: scope the
    keys by it. Across nodes it does not (a healthy node restarts its workers without counting), so there the fix
    is torchrun's own: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt). -> init_process_group kwargs."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0:
            print("warning: torchrun restarted the workers on a store shared across attempts; if they fail to connect, "
                  "launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", flush=True)
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dict(store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=world)


# -----------------------------------------------------------------------------------------------------
# a launch: the process groups, the data, the run folder
def setup_distributed(cfg):
    """Process group (nccl on CUDA, gloo on CPU) and the split of the world into per-track groups."""
    device = pick_device(cfg.device)
    world, rank = init_distributed(device, cfg.dist_timeout_minutes)
    tracks = cfg.num_tracks()
    n_groups = min(world, tracks)
    group_size = world // n_groups
    group_index, group_rank = divmod(rank, group_size)
    group = None
    for g in range(n_groups if world > 1 else 0):  # every rank must create every group
        pg = dist.new_group(list(range(g * group_size, (g + 1) * group_size)),
                            timeout=datetime.timedelta(minutes=cfg.dist_timeout_minutes))  # as long as the world's
        group = pg if g == group_index else group
    return dict(
        world=world, rank=rank, device=device, group=group, group_size=group_size, group_rank=group_rank,
        my_tracks=[t for t in range(tracks) if t % n_groups == group_index],
        log=lambda msg: print(msg, flush=True) if group_rank == 0 else None,
        barrier=(lambda: dist.barrier(group=group)) if group_size > 1 else (lambda: None),
        all_reduce=(lambda t: dist.all_reduce(t, group=group)) if group_size > 1 else (lambda t: None))


def load_data(cfg):
    data = {}
    for split in ("train", "fitness", "val"):
        data[split], meta = load_split(cfg.data_dir, split)
        data[split + "_meta"] = meta
        top = int(data[split].max())  # the model's vocab comes from the meta: a token past it would crash mid-run
        if not (top < meta["vocab_size"] and meta["bos_id"] < meta["vocab_size"]):
            raise UserError(f"{Path(cfg.data_dir) / f'{split}.json'} says vocab_size {meta['vocab_size']} (bos_id "
                            f"{meta['bos_id']}) but {split}.bin holds token id {top}: the meta does not match its data; "
                            f"re-run prepare_data.py for {cfg.data_dir}")
    data["meta"] = data["train_meta"]
    tok = lambda m: (m["tokenizer"], m["vocab_size"])
    for split in ("fitness", "val"):
        if tok(data[split + "_meta"]) != tok(data["meta"]):
            raise UserError(f"{cfg.data_dir}: {split} was tokenized with {tok(data[split + '_meta'])}, train with "
                            f"{tok(data['meta'])} (tokenizer, vocab_size): re-run prepare_data.py for this folder")
    return data


def current_config(record):
    """The config a run has now: config.json's "config" (as it was first started) with the changes of each resume
    applied in order ("resumes": [{"keys": {key: [old, new]}, "at": UTC time}])."""
    config = dict(record["config"])
    for resumed in record.get("resumes", []):
        config.update({k: new for k, (_, new) in resumed["keys"].items()})
    return config


def provenance(env, data):
    """What this start ran with, for config.json's "provenance" (recorded, never compared on resume): the git commit
    and whether the checkout had changes (None outside a git checkout of this folder), Python, torch, CUDA, the GPUs
    rank 0 sees, world size, torch's thread count (float sums, so the numbers, change with it), rank 0's host, and the
    data's source, tokenizer and dataset revision from its meta."""
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
            return r.stdout if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    top_head = (git("rev-parse", "--show-toplevel", "HEAD") or "").split()
    ours = len(top_head) == 2 and Path(top_head[0]).resolve() == ROOT  # not the commit of a repository around us
    status = git("status", "--porcelain") if ours else None
    meta = data["train_meta"]
    return dict(git_commit=top_head[1] if ours else None, git_dirty=None if status is None else bool(status.strip()),
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
                world_size=env["world"], threads=torch.get_num_threads(), host=socket.gethostname(),
                data={k: meta.get(k) for k in ("source", "source_detail", "tokenizer", "dataset_revision")})


def prepare_run_dir(cfg, env, data, resume_safe_keys=(), grow_keys=None):
    """All ranks use cfg.out_dir (one deterministic name, no timestamps); rank 0 checks and writes config.json. A
    resume may change only resume_safe_keys (the script's keys that do not change what the run computes) and raise
    grow_keys ({key: refuse(old config) -> None, or why growing it would change what was computed}: a longer run
    whose first part is the finished one, bit for bit): the first config is kept and each resume that changes one
    appends {keys: {key: [old, new]}, at} to "resumes". Every
    start appends its provenance() to "provenance" with its time, unless it equals the last one there (a resume on
    the same code and machine writes nothing)."""
    run_dir = Path(cfg.out_dir)
    if blocker := not_a_folder(run_dir):  # before anything is written
        raise UserError(f"--out_dir={cfg.out_dir} cannot be a run folder: {blocker} is a file. Point --out_dir at a "
                        f"folder (a new one, or a run to continue)", status=2)
    config_path = run_dir / "config.json"
    record = dict(config=asdict(cfg), data={s: data[s + "_meta"]["sha256"] for s in ("train", "fitness", "val")})
    if env["rank"] == 0:
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        start = dict(provenance(env, data), at=at)
        record["provenance"] = [start]
        # torchrun --max-restarts passes --resume=True to its first attempt too: there, nothing to resume is fine
        first_attempt = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
        if cfg.resume and not config_path.exists() and not first_attempt:
            raise UserError(f"nothing to resume: {run_dir} holds no run ({config_path} is missing). Drop --resume=True "
                            f"to start it, or point --out_dir at the run to continue")
        if config_path.exists():
            if not cfg.resume:
                raise UserError(f"{run_dir} already holds a run: add --resume=True to continue it, or set --out_dir=<new folder>")
            old = read_json(config_path, "run record", "restore it, or start the run again in a new --out_dir")
            was = current_config(old)
            for key, value in was.items():
                now = record["config"].get(key)
                if key in (grow_keys or {}) and now > value:
                    if why := grow_keys[key](was):
                        raise UserError(f"cannot resume {run_dir}: config key '{key}' grows {value} -> {now}, but {why}. "
                                        f"Use {key}={value}, or train the longer run in a new --out_dir")
                    continue
                if key not in resume_safe_keys and json.dumps(now) != json.dumps(value):
                    raise UserError(f"cannot resume {run_dir}: config key '{key}' was {value!r}, now {now!r}, which changes "
                                    f"what the run computes. Use the original value or a new --out_dir")
            if old["data"] != record["data"]:
                raise UserError(f"cannot resume {run_dir}: the data in {cfg.data_dir} differs from the data it was trained on "
                                f"(sha256 in {config_path}). Use the original data or a new --out_dir")
            changed = {k: [was[k], v] for k, v in record["config"].items()
                       if k in was and k != "resume" and json.dumps(was[k]) != json.dumps(v)}
            starts = old.get("provenance", [])
            moved = not starts or dict(starts[-1], at=at) != start  # another commit, machine, thread count, ...
            record = dict(old, provenance=starts + [start] if moved else starts) if changed or moved else None
            if changed:
                record["resumes"] = old.get("resumes", []) + [dict(keys=changed, at=at)]
        if record:  # a resume that changes nothing leaves config.json as it is
            write_json(record, config_path, checked=True)
    if env["world"] > 1:
        dist.barrier()
    if not config_path.is_file():  # rank 0 wrote it: a node that cannot see it would train its tracks apart
        raise UserError(f"{config_path}, written by rank 0, is not visible to rank {env['rank']}: the run folder must be "
                        f"on a file system every node sees (a node given another trajectory after a restart would "
                        f"otherwise find no checkpoint and start it over)")
