"""
bench/hash_speed.py: what the checksum of every member, checkpoint and score file costs (issue 17). Hashes one
buffer of --mib MiB with sha256, blake2b and crc32 (hashlib / zlib, the standard library) and runs store.digest (the
sha256 that save_torch stores and safe_load checks) on a state of that size; medians of --rounds, GB/s; then what
that rate means for the 1.8B model's files (sizes from model.py's parameter counts, not from files on disk).

    OMP_NUM_THREADS=1 python bench/hash_speed.py --mib 1024 --rounds 5
"""
import argparse
import hashlib
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as gpt  # noqa: E402
from store import digest  # noqa: E402


def rate(fn, nbytes, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def sizes_1p8b():
    """Bytes of the 1.8B files: a member is bf16 weights (2 B/param); a checkpoint is fp32 weights, Muon's momentum
    on the hidden matrices (4 B each) and AdamW's two moments on the rest (8 B each)."""
    with torch.device("meta"):
        m = gpt.GPT(gpt.config_for("1.8B", vocab_size=50257, seq_len=2048))
    params = sum(p.numel() for p in m.parameters())
    hidden = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks."))  # Muon's, as train.py
    return dict(member=2 * params, checkpoint=4 * params + 4 * hidden + 8 * (params - hidden))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.mib << 20
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8).numpy()
    state = {f"layer{i}": torch.from_numpy(buf[i * (n // 8):(i + 1) * (n // 8)]).view(torch.bfloat16) for i in range(8)}
    gbs = {"sha256": rate(lambda: hashlib.sha256(buf).digest(), n, args.rounds),
           "blake2b": rate(lambda: hashlib.blake2b(buf).digest(), n, args.rounds),
           "crc32": rate(lambda: zlib.crc32(buf), n, args.rounds),
           "store.digest (sha256 of a bf16 state)": rate(lambda: digest(state), n, args.rounds)}
    print(f"| hash | GB/s ({args.mib} MiB, median of {args.rounds}) |\n|---|---|")
    for k, v in gbs.items():
        print(f"| {k} | {v:.2f} |")
    files = sizes_1p8b()
    r = gbs["store.digest (sha256 of a bf16 state)"]
    print("\n| 1.8B file | GB | digest at the rate above (s) |\n|---|---|---|")
    for k, b in files.items():
        print(f"| {k} | {b / 1e9:.1f} | {b / 1e9 / r:.1f} |")
    print(json.dumps(dict(gb_per_s={k: round(v, 3) for k, v in gbs.items()}, bytes_1p8b=files)))


if __name__ == "__main__":
    main()
