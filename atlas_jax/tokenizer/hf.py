"""The Hugging Face `tokenizers` backend (`tokenizer.json`): load, train a byte-level BPE, import, export.

    tok = Tokenizer.load("tokenizer.json")                  # an HFTokenizer (the content decides)
    train_tokenizer(texts, out_dir, 8192, "bytelevel")       # out_dir/tokenizer.json
    import_hf_tokenizer(hf_model_dir, run_dir)               # run_dir/tokenizer.json (or tokenizer.model)
    write_hf_tokenizer(tok, hf_dir)                          # tokenizer.json + tokenizer_config.json + ...

Special-token roles live in the tokenizer file itself. `tokenizers.Tokenizer.from_str` refuses an
unknown top-level key (tokenizers 0.23: "expected `,` or `}`"), and unknown keys inside its objects are
dropped by the next save, so Atlas keeps the roles where tokenizer.json has a place for named special
tokens that survives a load and a save: the post-processor. An Atlas tokenizer.json has

    "post_processor": {"type": "TemplateProcessing", "single": [$A], "pair": [$A, $B],
                       "special_tokens": {"atlas.bos": {"id": "atlas.bos", "ids": [1], "tokens": ["<s>"]}, ...}}

one entry per role present (atlas.unk / atlas.bos / atlas.eos / atlas.pad; a role that is absent
reads as id -1, as sentencepiece does). Its templates add nothing, so encoding with or without
special tokens gives the same ids. Atlas encodes with `add_special_tokens=False` and with
`encode_special_tokens`: the text "<s>" is four bytes of text, never the BOS id (as sentencepiece and
llama.cpp with special=False); BOS/EOS are added by id. Decoding drops special tokens.

Byte-level BPE (`kind == "bytelevel"`): GPT-2's layout (ByteLevel pre-tokenizer with the GPT-2
regex, add_prefix_space false, ByteLevel decoder, all 256 byte symbols), so decode(encode(s)) == s
for every string, and llama.cpp tokenizes it exactly (GGUF tokenizer.ggml.model "gpt2", pre "gpt-2").
Atlas trains it with fixed ids unk=0 <unk>, bos=1 <s>, eos=2 </s>, pad=3 <pad>, then the 256 bytes.

Sentencepiece-derived files (`sentencepiece_layout`: a BPE or Unigram model with byte fallback, a
normalizer of Prepend('▁') / Replace(' ', '▁') only, no pre-tokenizer or a Metaspace one with
split=false; what transformers' LlamaConverter writes for Llama, Mistral, TinyLlama) may add
sentencepiece's dummy prefix (`dummy_prefix`) in one of two ways (`prefix_scheme`):
  "prepend"    a Prepend('▁') normalizer (the legacy conversion, Llama-2/TinyLlama/Mistral-v0.1 files):
               always, as sentencepiece and llama.cpp do;
  "metaspace"  a Metaspace pre-tokenizer with prepend_scheme first/always (transformers >= 4.4x, 5.x):
               only when the text does not already begin with ' ' or '▁', so " a" and "a" give the same
               ids and decode(encode(" a")) == "a" (sentencepiece and llama.cpp give "▁▁a" for " a").
`encode_part(text, first=False)` encodes with the prefix off (the same file without the Prepend, or
with prepend_scheme "never").

`safe_cut(text)` says where text may be cut without changing ids (data preparation encodes a long
document in pieces): for the GPT-2 regex, after a '\\n' that has a non-whitespace character on both
sides (the regex always ends a piece there, and neither piece looks across it); for a
sentencepiece layout whose vocabulary has no piece holding a newline (other than "\\n" alone), after
any '\\n' (nothing merges across it, and there is no pre-tokenizer to look across it); other
tokenizers are encoded one whole document at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.errors import DataError
from atlas_jax.tokenizer import SENTENCEPIECE_FILE, Tokenizer

HF_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
ROLES = ("unk", "bos", "eos", "pad")
ROLE_KEY = "atlas.{}"
BYTELEVEL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, the same as Atlas's sentencepiece
BYTELEVEL_MIN_VOCAB = len(BYTELEVEL_SPECIALS) + 256
SPACE = "\u2581"


# --------------------------------------------------------------------------- the byte-level alphabet


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _is_gpt2_bytelevel(d: dict) -> bool:
    """tokenizer.json is GPT-2's layout: BPE, no normalizer, ByteLevel(add_prefix_space=False,
    use_regex=True) pre-tokenizer, ByteLevel decoder."""
    pre, dec, model = d.get("pre_tokenizer") or {}, d.get("decoder") or {}, d.get("model") or {}
    return (model.get("type") == "BPE" and d.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space") and pre.get("use_regex", True) and dec.get("type") == "ByteLevel")


def _prefix_free(spec: dict) -> dict:
    """spec with its dummy prefix turned off (Prepend normalizers dropped, Metaspace prepend_scheme never)."""
    spec = json.loads(json.dumps(spec))
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Prepend":
        spec["normalizer"] = None
    elif norm and norm.get("type") == "Sequence":
        norm["normalizers"] = [n for n in norm["normalizers"] if n.get("type") != "Prepend"]
    pre = spec.get("pre_tokenizer")
    if pre and pre.get("type") == "Metaspace":
        pre["prepend_scheme"] = "never"
    return spec


def sentencepiece_layout(spec: dict) -> str | None:
    """For a sentencepiece-derived tokenizer.json (see the module doc), how it adds the dummy prefix:
    "prepend", "metaspace" or "none"; None for any other layout."""
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") not in ("BPE", "Unigram") or not model.get("byte_fallback"):
        return None
    norms = (norm.get("normalizers") or [] if norm.get("type") == "Sequence" else [norm]) if norm else []
    prepend = False
    for n in norms:
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            prepend = True
        elif not (n.get("type") == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == SPACE):
            return None
    if pre is None:
        if not any(n.get("type") == "Replace" for n in norms):
            return None  # spaces would stay ' ', which no piece holds
        return "prepend" if prepend else "none"
    if pre.get("type") != "Metaspace" or pre.get("split", True) or pre.get("replacement") != SPACE or prepend:
        return None
    return "none" if pre.get("prepend_scheme") == "never" else "metaspace"


def _roles_post_processor(roles: dict[str, tuple[int, str]]) -> dict:
    return {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {ROLE_KEY.format(r): {"id": ROLE_KEY.format(r), "ids": [i], "tokens": [t]}
                               for r, (i, t) in roles.items()}}


def _read_roles(d: dict) -> dict[str, int]:
    special = ((d.get("post_processor") or {}).get("special_tokens") or {})
    out = {}
    for role in ROLES:
        entry = special.get(ROLE_KEY.format(role))
        if isinstance(entry, dict) and entry.get("ids"):
            out[role] = int(entry["ids"][0])
    return out


# --------------------------------------------------------------------------- the tokenizer


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (`tk`) behind Atlas's tokenizer interface; `spec` is its tokenizer.json."""

    def __init__(self, tk, spec: dict, path: Path, sha256: str):
        tk.encode_special_tokens = True  # special-token text is text; specials are added by id
        self.tk, self.spec, self.path, self.sha256 = tk, spec, path, sha256
        self.kind = "bytelevel" if _is_gpt2_bytelevel(spec) else "tokenizers"
        self._roles = _read_roles(spec)
        added = spec.get("added_tokens") or []
        self._special = {int(a["id"]) for a in added if a.get("special")}
        self._added = {int(a["id"]): a for a in added}
        # Cutting after an unambiguous newline is exact only for the GPT-2 regex, and only when no
        # added token (matched before pre-tokenization) could span the cut.
        self._gpt2_cuts = self.kind == "bytelevel" and not any(
            "\n" in a.get("content", "") for a in added if not a.get("special"))
        self.prefix_scheme = sentencepiece_layout(spec)
        self.dummy_prefix = self.prefix_scheme in ("prepend", "metaspace")
        # A sentencepiece layout: after any newline, when no piece but "\n" itself holds one.
        self._newline_cuts = self.prefix_scheme is not None and not any(
            "\n" in t and t != "\n" for t, i in tk.get_vocab(with_added_tokens=True).items()
            if i not in self._special)
        self._continuation = None
        self._byte_lengths: np.ndarray | None = None

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as TkTokenizer

        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{path}: not valid JSON{where}; point data.tokenizer at a tokenizer.json written by "
                            f"Hugging Face tokenizers or a sentencepiece .model") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise DataError(f"{path}: JSON but not a Hugging Face tokenizer (no 'model' object); point "
                            f"data.tokenizer at a tokenizer.json written by `tokenizers` or a sentencepiece .model")
        try:
            tk = TkTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise DataError(f"{path}: not a tokenizer `tokenizers` can load ({str(e).splitlines()[0][:200]}); "
                            f"write it with tokenizers' Tokenizer.save or import it with import_hf_tokenizer") from None
        return cls(tk, spec, path, hashlib.sha256(data).hexdigest())

    # -- the interface

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> int:
        return self._roles.get("unk", -1)

    @property
    def bos_id(self) -> int:
        return self._roles.get("bos", -1)

    @property
    def eos_id(self) -> int:
        return self._roles.get("eos", -1)

    @property
    def pad_id(self) -> int:
        return self._roles.get("pad", -1)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        for flag, role in ((bos, "bos"), (eos, "eos")):
            if flag and role not in self._roles:
                raise DataError(f"{self.path}: the tokenizer has no {role.upper()} token; import it with its "
                                f"model directory (import_hf_tokenizer reads tokenizer_config.json)")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self.tk.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self._wrap(e.ids, bos, eos) for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens decode to nothing."""
        return self.tk.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(), skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i)) or ""

    def is_special(self, i: int) -> bool:
        return int(i) in self._special

    def encode_part(self, text: str, first: bool) -> list[int]:
        if first or not self.dummy_prefix:
            return self.encode(text)
        if self._continuation is None:
            from tokenizers import Tokenizer as TkTokenizer

            self._continuation = TkTokenizer.from_str(json.dumps(_prefix_free(self.spec)))
            self._continuation.encode_special_tokens = True
        return self._continuation.encode(text, add_special_tokens=False).ids

    def safe_cut(self, text: str) -> int:
        if self._newline_cuts:
            return text.rfind("\n") + 1
        if not self._gpt2_cuts:
            return 0
        end = len(text) - 1
        while (i := text.rfind("\n", 0, end)) >= 1:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + 1
            end = i
        return 0

    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes each id stands for in running text (special tokens 0)."""
        if self._byte_lengths is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            fallback = bool((self.spec.get("model") or {}).get("byte_fallback"))
            for i in range(self.vocab_size):
                if i in self._special:
                    continue
                piece = self.piece(i)
                if i in self._added:
                    lengths[i] = len(self._added[i].get("content", "").encode("utf-8"))
                elif self.kind == "bytelevel":
                    lengths[i] = len(piece) if all(c in BYTE_DECODER for c in piece) else len(piece.encode("utf-8"))
                elif fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    lengths[i] = 1
                else:
                    lengths[i] = len(piece.replace(SPACE, " ").encode("utf-8"))
            self._byte_lengths = lengths
        return self._byte_lengths

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, {self.kind}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _dump(spec: dict) -> bytes:
    return (json.dumps(spec, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def write_tokenizer_json(spec: dict, roles: dict[str, tuple[int, str]], path: Path) -> HFTokenizer:
    """spec with the roles in its post-processor, checked by `tokenizers`, written atomically to path."""
    spec = dict(spec, post_processor=_roles_post_processor(roles))
    data = _dump(spec)
    tok = HFTokenizer.from_bytes(data, path)  # refuses what tokenizers cannot load, before writing
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    return tok


# --------------------------------------------------------------------------- training


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if text:
            yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return


def train_bytelevel(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                    max_bytes: int = 1 << 30) -> HFTokenizer:
    """A GPT-2-style byte-level BPE trained on `texts` -> out_dir/tokenizer.json; same input -> same bytes."""
    from tokenizers import Tokenizer as TkTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTELEVEL_MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is too small for a byte-level BPE: it needs at least "
                        f"{BYTELEVEL_MIN_VOCAB} (4 special tokens and 256 bytes); raise the vocab size")
    tk = TkTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(BYTELEVEL_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted():
        for text in _capped(texts, max_bytes):
            seen[0] += len(text)
            yield text

    tk.train_from_iterator(counted(), trainer)
    if not seen[0]:
        raise DataError("tokenizer training found no text to learn from; check the input files")
    got = tk.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise DataError(f"vocab size {vocab_size} is too large for this corpus (it supports at most {got}); "
                        f"lower the vocab size (model.vocab_size / --vocab-size) or add text")
    spec = json.loads(tk.to_str())
    roles = {r: (i, t) for i, (r, t) in enumerate(zip(ROLES, BYTELEVEL_SPECIALS))}
    out = Path(out_dir) / HF_FILE
    return write_tokenizer_json(spec, roles, out)


# --------------------------------------------------------------------------- import


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # a serialized AddedToken
    return None


def hf_special_roles(src_dir: Path, token_to_id) -> dict[str, tuple[int, str]]:
    """{role: (id, token)} from tokenizer_config.json, then special_tokens_map.json, then config.json's
    *_token_id (the first of a list); a token the vocabulary lacks is skipped."""
    roles: dict[str, tuple[int, str]] = {}
    for name in HF_CONFIG_FILES:
        path = src_dir / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix or remove the file") from None
        if not isinstance(cfg, dict):
            continue
        for role in ROLES:
            if role in roles:
                continue
            if name == "config.json":
                i = cfg.get(f"{role}_token_id")
                i = i[0] if isinstance(i, list) and i else i
                if isinstance(i, int) and i >= 0:
                    from_id = token_to_id(None, i)
                    if from_id is not None:
                        roles[role] = from_id
                continue
            text = _token_text(cfg.get(f"{role}_token"))
            if text is not None and (i := token_to_id(text, None)) is not None:
                roles[role] = i
    return roles


def _sentencepiece_is_conversion(sp_tok, tok: "HFTokenizer") -> bool:
    """tokenizer.json holds the sentencepiece model's pieces at the same ids and nothing more."""
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    return len(vocab) == sp_tok.vocab_size and all(vocab.get(sp_tok.piece(i)) == i for i in range(sp_tok.vocab_size))


def _sentencepiece_with_roles(sp_tok, src_dir: Path) -> bytes:
    """The sentencepiece model's bytes, with the roles the Hugging Face files name written into its
    trainer_spec (unk_piece/bos_piece/eos_piece/pad_piece and ids) where they differ from its own; the
    file is unchanged when they agree. sentencepiece gives bos/eos/pad only to control pieces, so a role
    naming another piece (pad_token "<unk>", say) keeps the model's own (pad absent: -1)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = sp_tok.proto
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}

    def token_to_id(text, i):
        if text is not None:
            return (ids[text], text) if text in ids else None
        return (i, proto.pieces[i].piece) if 0 <= i < len(proto.pieces) else None

    out = pb.ModelProto()
    out.CopyFrom(proto)
    changed = False
    for role, (i, text) in hf_special_roles(src_dir, token_to_id).items():
        if role == "unk" or getattr(sp_tok, f"{role}_id") == i or proto.pieces[i].type != pb.ModelProto.SentencePiece.CONTROL:
            continue
        setattr(out.trainer_spec, f"{role}_piece", text)
        setattr(out.trainer_spec, f"{role}_id", i)
        changed = True
    return out.SerializeToString() if changed else Path(sp_tok.path).read_bytes()


def import_hf_tokenizer(src_dir: str | Path, out_dir: str | Path) -> Path:
    """The run's tokenizer file from a Hugging Face model directory. Returns the written path.

    Which file: a sentencepiece tokenizer.model when the directory has one and its tokenizer.json (if
    any) is a conversion of it (the same pieces at the same ids, no added tokens): the model was trained
    with that file's tokenization, llama.cpp's converter reads it too, and transformers' conversion can
    differ from it (a Metaspace pre-tokenizer adds no dummy prefix to text that begins with a space,
    where sentencepiece and llama.cpp do). Otherwise tokenizer.json (what transformers uses), and a
    tokenizer.model alone when there is no tokenizer.json. The special-token roles come from
    tokenizer_config.json / special_tokens_map.json / config.json either way: in the tokenizer.json's
    post-processor (see the module doc), or in the sentencepiece model's trainer_spec (copied byte for
    byte when they agree with its own)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    src, sp = src_dir / HF_FILE, src_dir / SENTENCEPIECE_FILE
    tok = HFTokenizer.from_bytes(src.read_bytes(), src) if src.is_file() else None
    if sp.is_file():
        sp_tok = Tokenizer.load(sp)  # a clear DataError when it is not sentencepiece
        if tok is None or _sentencepiece_is_conversion(sp_tok, tok):
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(out_dir / SENTENCEPIECE_FILE, _sentencepiece_with_roles(sp_tok, src_dir))
            return out_dir / SENTENCEPIECE_FILE
    if tok is not None:
        vocab = tok.tk

        def token_to_id(text, i):
            if text is not None:
                j = vocab.token_to_id(text)
                return None if j is None else (j, text)
            t = vocab.id_to_token(i)
            return None if t is None else (i, t)

        roles = hf_special_roles(src_dir, token_to_id)
        if "unk" not in roles and isinstance(unk := tok.spec["model"].get("unk_token"), str):
            if (j := vocab.token_to_id(unk)) is not None:
                roles["unk"] = (j, unk)
        return write_tokenizer_json(tok.spec, roles, out_dir / HF_FILE).path
    raise DataError(f"{src_dir}: no tokenizer ({HF_FILE} or {SENTENCEPIECE_FILE}); put the model's tokenizer "
                    f"files in the directory (they come with its weights on the Hugging Face hub)")


# --------------------------------------------------------------------------- llama.cpp's SPM tokenizer


def spm_vocab(tok: "HFTokenizer") -> tuple[list[str], list[float], list[str], bool]:
    """(pieces, scores, kinds, add_space_prefix) with which llama.cpp's SPM tokenizer (GGUF
    tokenizer.ggml.model "llama") tokenizes exactly as this sentencepiece-layout BPE tokenizer.json;
    kinds are "normal" | "byte" | "control" | "unknown". A DataError line says why it cannot be exact.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token (ties: the
    leftmost), where BPE applies the lowest-ranked merge. A piece's score is minus the rank of the first
    merge that makes it, which gives the same merges in the same order when: every pair of pieces that
    concatenates to a piece is a merge (llama.cpp would merge it), a piece's merges have consecutive
    ranks and come after the merges making its parts, every character of a piece is a piece, and where
    a piece p = x+y = y+z can be made two ways around a shared y, (x, y) ranks first (llama.cpp takes
    the leftmost). llama.cpp adds its space prefix always: a Metaspace prefix (skipped before a leading
    space) cannot be written. (llama.cpp's own converter, LlamaHfVocab, gives every piece -1000, so
    its merges go left to right whatever the ranks are.)"""
    spec, model = tok.spec, tok.spec.get("model") or {}
    where = f"{tok.path}:"
    if tok.prefix_scheme is None or model.get("type") != "BPE":
        raise DataError(f"{where} only byte-level BPE (GPT-2's layout) and sentencepiece-layout BPE tokenizer.json "
                        f"files export to GGUF; this one's model/normalizer/pre-tokenizer is another kind")
    if tok.prefix_scheme == "metaspace":
        raise DataError(f"{where} its Metaspace pre-tokenizer adds no dummy prefix to text that begins with a space, "
                        f"and llama.cpp always adds one, so llama.cpp would tokenize such text differently; import "
                        f"the model's tokenizer.model (llama.cpp's converter uses it too) or a legacy tokenizer.json")
    if any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")):
        raise DataError(f"{where} BPE dropout, subword prefixes/suffixes or ignore_merges have no llama.cpp equivalent")
    n = tok.vocab_size
    pieces = [tok.piece(i) for i in range(n)]
    if any(not p for p in pieces):
        raise DataError(f"{where} token id {pieces.index('')} is missing; llama.cpp needs ids 0..{n - 1}")
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    if user := [i for i, a in added.items() if not a.get("special")]:
        raise DataError(f"{where} added token {user[0]} ({pieces[user[0]]!r}) is not special; llama.cpp matches "
                        f"user-defined tokens by other rules, so the export would not be exact")
    byte = {f"<0x{b:02X}>" for b in range(256)}
    missing = sorted(byte - set(pieces))
    if missing:
        raise DataError(f"{where} byte piece {missing[0]} (and {len(missing) - 1} more) missing; llama.cpp needs all 256")
    unk = model.get("unk_token")
    kinds = ["control" if i in added else "unknown" if p == unk else "byte" if p in byte else "normal"
             for i, p in enumerate(pieces)]
    vocab = {p: i for i, p in enumerate(pieces) if kinds[i] == "normal"}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    rank = {m: r for r, m in reversed(list(enumerate(merges)))}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        p = a + b
        if a not in vocab or b not in vocab or p not in vocab:
            raise DataError(f"{where} merge {r} ({a!r} {b!r}) joins pieces that are not plain tokens; llama.cpp "
                            f"cannot follow it")
        if p in first and last[p] != r - 1:
            raise DataError(f"{where} the merges making {p!r} are not consecutive (ranks {first[p]} and {r}); "
                            f"llama.cpp ranks a piece's merges together")
        if first.get(a, -1) >= r or first.get(b, -1) >= r:
            raise DataError(f"{where} merge {r} ({a!r} {b!r}) comes before a merge making one of its parts")
        first.setdefault(p, r)
        last[p] = r
    for p in vocab:
        if any(c not in vocab for c in p):
            raise DataError(f"{where} piece {p!r} holds a character that is not a piece; llama.cpp could merge "
                            f"into it where BPE falls back to bytes")
        for k in range(1, len(p)):
            x, y = p[:k], p[k:]
            if x in vocab and y in vocab and (x, y) not in rank:
                raise DataError(f"{where} {x!r} + {y!r} makes the piece {p!r} but is not a merge; llama.cpp would "
                                f"merge it")
            z = p[len(p) - k:] if p[:k] == p[len(p) - k:] else None  # y=p[:k] is a border: p = x'+y = y+z
            if z is not None and k < len(p):
                left, right = (p[:len(p) - k], p[len(p) - k:]), (p[:k], p[k:])
                if left in rank and right in rank and rank[left] > rank[right]:
                    raise DataError(f"{where} {p!r} is made by {right} before {left}; llama.cpp prefers the leftmost "
                                    f"of two overlapping merges")
    for i, p in enumerate(pieces):
        if kinds[i] != "normal" and any(p[:k] in vocab and p[k:] in vocab for k in range(1, len(p))):
            raise DataError(f"{where} the {kinds[i]} token {p!r} is two plain pieces joined; llama.cpp would merge "
                            f"text into it")
    scores = [-float(first[p]) if kinds[i] == "normal" and p in first else 0.0 if kinds[i] == "normal" else -1000.0
              for i, p in enumerate(pieces)]
    return pieces, scores, kinds, tok.prefix_scheme == "prepend"


# --------------------------------------------------------------------------- export to transformers


def sentencepiece_tokenizer_json(tok) -> tuple[dict, dict[str, tuple[int, str]]]:
    """(tokenizer.json, roles) that tokenize exactly as a sentencepiece model with identity
    normalization: ' ' -> '▁', no pre-tokenizer (whitespace is kept and digits stay split because the
    vocabulary has no piece that joins them), byte fallback; a BPE model's merges are every (left,
    right) whose concatenation is a piece, ranked by that piece's score, as sentencepiece merges the
    highest-scoring pair first. A model with a dummy prefix (an imported Llama's) gets it as a
    Prepend('▁') normalizer, which adds it always, as sentencepiece does (transformers' Metaspace
    adds none to text that begins with a space), and a decoder that strips it again."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tok.path).read_bytes())
    norm = proto.normalizer_spec
    if (norm.name not in ("identity", "") or norm.precompiled_charsmap
            or norm.remove_extra_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix):
        raise DataError(f"{tok.path}: only sentencepiece models with identity normalization and whitespace kept "
                        f"export to Hugging Face exactly (Atlas trains those); retrain the tokenizer")
    sp = tok.sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    added = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in specials]
    roles = {r: (i, pieces[i]) for r, i in zip(ROLES, (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id)) if i >= 0}
    unk = pieces[tok.unk_id] if tok.unk_id >= 0 else None
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p: i for i, p in enumerate(pieces)}
        mergeable = {i for i in range(n) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)
                                                 or sp.is_unused(i))}
        merges = []
        for i in sorted(mergeable, key=lambda i: (-sp.get_score(i), i)):
            p = pieces[i]
            # The longest left part first: where p = x+y = y+z overlap, BPE then takes (x, y), the leftmost,
            # as sentencepiece and llama.cpp do (see spm_vocab).
            for k in range(len(p) - 1, 0, -1):
                left, right = vocab.get(p[:k]), vocab.get(p[k:])
                if left in mergeable and right in mergeable:
                    merges.append((i, left, right))
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": vocab, "merges": [[pieces[l], pieces[r]] for _, l, r in merges]}
    elif proto.trainer_spec.model_type == 1:  # unigram
        model = {"type": "Unigram", "unk_id": tok.unk_id if tok.unk_id >= 0 else None, "byte_fallback": True,
                 "vocab": [[p, float(sp.get_score(i))] for i, p in enumerate(pieces)]}
    else:
        raise DataError(f"{tok.path}: a sentencepiece model of type {proto.trainer_spec.model_type} has no "
                        f"Hugging Face equivalent here; use a bpe or unigram tokenizer")
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": model}
    if norm.add_dummy_prefix:
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                                  spec["normalizer"]]}
        spec["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return spec, roles


def write_hf_tokenizer(tok, out_dir: str | Path, model_max_length: int | None = None) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in out_dir, so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` (PreTrainedTokenizerFast, no custom code)
    gives Atlas's ids and decodes back exactly, for either backend. Returns the written paths.

    A sentencepiece tokenizer becomes `sentencepiece_tokenizer_json` (not transformers' own conversion,
    which adds a leading '▁' and splits "ROMEO:" into 4 ids where sentencepiece and llama.cpp give 2).
    split_special_tokens is on, so transformers reads special-token text as text exactly as Atlas does;
    BOS/EOS are added by id (add_bos_token/add_eos_token false: Atlas trains without BOS)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok.kind == "sentencepiece":
        spec, roles = sentencepiece_tokenizer_json(tok)
    else:
        spec = tok.spec
        roles = {r: (getattr(tok, f"{r}_id"), tok.piece(getattr(tok, f"{r}_id")))
                 for r in ROLES if getattr(tok, f"{r}_id") >= 0}
    written = write_tokenizer_json(spec, roles, out_dir / HF_FILE)
    tokens = {f"{r}_token": t for r, (_, t) in roles.items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # "<s>" in text is text, as in Atlas and llama.cpp (special=False)
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    paths = [written.path]
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
        _write_atomic(out_dir / name, (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        paths.append(out_dir / name)
    return paths
