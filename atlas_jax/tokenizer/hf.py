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

`safe_cut(text)` says where text may be cut without changing ids (data preparation encodes a long
document in pieces): for the GPT-2 regex, after a '\\n' that has a non-whitespace character on both
sides (the regex always ends a piece there, and neither piece looks across it); other tokenizers
are encoded one whole document at a time.
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

    def safe_cut(self, text: str) -> int:
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


def import_hf_tokenizer(src_dir: str | Path, out_dir: str | Path) -> Path:
    """The run's tokenizer file from a Hugging Face model directory: out_dir/tokenizer.json (roles
    from tokenizer_config.json / special_tokens_map.json / config.json) when there is a tokenizer.json,
    else a sentencepiece tokenizer.model copied as it is. Returns the written path."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    src = src_dir / HF_FILE
    if src.is_file():
        tok = HFTokenizer.from_bytes(src.read_bytes(), src)
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
    sp = src_dir / SENTENCEPIECE_FILE
    if sp.is_file():
        data = sp.read_bytes()
        Tokenizer.load(sp)  # a clear DataError when it is not sentencepiece
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / SENTENCEPIECE_FILE, data)
        return out_dir / SENTENCEPIECE_FILE
    raise DataError(f"{src_dir}: no tokenizer ({HF_FILE} or {SENTENCEPIECE_FILE}); put the model's tokenizer "
                    f"files in the directory (they come with its weights on the Hugging Face hub)")


# --------------------------------------------------------------------------- export to transformers


def sentencepiece_tokenizer_json(tok) -> tuple[dict, dict[str, tuple[int, str]]]:
    """(tokenizer.json, roles) that tokenize exactly as an Atlas sentencepiece model: identity
    normalization but ' ' -> '▁', no dummy prefix, no pre-tokenizer (whitespace is kept and digits stay
    split because the vocabulary has no piece that joins them), byte fallback; a BPE model's merges are
    every (left, right) whose concatenation is a piece, ranked by that piece's score, as sentencepiece
    merges the highest-scoring pair first."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tok.path).read_bytes())
    norm = proto.normalizer_spec
    if (norm.name not in ("identity", "") or norm.precompiled_charsmap or norm.add_dummy_prefix
            or norm.remove_extra_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix):
        raise DataError(f"{tok.path}: only sentencepiece models with identity normalization, no dummy prefix and "
                        f"whitespace kept export to Hugging Face exactly (Atlas trains those); retrain the tokenizer")
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
            for k in range(1, len(p)):
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
