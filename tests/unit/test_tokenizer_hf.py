"""The Hugging Face `tokenizers` backend (atlas_jax/tokenizer/hf.py) and the places that take either
backend: the same ids in Atlas, transformers (after write_hf_tokenizer) and llama.cpp (after the GGUF
export) on a string suite, exact round trips, data preparation equal to whole-document encoding,
the special-token roles of an import, and one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from gguf import Keys, TokenType
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_jax.config import Config, DataConfig, ModelConfig, SampleConfig, resolve_model
from atlas_jax.data import prepare as prep
from atlas_jax.data.prepare import load_split, prepare
from atlas_jax.errors import DataError
from atlas_jax.export.gguf import ExportError, export_gguf, tokenizer_metadata
from atlas_jax.model import init_params
from atlas_jax.tokenizer import (
    TOKENIZER_FILES,
    Tokenizer,
    find_tokenizer,
    import_hf_tokenizer,
    train_tokenizer,
    write_hf_tokenizer,
)
from atlas_jax.tokenizer.hf import HFTokenizer

QUIET = {"log": lambda _: None}
STRINGS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.", "ROMEO:", "ROMEO:\nI",
    "a    b", "   leading", "trailing   ", " ", "  ", "\t", "\t\tindented\ttabs\t", "tab\tseparated\tvalues",
    "\n", "\n\n\n", "\n\n\nlines\n", "a\n\n\nb", "x  \n\ny", "\r\n", "line\r\nend",
    "0123456789", "12345 3.14", "3.14159 + 2,718 = 5.85959", "2024-01-02T03:04:05Z",
    "😀", "emoji 👩‍💻 zwj 🦙🦙", "日本語のテキスト", "中文 和 English", "한국어", "é e\u0301 ﬁ",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) {\n\treturn c[i] >> 2;\n}\n",
    "class A:\n    def m(self):\n        pass\n\n\n", "I've been 'told he's there, 'RE you sure?",
    "mixed: abc 123 日本 😀\n\t  end  ", "<s> </s> <unk> <pad> <|endoftext|>", "\u2581 x\u2581y", "",
]


def _shakespeare(path: Path, n: int = 400_000) -> str:
    return path.read_text(encoding="utf-8")[:n]


@pytest.fixture(scope="module")
def hf_gpt2_dir(shakespeare_path, tmp_path_factory) -> Path:
    """(a) A Hugging Face model directory whose tokenizer is a GPT-2-style byte-level BPE trained with
    `tokenizers` itself (vocab 1000, one <|endoftext|> for bos/eos/unk as GPT-2 has)."""
    from tokenizers import Tokenizer as Tk
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_shakespeare(shakespeare_path)], trainer)
    d = tmp_path_factory.mktemp("hf_gpt2")
    tk.save(str(d / "tokenizer.json"))
    eot = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": "<|endoftext|>",
         "model_max_length": 1024}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0, "vocab_size": 1000}))
    return d


@pytest.fixture(scope="module")
def tokenizers_by_name(hf_gpt2_dir, shakespeare_tokenizer, shakespeare_path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("atlas_toks")
    return {
        "hf-gpt2": Tokenizer.load(import_hf_tokenizer(hf_gpt2_dir, out / "imported")),
        "atlas-bytelevel": train_tokenizer([_shakespeare(shakespeare_path)], out / "bl", 1000, "bytelevel"),
        "atlas-sentencepiece": shakespeare_tokenizer,
    }


NAMES = ["hf-gpt2", "atlas-bytelevel", "atlas-sentencepiece"]


# --------------------------------------------------------------------------- ids and round trips


@pytest.mark.parametrize("name", NAMES)
def test_string_suite_roundtrips_exactly(tokenizers_by_name, name):
    tok = tokenizers_by_name[name]
    for text in STRINGS:
        ids = tok.encode(text)
        if tok.kind == "sentencepiece":  # its one exception: '▁' is the space piece (test_tokenizer.py)
            text = text.replace("\u2581", " ")
        assert tok.decode(ids) == text, f"{name}: {text!r} -> {[tok.piece(i) for i in ids]} -> {tok.decode(ids)!r}"
        if tok.bos_id >= 0:
            assert tok.decode(tok.encode(text, bos=True, eos=True)) == text, "special ids decode to nothing"


def test_imported_tokenizer_gives_the_ids_of_tokenizers_itself(tokenizers_by_name, hf_gpt2_dir):
    from tokenizers import Tokenizer as Tk

    tk = Tk.from_file(str(hf_gpt2_dir / "tokenizer.json"))
    tk.encode_special_tokens = True  # Atlas reads special-token text as text (hf.py's docstring)
    tok = tokenizers_by_name["hf-gpt2"]
    for text in STRINGS:
        assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids, text
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (0, 0, 0, -1), "roles from tokenizer_config.json"
    assert tok.kind == "bytelevel" and tok.vocab_size == 1000


@pytest.mark.parametrize("name", NAMES)
def test_transformers_autotokenizer_gives_atlas_ids(tokenizers_by_name, tmp_path, name):
    from transformers import AutoTokenizer

    tok = tokenizers_by_name[name]
    write_hf_tokenizer(tok, tmp_path, model_max_length=64)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 64
    for role in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{role}_id")
        assert getattr(hf, f"{role}_token_id") == (i if i >= 0 else None), role
    for text in STRINGS:
        want = tok.encode(text)
        got = hf(text)["input_ids"]  # the default call: no BOS/EOS added, as Atlas
        assert got == want, f"{name}: {text!r}: transformers {hf.convert_ids_to_tokens(got)} vs Atlas {[tok.piece(i) for i in want]}"
        assert hf.decode(got) == tok.decode(want), f"{name}: {text!r} decodes as {hf.decode(got)!r}"
    # The issue's case: transformers' own conversion of our sentencepiece model gives 4 ids and a '▁' prefix.
    assert hf("ROMEO:")["input_ids"] == tok.encode("ROMEO:")
    big = _shakespeare(Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt", 100_000)
    assert hf(big)["input_ids"] == tok.encode(big), f"{name}: 100 kB of tinyshakespeare tokenizes differently"


def _tiny_model(vocab_size: int, seed: int = 0):
    cfg = resolve_model(ModelConfig(vocab_size=vocab_size, arch="llama", d_model=32, n_layers=1, n_heads=2,
                                    max_seq_len=64, tie_embeddings=True))
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return cfg, jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02, shapes)


@pytest.mark.parametrize("name", NAMES)
def test_llamacpp_tokenizes_like_atlas(tokenizers_by_name, tmp_path, name):
    from atlas_jax.export.llamacpp import llamacpp_tokenize

    tok = tokenizers_by_name[name]
    cfg, params = _tiny_model(tok.vocab_size)
    path = export_gguf(params, cfg, tok.path, tmp_path / "tok.gguf")
    texts = [t for t in STRINGS if t]
    for text, ids in zip(texts, llamacpp_tokenize(path, texts)):
        want = tok.encode(text)
        assert ids == want, f"{name}: {text!r}: llama.cpp {ids} vs Atlas {want} {[tok.piece(i) for i in want]}"


def test_bytelevel_gguf_metadata(tokenizers_by_name, tmp_path):
    tok = tokenizers_by_name["atlas-bytelevel"]
    meta = tokenizer_metadata(tok.path, tok.vocab_size + 24)  # a padded model vocabulary
    assert meta[Keys.Tokenizer.MODEL][0] == "gpt2" and meta[Keys.Tokenizer.PRE][0] == "gpt-2"
    tokens, types = meta[Keys.Tokenizer.LIST][0], meta[Keys.Tokenizer.TOKEN_TYPE][0]
    assert len(tokens) == len(types) == tok.vocab_size + 24
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<pad>"] and types[:4] == [int(TokenType.CONTROL)] * 4
    assert types[4:tok.vocab_size] == [int(TokenType.NORMAL)] * (tok.vocab_size - 4)
    assert types[tok.vocab_size:] == [int(TokenType.UNUSED)] * 24 and tokens[-1] == f"[PAD{tok.vocab_size + 23}]"
    merges = meta[Keys.Tokenizer.MERGES][0]
    assert len(merges) == tok.vocab_size - 260 and all(m.count(" ") == 1 for m in merges)
    assert [meta[k][0] for k in (Keys.Tokenizer.UNK_ID, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID,
                                  Keys.Tokenizer.PAD_ID)] == [0, 1, 2, 3]
    with pytest.raises(ExportError, match="the tokenizer has 1000 tokens but the model's vocab_size is 999"):
        tokenizer_metadata(tok.path, 999)


def test_sentencepiece_derived_tokenizer_json_exports_to_llamacpp_exactly(tokenizers_by_name, tmp_path):
    """An Atlas sentencepiece model written for transformers (tokenizer.json alone) exports as llama.cpp's
    SPM tokenizer with scores from its merge ranks, and llama.cpp gives Atlas's ids."""
    from atlas_jax.export.llamacpp import llamacpp_tokenize

    sp = tokenizers_by_name["atlas-sentencepiece"]
    write_hf_tokenizer(sp, tmp_path)
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.kind == "tokenizers" and tok.prefix_scheme == "none" and not tok.dummy_prefix
    meta = tokenizer_metadata(tok.path, tok.vocab_size)
    assert meta[Keys.Tokenizer.MODEL][0] == "llama" and meta[Keys.Tokenizer.ADD_PREFIX][0] is False
    cfg, params = _tiny_model(tok.vocab_size)
    path = export_gguf(params, cfg, tok.path, tmp_path / "tok.gguf")
    texts = [t for t in STRINGS if t] + [_shakespeare(Path(__file__).resolve().parents[3] / "shared" / "data"
                                                      / "tinyshakespeare.txt", 50_000)]
    for text, ids in zip(texts, llamacpp_tokenize(path, texts)):
        assert ids == tok.encode(text) == sp.encode(text), f"{text[:40]!r}: llama.cpp {ids[:20]}"


# --------------------------------------------------------------------------- training, layout


def test_bytelevel_training_is_deterministic_with_fixed_special_ids(shakespeare_path, tmp_path, tokenizers_by_name):
    a = tokenizers_by_name["atlas-bytelevel"]
    b = train_tokenizer([_shakespeare(shakespeare_path)], tmp_path, 1000, "bytelevel")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert (b.unk_id, b.bos_id, b.eos_id, b.pad_id) == (0, 1, 2, 3) and b.vocab_size == 1000
    assert [b.piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    spec = json.loads(b.path.read_text(encoding="utf-8"))
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel" and spec["normalizer"] is None
    assert {b.piece(i) for i in range(4, 260)} == set(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    assert b.encode("<s>") != [1], "special-token text is text"
    assert b.encode("hi", bos=True, eos=True) == [1, *b.encode("hi"), 2]


def test_bytelevel_byte_lengths_sum_to_utf8_bytes(tokenizers_by_name, shakespeare_path):
    for name in ("hf-gpt2", "atlas-bytelevel"):
        tok = tokenizers_by_name[name]
        text = _shakespeare(shakespeare_path, 20_000) + "".join(STRINGS)
        ids = tok.encode(text, eos=True)
        assert int(tok.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8")), name


def test_bytelevel_rejects_a_too_small_or_too_large_vocab(tmp_path):
    with pytest.raises(DataError, match="vocab size 200 is too small for a byte-level BPE: it needs at least 260"):
        train_tokenizer(["hello world"], tmp_path, 200, "bytelevel")
    with pytest.raises(DataError, match=r"vocab size 5000 is too large for this corpus \(it supports at most \d+\)"):
        train_tokenizer(["hello world\nfoo bar baz\n" * 3], tmp_path, 5000, "bytelevel")


# --------------------------------------------------------------------------- exact cuts, data preparation


FRAGMENTS = ["a", "b", " ", "  ", "\n", "\n\n", "\t", "  \n", "'s", "X", "1", "日", "😀", ".", "\r\n", " \n "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
def test_bytelevel_safe_cut_changes_no_ids(tokenizers_by_name, text):
    tok = tokenizers_by_name["atlas-bytelevel"]
    k = tok.safe_cut(text)
    assert 0 <= k < max(len(text), 1)
    if k:
        assert tok.encode(text[:k]) + tok.encode(text[k:]) == tok.encode(text), (text, k)


def test_cutting_after_a_newline_before_non_whitespace_is_not_enough(tokenizers_by_name):
    """The premise of safe_cut's stricter rule: GPT-2's regex splits "a  \nb" as a | "  " | "\n" | b, but
    its head "a  \n" alone as a | "  \n" (the lookahead sees the end of the text): a cut there moves a
    piece boundary, which changes ids wherever the vocabulary merges across it."""
    tok = tokenizers_by_name["atlas-bytelevel"]
    pieces = lambda t: [p for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str(t)]  # noqa: E731
    assert pieces("a  \nb") == ["a", "ĠĠ", "Ċ", "b"] and pieces("a  \n") == ["a", "ĠĠĊ"]
    assert tok.safe_cut("a  \nb") == 0 and tok.safe_cut("a\nb") == 2 and tok.safe_cut("a\n\nb") == 0


def test_bytelevel_shards_equal_whole_document_encoding(tokenizers_by_name, shakespeare_path, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 4096)  # many read pieces per document
    tok = tokenizers_by_name["atlas-bytelevel"]
    text = _shakespeare(shakespeare_path, 300_000)
    docs = [text[:70_000], "a  \n\n\nb\n" * 2000, "x" * 9000 + "\n  \n\t\n" * 800, text[70_000:150_000] + "\n\n\n",
            "日本 😀\n\n" * 1500] + [f"doc {i}:\n  indented\n\n\nnext" for i in range(40)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg = DataConfig(sources=[str(corpus)], tokenizer=str(tok.path), num_workers=1)
    prepare(cfg, tmp_path / "data", tok.vocab_size, **QUIET)
    got = sorted(_segments(load_split(tmp_path / "data", "train"), tok.eos_id)
                 + _segments(load_split(tmp_path / "data", "val"), tok.eos_id))
    assert got == sorted(tok.encode(d) for d in docs), "shards differ from encoding each document whole"
    # and a single-document corpus split at a line boundary: head and tail each encoded whole
    single = tmp_path / "s.txt"
    single.write_text(text, encoding="utf-8")
    meta = prepare(DataConfig(sources=[str(single)], tokenizer=str(tok.path), num_workers=1), tmp_path / "d2",
                   tok.vocab_size, **QUIET)
    cut = meta["splits"]["train"]["bytes"]
    head = text.encode("utf-8")[:cut].decode("utf-8")
    assert load_split(tmp_path / "d2", "train").tolist() == tok.encode(head) + [tok.eos_id]
    assert load_split(tmp_path / "d2", "val").tolist() == tok.encode(text[len(head):]) + [tok.eos_id]


def _segments(tokens: np.ndarray, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == eos)
    return [t.tolist()[:-1] for t in np.split(tokens, cuts + 1)[:-1]]


def test_data_dir_trains_a_bytelevel_tokenizer_json(shakespeare_path, tmp_path):
    cfg = DataConfig(sources=[str(shakespeare_path)], tokenizer_type="bytelevel", num_workers=1)
    meta = prepare(cfg, tmp_path, 600, **QUIET)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    assert meta["vocab_size"] == 600 and meta["eos_id"] == 2
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.decode(load_split(tmp_path, "train")) + tok.decode(load_split(tmp_path, "val")) == \
        shakespeare_path.read_text(encoding="utf-8")


def test_prepare_refuses_tokenizers_that_change_text_or_lack_eos(hf_gpt2_dir, tmp_path, shakespeare_path):
    spec = json.loads((hf_gpt2_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "prefix" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = import_hf_tokenizer(tmp_path / "prefix", tmp_path / "prefix_run")
    cfg = DataConfig(sources=[str(shakespeare_path)], tokenizer=str(tok), num_workers=1)
    with pytest.raises(DataError, match="this tokenizer adds a dummy prefix or normalizes whitespace"):
        prepare(cfg, tmp_path / "d1", **QUIET)
    raw = tmp_path / "raw.json"  # a plain tokenizer.json: no roles, so no EOS
    raw.write_text((hf_gpt2_dir / "tokenizer.json").read_text())
    with pytest.raises(DataError, match="raw.json: the tokenizer has no EOS token"):
        prepare(DataConfig(sources=[str(shakespeare_path)], tokenizer=str(raw), num_workers=1), tmp_path / "d2",
                **QUIET)


# --------------------------------------------------------------------------- import, files, errors


def test_import_reads_roles_from_each_hugging_face_file(hf_gpt2_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text((hf_gpt2_dir / "tokenizer.json").read_text())
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    (src / "config.json").write_text(json.dumps({"bos_token_id": [0, 5], "pad_token_id": 7}))
    tok = Tokenizer.load(import_hf_tokenizer(src, tmp_path / "out"))
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (0, 0, 7, -1)
    assert isinstance(tok, HFTokenizer) and tok.path == tmp_path / "out" / "tokenizer.json"
    assert find_tokenizer(tmp_path / "out") == tok.path and find_tokenizer(tmp_path) is None


def test_import_of_a_sentencepiece_only_directory_copies_the_model(shakespeare_tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(shakespeare_tokenizer.path.read_bytes())
    path = import_hf_tokenizer(src, tmp_path / "out")
    assert path.name == "tokenizer.model" and Tokenizer.load(path).sha256 == shakespeare_tokenizer.sha256


def test_load_decides_by_content(tokenizers_by_name, shakespeare_tokenizer, tmp_path):
    odd = tmp_path / "tok.bin"
    odd.write_bytes(tokenizers_by_name["atlas-bytelevel"].path.read_bytes())
    assert Tokenizer.load(odd).kind == "bytelevel"
    sp = tmp_path / "tok.dat"
    sp.write_bytes(shakespeare_tokenizer.path.read_bytes())
    assert Tokenizer.load(sp).kind == "sentencepiece"


@pytest.mark.parametrize("content, message", [
    ("{not json", r"bad.json: not valid JSON \(.* at line 1 column 2\)"),
    ('{"a": 1}', r"bad.json: JSON but not a Hugging Face tokenizer \(no 'model' object\)"),
    ('{"model": {"type": "Nope"}}', r"bad.json: not a tokenizer `tokenizers` can load"),
    ("[1, 2]", r"bad.json: JSON but not a Hugging Face tokenizer"),
])
def test_bad_tokenizer_json_is_one_line(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        Tokenizer.load(bad)
    assert "\n" not in str(e.value)


def test_directory_without_a_tokenizer_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r": no tokenizer \(tokenizer.json or tokenizer.model\); put the model's") as e:
        import_hf_tokenizer(tmp_path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_checkpoint_finds_either_tokenizer_file(tokenizers_by_name, shakespeare_tokenizer, tmp_path):
    from atlas_jax.checkpoint import tokenizer_path

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes(tokenizers_by_name["atlas-bytelevel"].path.read_bytes())
    assert tokenizer_path(run, Config()) == run / "tokenizer.json"
    (run / "tokenizer.model").write_bytes(shakespeare_tokenizer.path.read_bytes())
    with pytest.raises(DataError, match=r"holds both tokenizer.model and tokenizer.json"):
        tokenizer_path(run, Config())
    assert TOKENIZER_FILES == ("tokenizer.model", "tokenizer.json")


def test_generation_with_a_tokenizer_without_pad_pads_with_eos(tokenizers_by_name):
    from atlas_jax.sample import generate

    tok = tokenizers_by_name["hf-gpt2"]
    assert tok.pad_id == -1
    cfg, params = _tiny_model(tok.vocab_size)
    prompts = [tok.encode("ROMEO:"), tok.encode("First Citizen:\nBefore")]
    tokens, lengths = generate(params, prompts, jax.random.key(0), SampleConfig(temperature=1.0, max_new_tokens=12),
                               cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert (tokens >= 0).all(), "no -1 pad ids in the output"
    for row, n in zip(tokens, lengths):
        assert (row[n:] == tok.eos_id).all()
