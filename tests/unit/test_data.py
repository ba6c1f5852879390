"""Data: shards hold exactly the tokenized documents, the split is by document, the loader is
indexed by step (deterministic, resumable, the same global batch on any number of processes),
and every user error is one line naming the file."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_jax.config import DataConfig
from atlas_jax.data import corpora, prepare as prep
from atlas_jax.data.loader import make_train_iterator, val_batches
from atlas_jax.data.prepare import ensure_prepared, iter_pieces, load_split, prepare, read_meta
from atlas_jax.errors import ConfigError, DataError
from atlas_jax.tokenizer import Tokenizer, train_tokenizer

QUIET = {"log": lambda _: None}
WORDS = "the of and to a in that is was he for it with as his on be at by I had not are but from or have".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(5, 80))) + ("\n" if i % 3 else "\n  end")
            for i in range(n)]


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _split_on_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == eos)
    assert len(cuts) and cuts[-1] == len(tokens) - 1, "each segment ends with EOS"
    return [t.tolist() for t in np.split(tokens, cuts + 1)[:-1]]


def _cfg(tok: Tokenizer, sources, **kw) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], tokenizer=str(tok.path), **{"num_workers": 1, **kw})


# --------------------------------------------------------------------------- shards


def test_tinyshakespeare_shards_decode_to_the_file_and_val_is_its_tail(
        shakespeare_data_dir, shakespeare_tokenizer, shakespeare_path):
    tok, text = shakespeare_tokenizer, shakespeare_path.read_text(encoding="utf-8")
    train, val = load_split(shakespeare_data_dir, "train"), load_split(shakespeare_data_dir, "val")
    assert train.dtype == np.uint16 and (train == tok.eos_id).sum() == 1 and (val == tok.eos_id).sum() == 1
    head, tail = tok.decode(train), tok.decode(val)
    assert head + tail == text
    assert head.endswith("\n"), "the cut is at a line boundary"
    cut = len(head.encode("utf-8"))
    target = 0.9 * len(text.encode("utf-8"))
    assert text.rfind("\n", 0, int(target)) + 1 <= cut <= text.find("\n", int(target)) + 1, "nearest line boundary"
    # Tokenizing in line-bounded pieces gives the tokens of the whole text.
    assert train[:-1].tolist() + val[:-1].tolist() == tok.encode(text)
    meta = read_meta(shakespeare_data_dir)
    assert meta["splits"]["train"]["bytes"] == cut and meta["splits"]["val"]["tokens"] == len(val)
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["sources"][0]["sha256"] == corpora.CORPORA[
        "tinyshakespeare"].sha256


def test_jsonl_documents_are_split_whole_and_tokenized_exactly(shakespeare_tokenizer, tmp_path):
    tok, docs = shakespeare_tokenizer, _docs(60)
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    meta = prepare(_cfg(tok, [src], val_fraction=0.2), tmp_path / "d", **QUIET)
    train = _split_on_eos(load_split(tmp_path / "d", "train"), tok.eos_id)
    val = _split_on_eos(load_split(tmp_path / "d", "val"), tok.eos_id)
    expected = {tuple(tok.encode(d)): i for i, d in enumerate(docs)}
    train_ids = [expected[tuple(t[:-1])] for t in train]
    val_ids = [expected[tuple(t[:-1])] for t in val]
    assert sorted(train_ids + val_ids) == list(range(len(docs))), "every document once, in one split"
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids), "corpus order within a split"
    val_bytes = sum(len(docs[i].encode()) for i in val_ids)
    assert meta["splits"]["val"]["bytes"] == val_bytes
    assert abs(val_bytes / sum(len(d.encode()) for d in docs) - 0.2) < 0.05
    other = prepare(_cfg(tok, [src], val_fraction=0.2, split_seed=1), tmp_path / "d1", **QUIET)
    assert other["splits"]["val"]["bytes"] != val_bytes, "the split seed picks other documents"


def test_txt_separator_splits_documents_across_read_pieces(shakespeare_tokenizer, tmp_path, monkeypatch):
    tok, docs = shakespeare_tokenizer, _docs(40, seed=3)
    sep = "\n<|doc|>\n"
    src = tmp_path / "a.txt"
    src.write_text(sep + sep.join(docs) + sep + sep, encoding="utf-8")  # empty documents are dropped
    monkeypatch.setattr(prep, "READ_BYTES", 97)  # many pieces: separators straddle read boundaries
    monkeypatch.setattr(prep, "BYTES_PER_WORKER", 1)  # and many tasks go through two worker processes
    logs = []
    prepare(_cfg(tok, [src], doc_separator=sep, num_workers=2), tmp_path / "d", log=logs.append)
    assert any("in 2 process(es)" in line for line in logs)
    monkeypatch.setattr(prep, "READ_BYTES", 1 << 18)
    segments = (_split_on_eos(load_split(tmp_path / "d", "train"), tok.eos_id)
                + _split_on_eos(load_split(tmp_path / "d", "val"), tok.eos_id))
    assert sorted(tok.decode(s) for s in segments) == sorted(docs)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["ab", "c\n", "\n", "日本\n", "SEP", "SE", "P\n", " "]), max_size=60).map("".join),
       st.sampled_from(["SEP", "\n\n", "P\nS"]), st.integers(4, 16))
def test_documents_read_in_pieces_equal_a_plain_split(tmp_path_factory, text, sep, read_bytes):
    path = tmp_path_factory.mktemp("sep") / "x.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prep, "READ_BYTES", read_bytes)
        docs, current = [], ""
        for piece, end in iter_pieces(path, DataConfig(doc_separator=sep)):
            current += piece
            if end:
                docs.append(current)
                current = ""
    assert current == "" and docs == [d for d in text.split(sep) if d]


def test_line_split_is_the_same_for_any_read_size(shakespeare_tokenizer, shakespeare_data_dir, tmp_path,
                                                  monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 3001)
    prepare(_cfg(shakespeare_tokenizer, ["tinyshakespeare"]), tmp_path / "d", **QUIET)
    for split in ("train", "val"):
        np.testing.assert_array_equal(load_split(tmp_path / "d", split), load_split(shakespeare_data_dir, split))


def test_token_dtype_is_uint32_above_65535_pieces(shakespeare_tokenizer, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto.FromString(shakespeare_tokenizer.path.read_bytes())
    for i in range(70_000 - len(model.pieces)):  # unused pieces: never produced by encode
        model.pieces.add(piece=f"<unused{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    big = tmp_path / "big.model"
    big.write_bytes(model.SerializeToString())
    src = _write_jsonl(tmp_path / "d.jsonl", _docs(10))
    meta = prepare(_cfg(Tokenizer.load(big), [src]), tmp_path / "d", 70_000, **QUIET)
    assert meta["dtype"] == "uint32" and load_split(tmp_path / "d", "train").dtype == np.uint32
    assert read_meta(tmp_path / "d")["vocab_size"] == 70_000
    assert prep.token_dtype(65535) == "uint16" and prep.token_dtype(65536) == "uint32"


def test_ensure_prepared_is_quick_when_fresh_and_redoes_stale_shards(shakespeare_tokenizer, tmp_path):
    tok, src = shakespeare_tokenizer, tmp_path / "a.txt"
    src.write_text("one line\nanother line\n" * 50, encoding="utf-8")
    cfg, data_dir, logs = _cfg(tok, [src]), tmp_path / "d", []
    first = ensure_prepared(cfg, 512, data_dir, log=logs.append)
    mtime = (data_dir / "train.bin").stat().st_mtime_ns
    assert ensure_prepared(cfg, 512, data_dir, log=logs.append) == first
    assert "up to date" in logs[-1] and (data_dir / "train.bin").stat().st_mtime_ns == mtime
    src.write_text("changed text\n" * 80, encoding="utf-8")
    second = ensure_prepared(cfg, 512, data_dir, log=logs.append)
    assert second["sources"][0]["sha256"] != first["sources"][0]["sha256"]
    assert tok.decode(load_split(data_dir, "train")) + tok.decode(load_split(data_dir, "val")) == "changed text\n" * 80


def test_ensure_prepared_trains_the_tokenizer_when_none_is_named(shakespeare_tokenizer, shakespeare_data_dir, tmp_path):
    meta = ensure_prepared(DataConfig(num_workers=1), 512, tmp_path, **QUIET)
    # The same corpus, vocab and seed as the session tokenizer: the same model bytes and shards.
    assert Tokenizer.load(tmp_path / "tokenizer.model").sha256 == shakespeare_tokenizer.sha256
    assert meta["splits"] == read_meta(shakespeare_data_dir)["splits"]
    with pytest.raises(DataError, match=r"has 512 pieces but model.vocab_size=1024; set model.vocab_size=512 or "
                                        r"delete .*tokenizer.model to train a new one"):
        ensure_prepared(DataConfig(num_workers=1), 1024, tmp_path, **QUIET)


# --------------------------------------------------------------------------- loader


def _iterator(data_dir, seed=0, **kw):
    return make_train_iterator(data_dir, seq_len=32, global_batch_size=8, seed=seed, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("inputs", "targets"))


def test_train_batches_are_windows_of_the_train_split(shakespeare_data_dir):
    tokens = np.asarray(load_split(shakespeare_data_dir, "train"))
    batch = next(_iterator(shakespeare_data_dir))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 32), np.int32), "targets": ((8, 32), np.int32)}
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 33)
    for row_in, row_tg in zip(batch["inputs"], batch["targets"]):
        window = np.concatenate([row_in, row_tg[-1:]])
        assert (windows == window).all(axis=1).any(), "each row is a window of seq_len+1 train tokens"


def test_train_batches_depend_only_on_seed_and_step(shakespeare_data_dir):
    a, b = _take(_iterator(shakespeare_data_dir), 4), _take(_iterator(shakespeare_data_dir), 4)
    assert _same(a, b)
    assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
    assert not np.array_equal(a[0]["inputs"], next(_iterator(shakespeare_data_dir, seed=1))["inputs"])
    assert _same(a, _take(_iterator(shakespeare_data_dir, prefetch=0), 4)), "prefetching changes nothing"


def test_restored_iterator_continues_exactly(shakespeare_data_dir):
    it = _iterator(shakespeare_data_dir)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # saved in the checkpoint as JSON
    expected = _take(it, 5)
    resumed = _iterator(shakespeare_data_dir)
    resumed.set_state(state)
    assert _same(_take(resumed, 5), expected)


def test_processes_share_one_global_batch(shakespeare_data_dir):
    single = _take(_iterator(shakespeare_data_dir), 3)
    parts = [_take(_iterator(shakespeare_data_dir, process_index=p, process_count=4), 3) for p in range(4)]
    for step in range(3):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), single[step][key])
    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible by the 3 JAX processes"):
        _iterator(shakespeare_data_dir, process_count=3)


def test_val_batches_are_fixed_and_do_not_overlap(shakespeare_data_dir):
    val = np.asarray(load_split(shakespeare_data_dir, "val"))
    batches = val_batches(shakespeare_data_dir, seq_len=64, batch_size=16, n_batches=4)
    assert len(batches) == 4 and all(b["inputs"].shape == (16, 64) for b in batches)
    assert _same(batches, val_batches(shakespeare_data_dir, seq_len=64, batch_size=16, n_batches=4))
    windows = [tuple(np.concatenate([i, t[-1:]])) for b in batches for i, t in zip(b["inputs"], b["targets"])]
    starts = sorted(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(val, 65) == w).all(axis=1))[0]
                    for w in windows)
    assert np.diff(starts).min() >= 65, "windows do not overlap"
    assert starts[-1] > len(val) // 2, "windows are spread over the split"
    few = val_batches(shakespeare_data_dir, seq_len=len(val) // 3, batch_size=16, n_batches=4)
    assert len(few) == 1 and len(few[0]["inputs"]) == 2
    with pytest.raises(DataError, match=r"val split has \d+ tokens, fewer than data.seq_len\+1=.*lower data.seq_len "
                                        r"or raise data.val_fraction"):
        val_batches(shakespeare_data_dir, seq_len=len(val), batch_size=1, n_batches=1)


# --------------------------------------------------------------------------- errors


def test_missing_source_is_named(tmp_path):
    with pytest.raises(DataError, match=f"data.sources: '{tmp_path}/nope.txt' is no file or directory"):
        corpora.resolve_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match=r"data.sources: the pattern '.*' matches no files"):
        corpora.resolve_sources([str(tmp_path / "*.txt")])


def test_sources_resolve_names_dirs_and_globs(tmp_path, atlas_cache):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.jsonl", "sub/c.txt", "skip.md"):
        (tmp_path / name).write_text("x\n")
    got = corpora.resolve_sources(["tinyshakespeare", str(tmp_path), str(tmp_path / "*.txt")])
    assert got == [atlas_cache / "corpora" / "tinyshakespeare.txt", tmp_path / "a.jsonl", tmp_path / "b.txt",
                   tmp_path / "sub" / "c.txt"]


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_corpus_is_a_data_error(shakespeare_tokenizer, tmp_path, content):
    src = tmp_path / "empty.txt"
    src.write_bytes(content)
    with pytest.raises(DataError, match=f"{src}: no text \\(the file is empty or only whitespace\\)"):
        prepare(_cfg(shakespeare_tokenizer, [src]), tmp_path / "d", **QUIET)


def test_invalid_utf8_names_the_byte_offset(shakespeare_tokenizer, tmp_path, monkeypatch):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine line\n" * 30 + b"caf\xc3\xa9 ok\nbad \xff here\n")
    monkeypatch.setattr(prep, "READ_BYTES", 64)  # the bad byte is several pieces in
    with pytest.raises(DataError, match=f"{src}: not valid UTF-8 at byte offset 313 "):
        prepare(_cfg(shakespeare_tokenizer, [src]), tmp_path / "d", **QUIET)


def test_bad_jsonl_names_file_and_line(shakespeare_tokenizer, tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{src}:3: not valid JSON"):
        prepare(_cfg(shakespeare_tokenizer, [src]), tmp_path / "d", **QUIET)
    src.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{src}:2: no 'text' field \\(found: body\\); set data.text_field"):
        prepare(_cfg(shakespeare_tokenizer, [src]), tmp_path / "d", **QUIET)
    src.write_text('{"body": "a"}\n{"body": "b", "text": 1}\n', encoding="utf-8")
    meta = prepare(_cfg(shakespeare_tokenizer, [src], text_field="body", val_fraction=0.5), tmp_path / "d", **QUIET)
    assert meta["splits"]["train"]["documents"] == 1


def test_vocab_too_large_for_the_corpus(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("a tiny corpus\nwith few words\n", encoding="utf-8")
    with pytest.raises(DataError, match="vocab size 4096 is too large for this corpus"):
        ensure_prepared(DataConfig(sources=[str(src)], num_workers=1), 4096, tmp_path / "d", **QUIET)


def test_shards_of_another_tokenizer_are_refused(shakespeare_data_dir, shakespeare_path, tmp_path):
    other = train_tokenizer([shakespeare_path.read_text(encoding="utf-8")[:50_000]], tmp_path, 512)
    cfg = DataConfig(sources=["tinyshakespeare"], tokenizer=str(other.path), num_workers=1)
    with pytest.raises(DataError, match=f"{shakespeare_data_dir}: its shards were made with another tokenizer .* "
                                        f"delete {shakespeare_data_dir} to prepare again or point data.data_dir"):
        prepare(cfg, shakespeare_data_dir, **QUIET)


def test_cached_corpus_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE", str(tmp_path))
    bad = corpora.corpus_path("tinyshakespeare")
    bad.parent.mkdir(parents=True)
    bad.write_text("not shakespeare\n")
    expected = corpora.CORPORA["tinyshakespeare"].sha256
    with pytest.raises(DataError, match=f"{bad}: cached corpus 'tinyshakespeare' has sha256 [0-9a-f]{{64}}, "
                                        f"expected {expected}"):
        corpora.resolve_sources(["tinyshakespeare"])
    with pytest.raises(DataError, match=f"has sha256 [0-9a-f]{{64}}, expected {expected}"):
        corpora.seed_cache("tinyshakespeare", bad)


def test_offline_without_cache_says_how_to_seed_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=f"cannot download corpus 'tinyshakespeare' .* seed the cache by copying "
                                        f"the file to {tmp_path}/corpora/tinyshakespeare.txt"):
        corpora.fetch("tinyshakespeare")
    assert not list(tmp_path.glob("corpora/*")), "no partial file left behind"


# --------------------------------------------------------------------------- CLI


def test_prepare_cli_tinyshakespeare(shakespeare_data_dir, tmp_path):
    cmd = [sys.executable, "-m", "atlas_jax.data", "prepare", "--input", "tinyshakespeare", "--out", str(tmp_path),
           "--vocab-size", "512", "--workers", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    meta = read_meta(tmp_path)
    assert f"train {meta['splits']['train']['tokens']:,} tokens" in run.stdout
    # The same shards as the fixture's, which were made in-process by train_tokenizer + prepare.
    for split in ("train", "val"):
        np.testing.assert_array_equal(load_split(tmp_path, split), load_split(shakespeare_data_dir, split))
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing.txt"), *cmd[6:]], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [f"error: --input: '{tmp_path / 'missing.txt'}' is no file or "
                                       f"directory, and not a known corpus (tinyshakespeare)"]


def test_tokenizer_that_changes_text_is_refused(shakespeare_path, tmp_path):
    import sentencepiece as spm

    lines = shakespeare_path.read_text(encoding="utf-8")[:50_000].splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "dummy"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)  # dummy prefix, nfkc, strip
    cfg = DataConfig(sources=["tinyshakespeare"], tokenizer=str(tmp_path / "dummy.model"), num_workers=1)
    with pytest.raises(DataError, match="dummy.model: this tokenizer adds a dummy prefix or normalizes whitespace"):
        prepare(cfg, tmp_path / "d", **QUIET)


def test_shard_writer_grows_past_its_first_guess(tmp_path):
    writer = prep.ShardWriter(tmp_path / "x.bin", "uint16", capacity=3)
    chunks = [np.arange(i * 10, i * 10 + n, dtype=np.uint16) for i, n in enumerate([2, 5, 0, 11])]
    for c in chunks:
        writer.write(c)
    writer.close()
    np.testing.assert_array_equal(np.fromfile(tmp_path / "x.bin", dtype=np.uint16), np.concatenate(chunks))


def test_tokenizer_with_a_piece_spanning_a_newline_is_refused(tmp_path, shakespeare_path):
    """Shards are encoded line by line; a piece like '\\n\\n' would make that differ from encoding the
    whole document, so such a tokenizer is refused with one line naming the piece."""
    import io

    import sentencepiece as spm

    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, user_defined_symbols=["\n\n"], minloglevel=2)
    path = tmp_path / "nl.model"
    path.write_bytes(model.getvalue())
    tok = Tokenizer.load(path)
    doc = "ROMEO:\n\nJULIET:\nSpeak."
    lines = [i for part in ("ROMEO:\n", "\n", "JULIET:\n", "Speak.") for i in tok.encode(part)]
    assert tok.encode(doc) != lines, "the premise: line-wise and whole-document encoding differ for this tokenizer"
    corpus = tmp_path / "c.txt"
    corpus.write_text(text[:20_000], encoding="utf-8")
    with pytest.raises(DataError, match=r"piece \d+ \('\\n\\n'\) spans a newline"):
        prepare(_cfg(tok, [corpus]), tmp_path / "data", tok.vocab_size)
