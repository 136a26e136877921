"""
store.py: every file a run keeps, written so that a kill, a full disk or a flipped bit never passes for a result.

- atomic_write: a temporary file beside the target, fsync, rename: the old file or the new one, never half.
- digest: the sha256 of what an object holds; save_torch / safe_load, write_json / read_json and save_array /
  array_intact store it beside (or inside) the file and check it on every read.
- members: members/<name>.pt (weights, the config to rebuild them, the manifest row) and track<i>/manifest.json (the
  rows in order, rebuilt from the member files when damaged); read_member refuses a valid file under another name.
- lock: one trainer per track (flock, or an exclusive lock file where the file system has none).
- provenance: what a start ran with (git commit, versions, devices, thread count, data source), for config.json.
"""
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import model as gpt
from config import UserError, one_line

ROOT = Path(__file__).resolve().parent  # the project's folder: provenance() asks git about it


# -----------------------------------------------------------------------------------------------------
# writing: one atomic writer; the digest every saved file carries
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
        sizes = [f"{n / 2**20:,.0f} MiB" if n >= 10 << 20 else f"{n / 2**10:,.0f} KiB" for n in (need, free)]
        sizes = sizes if sizes[0] != sizes[1] else [f"{need:,} bytes", f"{free:,} bytes"]
        raise UserError(f"not enough disk to write {path}: need about {sizes[0]}, {sizes[1]} free. Earlier files are "
                        f"intact: free space", rerun=True)


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
        raise UserError(f"could not write {path} ({e.strerror or e}). Earlier files are intact: fix that (free space?)",
                        rerun=True) from None
    finally:  # also on Ctrl-C; a SIGKILL's leftover is removed by the next write of the same file (below)
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed writer of this same file; another live
        pid = stale.name.rsplit(".tmp", 1)[1]             # process's write in flight (two eval.py --score) is not stale
        if not (pid.isdigit() and pid_alive(int(pid))):
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


# -----------------------------------------------------------------------------------------------------
# reading: never runs code from a file, names the file and the fix when it fails
def safe_load(path, what, fix="delete it and re-run with --resume=True to recompute it", check=True):
    """torch.load that never runs code from the file (weights_only), maps it instead of reading it all, and checks
    the digest save_torch stored. check=False skips that check, which reads every byte: for a listing that reads no
    weights."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); it is truncated or "
                        f"corrupt: {fix}") from None
    want = obj.pop("sha256", None) if isinstance(obj, dict) else None
    if check and (want is None or digest(obj) != want):
        raise UserError(f"{what} {path} does not match the sha256 stored in it: its contents changed on disk since "
                        f"it was written (flipped bits, a bad copy): {fix}")
    return obj


class Changed(ValueError):
    """A JSON record that does not match the sha256 stored in it."""


def load_json(path):
    """The JSON at path, less the sha256 write_json(checked=True) stored in it; Changed when the rest does not match
    it. A record without one (its line deleted to keep a deliberate edit, or another writer's) is returned unchecked."""
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


# -----------------------------------------------------------------------------------------------------
# the token files prepare_data.py writes: {split}.bin (raw little-endian tokens) and {split}.json (the meta)
FORMAT_VERSION = 1
META_KEYS = ("format_version", "split", "source", "source_detail", "tokenizer", "vocab_size", "bos_id", "dtype",
             "num_tokens", "num_docs", "doc_starts", "sha256")


def _sha256_file(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_split(data_dir, split, verify=True):
    """-> (tokens: read-only 1-D np.memmap, meta: dict), after checking the meta, the file size, the doc starts
    and (verify=True) the sha256. Anything wrong raises UserError naming the file and the fix."""
    data_dir = Path(data_dir)
    meta_path, bin_path = data_dir / f"{split}.json", data_dir / f"{split}.bin"
    meta = {}

    def fail(path, problem):
        known = {"source", "tokenizer"} <= meta.keys()
        flags = f"--source {meta['source']} --tokenizer {meta['tokenizer']} " if known else ""
        raise UserError(f"{path}: {problem}; re-run `python prepare_data.py {flags}--out_dir {data_dir}` "
                        f"with the flags that made it")

    if not meta_path.is_file():
        fail(meta_path, "missing")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as e:
        meta = {}
        fail(meta_path, f"not a meta file ({one_line(e)})")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        fail(meta_path, f"missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION or meta["split"] != split or meta["dtype"] not in ("uint16", "uint32"):
        fail(meta_path, f"format_version/split/dtype {meta['format_version']}/{meta['split']}/{meta['dtype']} "
                        f"are not {FORMAT_VERSION}/{split}/uint16|uint32")
    n = meta["num_tokens"]
    try:
        starts = np.asarray(meta["doc_starts"], dtype=np.int64)
        ok = (n > 0 and starts.ndim == 1 and len(starts) == meta["num_docs"] > 0 and starts[0] == 0
              and starts[-1] < n and np.all(np.diff(starts) > 0))
    except (TypeError, ValueError):  # a hand-edited meta with the wrong types
        ok = False
    if not ok:
        fail(meta_path, f"num_tokens {n}, num_docs {meta['num_docs']} and doc_starts disagree")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if not bin_path.is_file():
        fail(bin_path, "missing")
    size = bin_path.stat().st_size
    if size != n * dtype.itemsize:
        fail(bin_path, f"{size:,} bytes, but meta says {n:,} tokens x {dtype.itemsize} bytes (truncated or stale?)")
    if verify and _sha256_file(bin_path) != meta["sha256"]:
        fail(bin_path, "sha256 differs from the meta's (corrupt, or written by another run)")
    return np.memmap(bin_path, dtype=dtype, mode="r"), meta


# -----------------------------------------------------------------------------------------------------
# the run lock
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
    """The rows of one track's manifest.json ({track, rows, sha256}). One that is missing (deleted), unreadable (cut short by a full disk, say) or does not match its sha256 (edited) is derived
    again from the member files, which carry their own rows (only the cycles before before_cycle, if given: the
    later ones are being trained again), and rewritten, with a warning. A missing one no member file names is
    a track that has written none yet: no rows, no warning."""
    missing = not Path(manifest).exists()
    try:
        return load_json(manifest)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
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


def read_manifest(run_dir):
    """Every member of a run, in training order (budget spent when it existed, then track, cycle)."""
    tracks = sorted(d for d in Path(run_dir).glob("track*") if re.fullmatch(r"track\d+", d.name) and d.is_dir())
    rows = [r for d in tracks for r in track_manifest(d / "manifest.json")]
    if not rows:
        raise UserError(f"no members in {run_dir}: train first (python q0.py <config> --out_dir={run_dir})")
    return sorted(rows, key=lambda r: (r["budget_epochs"], r["track"], r["cycle"]))


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


def member_sha256(path):
    """The sha256 save_torch stored in a member file, read without rehashing (the file is mapped and only its
    small pickle read): a retrained member has another. None when the file is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("sha256")
    except Exception:
        return None


def load_member(path, device="cpu", fix="delete it and re-run with --resume=True to recompute it", expected=None):
    """(model in eval mode, file contents) of a member file, checked to be `expected` (read_member)."""
    ckpt = read_member(path, expected, fix=fix)
    model = gpt.build(gpt.GPTConfig(**ckpt["model_config"]), device)
    try:
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    except RuntimeError as e:  # another model.py's weights (model v1's fused qkv, say)
        raise UserError(f"{path} does not fit this model.py ({str(e).strip().splitlines()[0][:120]}): it was written by "
                        f"another version of the model; retrain the run with this code") from None
    return model.eval(), ckpt


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
