"""Tokenizer: exact round trip, fixed special ids, byte fallback, reproducible training, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_jax.errors import DataError
from atlas_jax.tokenizer import SPACE, Tokenizer, train_tokenizer

# Everything UTF-8 can encode except U+2581 (sentencepiece's space; see test_u2581_decodes_as_space).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters=SPACE)
FRAGMENTS = ["  ", "\n", "\n\n", "\t", " \t ", "\r\n", "   leading", "😀", "👩‍💻", "日本語", "한국어", "é", "e\u0301",
             "def f(x):\n    return x\n", "0123456789", "\x00", "\ufeff", "ﬁ", "\u200b"]
TEXT = st.lists(st.one_of(st.text(CHARS, max_size=12), st.sampled_from(FRAGMENTS)), max_size=20).map("".join)
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak. 日本 😀 x=42\n"


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_decode_encode_roundtrips_any_text(shakespeare_tokenizer, text):
    ids = shakespeare_tokenizer.encode(text)
    assert shakespeare_tokenizer.decode(ids) == text, [shakespeare_tokenizer.sp.id_to_piece(i) for i in ids]


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_byte_fallback_never_gives_unk(shakespeare_tokenizer, text):
    assert shakespeare_tokenizer.unk_id not in shakespeare_tokenizer.encode(text)


def test_u2581_decodes_as_space(shakespeare_tokenizer):
    # The one exception to the round trip, shared with llama.cpp's SPM tokenizer: '▁' is the space piece.
    assert shakespeare_tokenizer.decode(shakespeare_tokenizer.encode(f"a{SPACE}b")) == "a b"


def test_special_ids_and_byte_pieces_are_fixed(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    assert tok.encode("hi", bos=True, eos=True) == [1, *tok.encode("hi"), 2]
    sp = tok.sp
    byte_pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    assert byte_pieces == [f"<0x{b:02X}>" for b in range(256)]
    # Only piece types llama.cpp's SPM tokenizer handles: normal, control, unknown, byte.
    assert not any(sp.is_unused(i) for i in range(sp.get_piece_size()))
    assert tok.decode([1, *tok.encode("hi"), 2, 3]) == "hi"


def test_batch_encode_decode_equals_single(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    texts = [SAMPLE, "", " x", "日本語\n"]
    ids = tok.encode_batch(texts, eos=True)
    assert ids == [tok.encode(t, eos=True) for t in texts]
    assert tok.decode_batch(ids) == texts
    assert tok.decode(np.array(ids[0], dtype=np.uint16)) == SAMPLE


def test_token_byte_lengths_sum_to_utf8_bytes(shakespeare_tokenizer, shakespeare_path):
    tok = shakespeare_tokenizer
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]
    text = shakespeare_path.read_text(encoding="utf-8")[:20000] + SAMPLE
    ids = tok.encode(text, bos=True, eos=True)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_training_is_reproducible(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    a = train_tokenizer([text], tmp_path / "a", 2048)
    b = train_tokenizer([text], tmp_path / "b", 2048)
    assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
    assert (tmp_path / "a" / "tokenizer.vocab").read_text(encoding="utf-8").count("\n") == 2048


def test_training_stops_reading_at_max_bytes(shakespeare_path, tmp_path):
    """The cap that bounds training time on a big corpus: text past max_bytes never reaches the
    trainer (the model is byte-identical without it), and the same text read does change the model."""
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    extra = "qwxzj " * 20_000  # a word the trainer would learn if it read this
    cap = 100_000  # inside `text`
    a = train_tokenizer([text], tmp_path / "a", 512, max_bytes=cap)
    b = train_tokenizer([text, extra], tmp_path / "b", 512, max_bytes=cap)
    c = train_tokenizer([text, extra], tmp_path / "c", 512)
    assert a.sha256 == b.sha256, "text past max_bytes changed the trained tokenizer"
    assert len(c.encode("qwxzj")) < len(a.encode("qwxzj")), "the extra text is not one the trainer learns from"


def test_unigram_trains_and_roundtrips(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:100_000]
    tok = train_tokenizer([text], tmp_path, 400, model_type="unigram")
    assert tok.vocab_size == 400 and tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_vocab_too_large_for_corpus_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"vocab size 5000 is too large for this corpus \(it supports at most \d+\)"):
        train_tokenizer(["hello world\nfoo bar baz\n"], tmp_path, 5000)
    with pytest.raises(DataError, match="vocab size 100 is too small"):
        train_tokenizer(["hello world\n"], tmp_path, 100)


def test_load_missing_or_corrupt_file_names_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.model'}: tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match=f"{bad}: not a sentencepiece model"):
        Tokenizer.load(bad)


def test_cli_trains_and_reports_errors_in_one_line(shakespeare_path, tmp_path):
    cmd = [sys.executable, "-m", "atlas_jax.tokenizer", "train", "--input", str(shakespeare_path), "--out"]
    ok = subprocess.run([*cmd, str(tmp_path / "tok"), "--vocab-size", "400"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "vocab 400" in ok.stdout and Tokenizer.load(tmp_path / "tok" / "tokenizer.model").vocab_size == 400
    bad = subprocess.run([*cmd, str(tmp_path / "big"), "--vocab-size", "1000000"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: vocab size 1000000 is too large")
