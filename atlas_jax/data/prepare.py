"""Corpus files -> token shards: read lazily, check, split train/val, tokenize in workers, write memmaps.

    <data_dir>/tokenizer.model   trained here when data.tokenizer is None (tokenizer.json for bytelevel)
    <data_dir>/train.bin         every train document's tokens followed by eos_id, in corpus order
    <data_dir>/val.bin           the same for val
    <data_dir>/meta.json         counts, dtype, checksums of sources and tokenizer; written last

Documents: a .txt file is one document, or several split on data.doc_separator; a .jsonl line is
one (its data.text_field). Sources with several documents are split by document: a seeded shuffle
sends about data.val_fraction of their bytes to val. A source that is one document (tinyshakespeare)
is split at the line boundary nearest (1 - val_fraction) of its bytes and its tail goes to val, as
nanoGPT validates on the last 10% of the file.

Nothing holds the corpus in memory: files are read in pieces that end at line boundaries, twice
(a check that counts each document's bytes, then tokenization), and shards are written as they go.
Before tokenization the pieces are cut again where the tokenizer says a cut changes no ids
(`Tokenizer.safe_cut`: after any newline for sentencepiece and sentencepiece-derived tokenizer.json
files, after a newline between two non-whitespace characters for GPT-2's byte-level regex, nowhere
else for other tokenizer.json files), so the shards hold exactly the ids of encoding each document
whole. A tokenizer with a dummy prefix (an imported Llama's or Mistral's: encode adds one '▁' before
the text) gets it once per segment (a document, or a single-document source's train head and val
tail): the first part of a segment is encoded as a document, the parts after a cut without the
prefix (`Tokenizer.encode_part`), which is what encoding the segment whole gives.
"""
from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from atlas_jax.config import DataConfig
from atlas_jax.data.corpora import resolve_sources, sha256_file
from atlas_jax.errors import DataError
from atlas_jax.files import DirLock, writable_dir
from atlas_jax.tokenizer import SPACE, Tokenizer, tokenizer_file_name, train_tokenizer

META_FILE = "meta.json"
SPLITS = ("train", "val")
TRAIN, VAL = 0, 1
META_FORMAT = 1
READ_BYTES = 1 << 18  # files are read, and tokenized, in pieces of about this size
LONG_LINE_BYTES = 1 << 24  # a line longer than this is cut at a character boundary instead
BYTES_PER_WORKER = 4 << 20  # a worker process costs ~0.5 s to start: below this much text per worker, fewer
SETTINGS = ("doc_separator", "text_field", "val_fraction", "split_seed")  # DataConfig fields that shape shards


# --------------------------------------------------------------------------- reading


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
                        f"re-encode the file as UTF-8") from None


def _char_boundary(data: bytes) -> int:
    """The last position in data that does not split a UTF-8 sequence."""
    cut = len(data)
    while cut > len(data) - 4 and cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    return cut - 1 if cut > 0 and data[cut - 1] >= 0xC0 else cut


def _read_text(path: Path) -> Iterator[str]:
    """A file's text in non-empty pieces that end at line boundaries; invalid UTF-8 -> DataError with offset."""
    offset, carry = 0, b""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        while True:
            block = f.read(READ_BYTES)
            data = carry + block
            if not block:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1  # '\n' never occurs inside a multi-byte sequence
                if cut == 0 and len(data) >= LONG_LINE_BYTES:
                    cut = _char_boundary(data)
            if cut:
                yield _decode(data[:cut], path, offset)
            offset, carry = offset + cut, data[cut:]
            if not block:
                return


def _line_chunks(text: str) -> Iterator[str]:
    """text in pieces of about READ_BYTES characters, cut after a '\\n' where there is one."""
    start, size = 0, READ_BYTES
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _whole_file_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    prev = None
    for text in _read_text(path):
        if prev is not None:
            yield prev, False
        prev = text
    if prev is not None:
        yield prev, True


def _separated_pieces(path: Path, sep: str) -> Iterator[tuple[str, bool]]:
    carry, open_doc = "", False  # open_doc: part of the current document was already yielded
    for text in _read_text(path):
        *done, carry = (carry + text).split(sep)
        for doc in done:
            if doc or open_doc:
                yield doc, True
            open_doc = False
        if len(carry) > READ_BYTES:
            # A separator not found yet starts after `safe`, so the text before it is this document's.
            safe = len(carry) - len(sep) + 1
            cut = carry.rfind("\n", 0, safe) + 1
            if cut:
                yield carry[:cut], False
                carry, open_doc = carry[cut:], True
    if carry or open_doc:
        yield carry, True


def _jsonl_pieces(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    def lines() -> Iterator[str]:
        carry = ""
        for text in _read_text(path):
            *done, carry = (carry + text).split("\n")
            yield from done
        yield carry

    for lineno, line in enumerate(lines(), 1):
        if doc := _jsonl_text(line, path, lineno, field):
            *pieces, last = _line_chunks(doc)
            yield from ((p, False) for p in pieces)
            yield last, True


def _jsonl_text(line: str, path: Path, lineno: int, field: str) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{lineno}: no '{field}' field (found: {keys}); "
                        f"set data.text_field (--text-field) to the field holding the text")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field '{field}' is {type(text).__name__}, expected a string")
    if "\\ud" in line.lower():  # only a \uD800-\uDFFF escape can make text that is not UTF-8
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{path}:{lineno}: field '{field}' holds a lone surrogate "
                            f"{text[e.start]!r} (not valid UTF-8); fix the escape") from None
    return text


def iter_pieces(path: Path, cfg: DataConfig) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) for a source file, in non-empty pieces cut at line boundaries."""
    if path.suffix == ".jsonl":
        return _jsonl_pieces(path, cfg.text_field)
    if cfg.doc_separator is None:
        return _whole_file_pieces(path)
    if not cfg.doc_separator:
        raise DataError("data.doc_separator is empty; use null for one document per file")
    return _separated_pieces(path, cfg.doc_separator)


def iter_texts(paths: Iterable[Path], cfg: DataConfig) -> Iterator[str]:
    """All text of the sources, piece by piece (tokenizer training)."""
    for path in paths:
        for text, _ in iter_pieces(path, cfg):
            yield text


# --------------------------------------------------------------------------- split


def _scan(paths: list[Path], cfg: DataConfig) -> list[np.ndarray]:
    """Check every source (UTF-8, JSON, not empty); per source, the UTF-8 bytes of each document."""
    out = []
    for path in paths:
        lengths, n, has_text = [], 0, False
        for text, end in iter_pieces(path, cfg):
            n += len(text.encode("utf-8"))
            has_text = has_text or (bool(text) and not text.isspace())
            if end:
                lengths.append(n)
                n = 0
        if not has_text:
            raise DataError(f"{path}: no text (the file is empty or only whitespace); "
                            f"remove it from data.sources")
        out.append(np.array(lengths, dtype=np.int64))
    return out


def _val_documents(doc_bytes: list[np.ndarray], val_fraction: float, seed: int) -> list[np.ndarray | None]:
    """Per source: a bool per document (True = val) for sources of several documents, None for one."""
    multi = [s for s, lengths in enumerate(doc_bytes) if len(lengths) > 1]
    out: list[np.ndarray | None] = [None] * len(doc_bytes)
    if not multi:
        return out
    sizes = np.concatenate([doc_bytes[s] for s in multi])
    order = np.random.default_rng(seed).permutation(len(sizes))
    cum = np.cumsum(sizes[order])
    # The number of shuffled documents whose bytes come nearest the target, at least 1 and leaving 1.
    k = 1 + int(np.argmin(np.abs(cum[:-1] - val_fraction * cum[-1])))
    is_val = np.zeros(len(sizes), dtype=bool)
    is_val[order[:k]] = True
    for s, part in zip(multi, np.split(is_val, np.cumsum([len(doc_bytes[s]) for s in multi])[:-1])):
        out[s] = part
    return out


def _line_split(pieces: Iterator[tuple[str, bool]], total: int, val_fraction: float):
    """One document -> train head, EOS, val tail EOS; cut at the line boundary nearest the target byte."""
    target = min(total, round((1 - val_fraction) * total))
    seen, cut, val_text = 0, None, False
    for text, end in pieces:
        if cut is not None:
            yield text, VAL
            val_text = True
        else:
            data = text.encode("utf-8")
            if seen + len(data) < target:
                yield text, TRAIN
            else:  # pieces start at line boundaries, so the nearest boundary is inside this one
                k = target - seen
                left = data.rfind(b"\n", 0, k) + 1
                right = data.find(b"\n", k)
                right = len(data) if right < 0 else right + 1
                k = left if k - left <= right - k else right
                cut = seen + k
                if k:
                    yield data[:k].decode("utf-8"), TRAIN
                if cut:
                    yield None, TRAIN
                if k < len(data):
                    yield data[k:].decode("utf-8"), VAL
                    val_text = True
            seen += len(data)
        if end and val_text:
            yield None, VAL


def _split_items(paths: list[Path], cfg: DataConfig, doc_bytes: list[np.ndarray]):
    """The corpus as (text, split) items in order, with (None, split) for each segment's EOS."""
    val_docs = _val_documents(doc_bytes, cfg.val_fraction, cfg.split_seed)
    for path, lengths, is_val in zip(paths, doc_bytes, val_docs):
        pieces = iter_pieces(path, cfg)
        if is_val is None:
            yield from _line_split(pieces, int(lengths[0]), cfg.val_fraction)
            continue
        doc = 0
        for text, end in pieces:
            split = VAL if is_val[doc] else TRAIN
            yield text, split
            if end:
                yield None, split
                doc += 1


# --------------------------------------------------------------------------- tokenize


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    tok = Tokenizer.load(tokenizer_path)
    _WORKER.update(tok=tok, dtype=np.dtype(dtype), eos=np.array([tok.eos_id], dtype=dtype))


def _encode(tok: Tokenizer, text: str, dtype: np.dtype, first: bool) -> np.ndarray:
    if tok.kind == "sentencepiece":
        return _encode_lines(tok, text, dtype, first)
    return np.asarray(tok.encode_part(text, first), dtype=dtype)  # text ends at a safe cut (_exact_pieces)


def _encode_lines(tok, text: str, dtype: np.dtype, first: bool) -> np.ndarray:
    """encode_part(text, first) line by line: the same ids when no piece spans a newline
    (`_check_tokenizer` refuses a tokenizer that has one), and several times faster than one long
    string through sentencepiece's BPE. Only the segment's first line gets the dummy prefix (if any)."""
    lines = text.split("\n")
    parts = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        parts.append(lines[-1])
    head = tok.sp.encode(parts[:1], num_threads=1) if first and tok.dummy_prefix else []
    rest = tok.sp_continuation.encode(parts[len(head):], num_threads=1)
    return np.fromiter(itertools.chain.from_iterable(head + rest), dtype=dtype)


def _tokenize_task(items: list[tuple[str | None, int, bool]]):
    """-> per split: tokens (EOS included), UTF-8 bytes, segments, in the order of the items."""
    tok, dtype, eos = _WORKER["tok"], _WORKER["dtype"], _WORKER["eos"]
    arrays: tuple[list, list] = ([], [])
    nbytes, segments = [0, 0], [0, 0]
    for text, split, first in items:
        if text is None:
            arrays[split].append(eos)
            segments[split] += 1
        else:
            arrays[split].append(_encode(tok, text, dtype, first))
            nbytes[split] += len(text.encode("utf-8"))
    tokens = [np.concatenate(a) if a else np.zeros(0, dtype) for a in arrays]
    return tokens, nbytes, segments


def _exact_pieces(items: Iterator[tuple[str | None, int]], tok: Tokenizer
                  ) -> Iterator[tuple[str | None, int, bool]]:
    """The items re-cut so that every text ends where `tok.safe_cut` allows: what follows a piece's
    last safe cut is carried into the next piece of its segment; a segment's EOS (None) flushes it.
    Each item gains `first`: its text begins a segment (encoded with the dummy prefix, if any)."""
    carry: list[str] = []  # text after the last safe cut, in parts (joined once: no quadratic copies)
    carry_split = TRAIN
    fresh = [True, True]  # per split: the next text begins a segment

    def out(text: str, split: int):
        first, fresh[split] = fresh[split], False
        return text, split, first

    for text, split in items:
        if carry and (text is None or split != carry_split):
            yield out("".join(carry), carry_split)
            carry = []
        if text is None:
            yield None, split, False
            fresh[split] = True
            continue
        head = carry[-1][-2:] if carry else ""  # a cut may fall where the carry meets the new text
        k = tok.safe_cut(head + text) - len(head)
        if k > 0 or (k == 0 and head):
            yield out("".join(carry) + text[:k], split)
            carry = []
        if k < len(text):
            carry.append(text[max(k, 0):])
        carry_split = split
    if carry:
        yield out("".join(carry), carry_split)


def _tasks(items: Iterator[tuple[str | None, int, bool]]) -> Iterator[list[tuple[str | None, int, bool]]]:
    task, size = [], 0
    for item in items:
        task.append(item)
        size += len(item[0]) if item[0] is not None else 0
        if size >= READ_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task


def _tokenized(tasks: Iterator[list], tokenizer_path: Path, dtype: str, workers: int):
    """Results of _tokenize_task in task order; several processes, a bounded number of tasks in flight."""
    if workers <= 1:
        _init_worker(str(tokenizer_path), dtype)
        yield from map(_tokenize_task, tasks)
        return
    # spawn, not fork: the caller may already run JAX's threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), dtype)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_tokenize_task, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Appends tokens to a memmap of `capacity` tokens (grown if need be), trimmed on close."""

    def __init__(self, path: Path, dtype: str, capacity: int):
        self.path, self.tmp, self.n = path, path.with_name(path.name + ".tmp"), 0
        self.mm = np.memmap(self.tmp, dtype=dtype, mode="w+", shape=(max(capacity, 1),))

    def write(self, tokens: np.ndarray) -> None:
        if self.n + len(tokens) > len(self.mm):
            size = max(2 * len(self.mm), self.n + len(tokens))
            self.mm.flush()
            dtype = self.mm.dtype
            del self.mm
            os.truncate(self.tmp, size * dtype.itemsize)
            self.mm = np.memmap(self.tmp, dtype=dtype, mode="r+", shape=(size,))
        self.mm[self.n:self.n + len(tokens)] = tokens
        self.n += len(tokens)

    def discard(self) -> None:
        """Drop the unfinished shard (an error while tokenizing): no .tmp is left in the data dir."""
        if hasattr(self, "mm"):
            del self.mm
        self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self.mm.flush()
        itemsize = self.mm.dtype.itemsize
        del self.mm
        os.truncate(self.tmp, self.n * itemsize)
        self.tmp.replace(self.path)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def _write_shards(paths, cfg: DataConfig, doc_bytes, tok: Tokenizer, data_dir: Path, workers: int) -> dict:
    dtype = token_dtype(tok.vocab_size)
    # With our tokenizers a token stands for one byte or more: a split has at most bytes + segments tokens.
    capacity = sum(int(b.sum()) + len(b) for b in doc_bytes)
    writers = [ShardWriter(data_dir / f"{name}.bin", dtype, capacity) for name in SPLITS]
    nbytes, segments = [0, 0], [0, 0]
    items = _exact_pieces(_split_items(paths, cfg, doc_bytes), tok)
    try:
        for tokens, b, s in _tokenized(_tasks(items), tok.path, dtype, workers):
            for split in (TRAIN, VAL):
                writers[split].write(tokens[split])
                nbytes[split] += b[split]
                segments[split] += s[split]
    except BaseException:
        for w in writers:
            w.discard()
        raise
    for w in writers:
        w.close()
    return {name: {"file": w.path.name, "tokens": w.n, "bytes": nbytes[i], "documents": segments[i]}
            for i, (name, w) in enumerate(zip(SPLITS, writers))}


# --------------------------------------------------------------------------- meta + entry points


def run_data_dir(data: DataConfig, run_dir: str | Path) -> Path:
    """Where a run's prepared data lives: data.data_dir when set, else <run_dir>/data."""
    return Path(data.data_dir) if data.data_dir else Path(run_dir) / "data"


def read_meta(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: corrupt; delete {data_dir} to prepare the data again") from None
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: written by another version of Atlas; delete {data_dir} to prepare again")
    return meta


def _fingerprints(paths: list[Path], meta: dict | None) -> list[dict]:
    """Path, size, mtime and sha256 of each source; the sha256 in meta is reused when size and mtime match."""
    known = {s["path"]: s for s in (meta or {}).get("sources", [])}
    out = []
    for path in paths:
        st = path.stat()
        old = known.get(str(path), {})
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        out.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": old["sha256"] if same else sha256_file(path)})
    return out


def _settings(cfg: DataConfig) -> dict:
    return {k: getattr(cfg, k) for k in SETTINGS}


def _is_fresh(meta: dict, sources: list[dict], cfg: DataConfig, data_dir: Path) -> bool:
    def key(s):
        return s["path"], s["sha256"]
    if [key(s) for s in meta["sources"]] != [key(s) for s in sources] or meta["settings"] != _settings(cfg):
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all((data_dir / m["file"]).is_file() and (data_dir / m["file"]).stat().st_size == m["tokens"] * itemsize
               for m in meta["splits"].values())


def _check_tokenizer(tok: Tokenizer, vocab_size: int | None, trained_here: bool) -> None:
    # A tokenizer given by data.tokenizer (an imported model's) may be smaller than a padded embedding.
    if vocab_size is not None and (tok.vocab_size != vocab_size if trained_here else tok.vocab_size > vocab_size):
        hint = f" or delete {tok.path} to train a new one" if trained_here else ""
        raise DataError(f"{tok.path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size={tok.vocab_size}{hint}")
    if tok.eos_id < 0:
        raise DataError(f"{tok.path}: the tokenizer has no EOS token, which ends every document in the shards; "
                        f"import it with its model directory (tokenizer_config.json names eos_token)")
    if tok.kind == "sentencepiece":
        # Text is tokenized line by line (`_encode_lines`), which equals whole-document encoding only when
        # no piece spans a newline: refuse a tokenizer with such a piece rather than write other ids.
        sp = tok.sp
        for i in range(tok.vocab_size):
            piece = sp.id_to_piece(i)
            if not sp.is_byte(i) and "\n" in piece[:-1]:  # a newline ending a piece stays inside its line
                raise DataError(f"{tok.path}: piece {i} ({piece!r}) spans a newline, and Atlas tokenizes text line "
                                f"by line, which would give other ids than encoding whole documents; use a tokenizer "
                                f"without such pieces (`python -m atlas_jax.tokenizer train` makes one)")
    # Text is tokenized in pieces, which is exact only when encoding loses nothing and cutting changes no
    # ids. A dummy prefix that the tokenizer declares (`dummy_prefix`: a '▁' before the text, once) and
    # that decoding removes again loses nothing; an undeclared one (GPT-2's add_prefix_space) or a
    # normalization (NFKC's 'ﬁ' -> 'fi', collapsed whitespace) is refused. A transformers Metaspace
    # prefix, skipped when the text begins with a space, makes " a" and "a" the same ids: only that
    # leading space of a document is lost, the ids are still transformers', so it is accepted too.
    probe = "a  b\n\tc\nd \u00e9\ufb01 X"
    cut = tok.safe_cut(probe)
    ids = tok.encode(probe)
    leading = " " + probe  # kept exactly unless the tokenizer has a dummy prefix of transformers' kind
    if (tok.decode(ids) != probe
            or (tok.decode(tok.encode(leading)) != leading and getattr(tok, "prefix_scheme", None) != "metaspace")
            or (not tok.dummy_prefix and tok.piece(tok.encode("a")[0]).startswith((SPACE, "\u0120")))
            or (cut and tok.encode_part(probe[:cut], True) + tok.encode_part(probe[cut:], False) != ids)):
        raise DataError(f"{tok.path}: this tokenizer adds a dummy prefix or normalizes whitespace, which "
                        f"would change the text; train one with `python -m atlas_jax.tokenizer train`")


def prepare(data_cfg: DataConfig, data_dir: str | Path, vocab_size: int | None = None,
            force: bool = False, log: Callable[[str], None] = print, what: str = "data.data_dir") -> dict:
    """Make data_dir hold a tokenizer and shards matching the config; return meta.

    Quick when shards and meta already match the sources (size+mtime, else sha256), the settings and
    the tokenizer. vocab_size: the tokenizer's size must equal it; it is required to train one.
    Writing takes data_dir's lock (a second writer is refused); `what` is the name errors give it.
    """
    data_dir = Path(data_dir)
    paths = resolve_sources(data_cfg.sources)
    meta = read_meta(data_dir)
    sources = _fingerprints(paths, meta)
    own = data_cfg.tokenizer is None
    tok_path = data_dir / tokenizer_file_name(data_cfg.tokenizer_type) if own else Path(data_cfg.tokenizer)
    tok = Tokenizer.load(tok_path) if (tok_path.exists() or not own) else None
    if tok is not None:
        _check_tokenizer(tok, vocab_size, own)
        if meta is not None and meta["tokenizer"]["sha256"] != tok.sha256:
            raise DataError(
                f"{data_dir}: its shards were made with another tokenizer (sha256 "
                f"{meta['tokenizer']['sha256'][:12]}, {meta['tokenizer']['path']}) than {tok.path} (sha256 "
                f"{tok.sha256[:12]}); delete {data_dir} to prepare again or point data.data_dir elsewhere")
        if meta is not None and not force and _is_fresh(meta, sources, data_cfg, data_dir):
            log(f"{data_dir}: up to date, {_summary(meta)}")
            return meta

    if tok is None and vocab_size is None:
        raise DataError("a vocab size is needed to train a tokenizer (model.vocab_size / --vocab-size), "
                        "or name an existing one with data.tokenizer (--tokenizer)")
    writable_dir(data_dir, what)
    with DirLock(data_dir, what, "another `data prepare` or trainer is writing it; wait for it"):
        return _write_all(paths, data_cfg, data_dir, tok, tok_path, vocab_size, sources, log)


def _write_all(paths, data_cfg: DataConfig, data_dir: Path, tok, tok_path: Path, vocab_size, sources, log) -> dict:
    """The tokenizer (when it is trained here), the shards and meta.json of data_dir (locked by the caller)."""
    start = time.perf_counter()
    log(f"reading {len(paths)} source file(s): {', '.join(p.name for p in paths[:5])}"
        f"{' ...' if len(paths) > 5 else ''}")
    doc_bytes = _scan(paths, data_cfg)
    if tok is None:
        log(f"training a {data_cfg.tokenizer_type} tokenizer with {vocab_size} pieces -> {tok_path}")
        tok = train_tokenizer(iter_texts(paths, data_cfg), data_dir, vocab_size, data_cfg.tokenizer_type)
    (data_dir / META_FILE).unlink(missing_ok=True)  # shards are in flux until meta is written again
    total = sum(int(b.sum()) for b in doc_bytes)
    workers = max(1, min(data_cfg.num_workers, total // BYTES_PER_WORKER))
    log(f"tokenizing {total:,} bytes in {workers} process(es)")
    splits = _write_shards(paths, data_cfg, doc_bytes, tok, data_dir, workers)
    meta = {
        "format": META_FORMAT,
        "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size), "eos_id": tok.eos_id,
        "tokenizer": {"path": str(tok.path.resolve()), "sha256": tok.sha256},
        "sources": [dict(s, documents=len(b)) for s, b in zip(sources, doc_bytes)],
        "settings": _settings(data_cfg), "seed": data_cfg.split_seed,
        "splits": splits, "seconds": round(time.perf_counter() - start, 3),
    }
    tmp = data_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(data_dir / META_FILE)
    log(f"wrote {data_dir}: {_summary(meta)} in {meta['seconds']:.1f}s")
    return meta


def _summary(meta: dict) -> str:
    return ", ".join(f"{name} {m['tokens']:,} tokens ({m['bytes']:,} bytes, {m['documents']:,} docs)"
                     for name, m in meta["splits"].items()) + f", {meta['dtype']}, vocab {meta['vocab_size']}"


def ensure_prepared(data_cfg: DataConfig, vocab_size: int, data_dir: str | Path,
                    log: Callable[[str], None] = print) -> dict:
    """The trainer's entry: prepare data_dir for this config and model.vocab_size unless it already is."""
    return prepare(data_cfg, data_dir, vocab_size, log=log)


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """The tokens of 'train' or 'val' as a read-only memmap."""
    if split not in SPLITS:
        raise DataError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    meta = read_meta(data_dir)
    if meta is None:
        raise DataError(f"{data_dir}: no {META_FILE}; prepare it with `python -m atlas_jax.data prepare` "
                        f"or let training prepare it")
    info = meta["splits"][split]
    if info["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(Path(data_dir) / info["file"], dtype=meta["dtype"], mode="r", shape=(info["tokens"],))
