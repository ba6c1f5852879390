"""SentencePiece tokenizer: train (BPE or unigram, byte fallback), load, encode, decode.

The model is kept to what llama.cpp's SPM tokenizer does too, so a GGUF export (tokenizer.ggml.model
= "llama") tokenizes exactly as here: identity normalization, no dummy prefix, no whitespace
cleanup, all 256 byte pieces, fixed ids unk=0 bos=1 eos=2 pad=3. Byte fallback means no text maps
to <unk>, and decode(encode(s)) == s for every string except one that holds U+2581 ('▁', the
piece alphabet's space), which comes back as ' ' (sentencepiece and llama.cpp alike).

    python -m atlas_jax.tokenizer train --input tinyshakespeare --vocab-size 2048 --out DIR
    python -m atlas_jax.tokenizer train --kind bytelevel --input tinyshakespeare --vocab-size 2048 --out DIR

An imported model's sentencepiece file (Llama, Mistral, TinyLlama) may add a dummy prefix
(normalizer_spec.add_dummy_prefix): encode(text) puts one '▁' before the text, once, and decode
removes it again, so the round trip stays exact (except for '▁' itself, as above). `dummy_prefix`
says so, and `encode_part(text, first=False)` encodes text that continues a document after a
`safe_cut` without it (the same model with add_dummy_prefix off), so a document encoded in pieces
gets the ids of encoding it whole.

Two backends behind one interface (`Tokenizer`): sentencepiece (`tokenizer.model`, here) and Hugging
Face `tokenizers` (`tokenizer.json`, `hf.py`: byte-level BPE as GPT-2, imported Hugging Face files,
export to transformers). `Tokenizer.load(path)` picks the backend by the file's content. Every
backend has path, sha256, kind, vocab_size, unk_id/bos_id/eos_id/pad_id (-1 when absent), encode,
encode_batch, decode (special ids decode to nothing), decode_batch, piece, is_special,
token_byte_lengths, dummy_prefix, safe_cut and encode_part.
"""
from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from atlas_jax.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SENTENCEPIECE_TYPES = ("bpe", "unigram")
MODEL_TYPES = (*SENTENCEPIECE_TYPES, "bytelevel")  # bytelevel: a GPT-2-style byte-level BPE (tokenizers)
SENTENCEPIECE_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE)
MAX_SENTENCE_BYTES = 1 << 16  # longer lines are cut into pieces this long for training
MAX_SENTENCES = 1_000_000  # sentencepiece samples this many lines (reservoir) from the stream
MAX_TRAIN_BYTES = 1 << 30  # stop reading the corpus for training after this much text
SPACE = "\u2581"  # '▁', sentencepiece's space


def tokenizer_file_name(model_type: str) -> str:
    """The file a tokenizer of this type is trained into: tokenizer.json for bytelevel, else tokenizer.model."""
    return HF_FILE if model_type == "bytelevel" else SENTENCEPIECE_FILE


def find_tokenizer(directory: str | Path) -> Path | None:
    """directory's tokenizer file (one of TOKENIZER_FILES), None when it has none; both is a DataError."""
    found = [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{directory}: holds both {' and '.join(TOKENIZER_FILES)}, so which tokenizer it uses is "
                        f"ambiguous; delete the one it was not trained with")
    return found[0] if found else None


def import_hf_tokenizer(src_dir: str | Path, out_dir: str | Path) -> Path:
    """out_dir's tokenizer file from a Hugging Face model directory (see `hf.import_hf_tokenizer`)."""
    from atlas_jax.tokenizer.hf import import_hf_tokenizer as _import

    return _import(src_dir, out_dir)


def write_hf_tokenizer(tok: "Tokenizer", out_dir: str | Path, model_max_length: int | None = None) -> list[Path]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for transformers (see `hf.write_hf_tokenizer`)."""
    from atlas_jax.tokenizer.hf import write_hf_tokenizer as _write

    return _write(tok, out_dir, model_max_length)


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of `texts` without their '\\n' (which stays a byte piece), long ones cut, empty ones skipped."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            step = MAX_SENTENCE_BYTES // 4  # 4 UTF-8 bytes per character at most, so a slice fits
            for i in range(0, len(line), step):
                yield line[i:i + step]
            seen += len(line.encode("utf-8"))  # bytes, as max_bytes says (not characters)
            if seen >= max_bytes:
                return


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int, model_type: str = "bpe",
                    seed: int = 0, max_sentences: int = MAX_SENTENCES,
                    max_bytes: int = MAX_TRAIN_BYTES) -> "Tokenizer":
    """Train on a stream of text; write out_dir/tokenizer.model and .vocab (sentencepiece bpe/unigram) or
    out_dir/tokenizer.json (bytelevel; `seed` and `max_sentences` do not apply); same input+seed -> same bytes."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"tokenizer type '{model_type}' is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 1:
        raise DataError(f"vocab size must be positive, got {vocab_size}")
    if model_type == "bytelevel":
        from atlas_jax.tokenizer.hf import train_bytelevel

        return train_bytelevel(texts, out_dir, vocab_size, max_bytes=max_bytes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, max_bytes), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=1,  # the BPE trainer's merges depend on the thread count; 1 keeps it reproducible
            minloglevel=2)
    except RuntimeError as e:
        raise _training_error(e, vocab_size) from None
    path = out_dir / SENTENCEPIECE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    tok = Tokenizer.load(path)
    (out_dir / "tokenizer.vocab").write_text(
        "".join(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n" for i in range(tok.vocab_size)),
        encoding="utf-8")
    return tok


def _training_error(e: RuntimeError, vocab_size: int) -> DataError:
    msg = str(e)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return DataError(f"vocab size {m[1]} is too large for this corpus (it supports at most {m[2]}); "
                         f"lower the vocab size (model.vocab_size / --vocab-size) or add text")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return DataError(f"vocab size {m[1]} is too small: the corpus needs {m[2]} pieces for its characters, "
                         f"bytes and special tokens; raise the vocab size")
    if "sentences_.empty()" in msg:
        return DataError("tokenizer training found no text to learn from; check the input files")
    return DataError(f"sentencepiece failed to train a tokenizer with vocab size {vocab_size}: "
                     f"{msg.splitlines()[0] if msg else type(e).__name__}")


class Tokenizer:
    """The interface every backend has; `Tokenizer.load(path)` returns the backend the file is for."""

    kind: str  # "sentencepiece" | "bytelevel" | "tokenizers" (another tokenizer.json)
    path: Path
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A sentencepiece model or a Hugging Face tokenizer.json, told apart by content (JSON starts
        with '{'; a .json name is read as JSON whatever it holds)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer file not found; train one with "
                            f"`python -m atlas_jax.tokenizer train` or set data.tokenizer=null") from None
        except IsADirectoryError:
            raise DataError(f"{path}: a directory, not a tokenizer file; name its tokenizer.model or "
                            f"tokenizer.json") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
        if data.lstrip()[:1] == b"{" or path.suffix == ".json":
            from atlas_jax.tokenizer.hf import HFTokenizer

            return HFTokenizer.from_bytes(data, path)
        return SentencePieceTokenizer.from_bytes(data, path)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    dummy_prefix = False  # encode(text) adds a '▁' (a space) before text, once; decode removes it

    def safe_cut(self, text: str) -> int:
        """The largest k such that cutting text at k changes no ids, whatever text follows (0: none)."""
        raise NotImplementedError

    def encode_part(self, text: str, first: bool) -> list[int]:
        """ids of a part of a document cut at `safe_cut` points: the first part as encode() gives it, a
        later one without the dummy prefix, so that the parts' ids concatenated are encode(document)."""
        return self.encode(text)


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model; `sp` is the SentencePieceProcessor for anything not wrapped here."""

    kind = "sentencepiece"

    def __init__(self, sp: spm.SentencePieceProcessor, path: Path, sha256: str):
        from sentencepiece import sentencepiece_model_pb2

        self.sp = sp
        self.path = path
        self.sha256 = sha256
        self._byte_lengths: np.ndarray | None = None
        self.proto = sentencepiece_model_pb2.ModelProto()
        self.proto.ParseFromString(sp.serialized_model_proto())
        self.dummy_prefix = bool(self.proto.normalizer_spec.add_dummy_prefix)
        self._continuation: spm.SentencePieceProcessor | None = None

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "SentencePieceTokenizer":
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise DataError(f"{path}: not a sentencepiece model (corrupt or a different format); "
                            f"point data.tokenizer at a .model or tokenizer.json file or delete it to retrain") from None
        return cls(sp, path, hashlib.sha256(data).hexdigest())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Control ids (bos/eos/pad) decode to nothing."""
        return self.sp.decode(np.asarray(ids, dtype=np.int64).tolist())

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def is_special(self, i: int) -> bool:
        return bool(self.sp.is_control(int(i)) or self.sp.is_unknown(int(i)))

    @property
    def sp_continuation(self) -> spm.SentencePieceProcessor:
        """The processor for text that continues a document: `sp` without its dummy prefix."""
        if not self.dummy_prefix:
            return self.sp
        if self._continuation is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.CopyFrom(self.proto)
            proto.normalizer_spec.add_dummy_prefix = False
            self._continuation = spm.SentencePieceProcessor()
            self._continuation.LoadFromSerializedProto(proto.SerializeToString())
        return self._continuation

    def safe_cut(self, text: str) -> int:
        """After the last '\n': exact because no piece spans a newline (data.prepare checks it), and the
        dummy prefix (if any) is added once, before the first part (`encode_part`)."""
        return text.rfind("\n") + 1

    def encode_part(self, text: str, first: bool) -> list[int]:
        return (self.sp if first else self.sp_continuation).encode(text)

    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes each piece stands for in running text ('▁' is one space)."""
        if self._byte_lengths is None:
            sp = self.sp
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            for i in range(self.vocab_size):
                if sp.is_byte(i):
                    lengths[i] = 1
                elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                    lengths[i] = len(sp.id_to_piece(i).replace(SPACE, " ").encode("utf-8"))
            self._byte_lengths = lengths
        return self._byte_lengths

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
