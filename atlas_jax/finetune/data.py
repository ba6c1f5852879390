"""Fine-tuning data: JSONL examples -> chat-template text -> token rows with a loss mask.

SFT rows (`train.objective: sft`), one JSON object per line, either
    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
DPO rows (`train.objective: dpo`):
    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"messages": [...prompt turns...], "chosen": "...", "rejected": "..."}
(chosen / rejected may also be a list holding one assistant message, as trl writes them).

Every conversation is rendered with the run's chat template (atlas_jax.finetune.templates, Jinja as
Hugging Face and llama.cpp use them). The text is cut at message boundaries: each non-assistant
stretch and each assistant reply (with the template's end-of-turn text) is encoded on its own and
the pieces concatenated, the reply followed by the tokenizer's EOS. Exactly the assistant tokens
(reply, end-of-turn text, EOS) carry loss weight 1; the prompt, system and user turns weigh 0. A
prompt is tokenized just as `generate --chat` tokenizes it (render with add_generation_prompt, then
encode), so training and inference see the same prompt tokens.

Rows are padded to data.seq_len + 1 tokens (pad weight 0), one conversation a row; with data.pack
(SFT only) conversations are packed greedily, in file order, into rows of data.seq_len + 1 tokens:
each goes into the current row if it fits in what is left, else starts the next one (the rest of the
row padded, weight 0). A packed row carries `segments` (1, 2, ... per conversation, 0 = padding) and
`positions` (restarting at 0 in each conversation), which the model uses to keep attention inside
each conversation; the target that would cross into the next conversation weighs 0. A reply that
does not fit is cut at the window (counted and logged); a prompt that alone leaves no room for a
reply token is refused, naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from atlas_jax.errors import DataError
from atlas_jax.finetune.templates import ChatTemplate

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class Rows:
    """Token rows of seq_len + 1 and their loss weights (aligned with the targets, i.e. tokens[1:]);
    packed rows (data.pack) also carry segment ids and positions, aligned with the tokens."""
    tokens: np.ndarray  # int32 [N, T + 1]
    weights: np.ndarray  # float32 [N, T]
    truncated: int = 0  # replies cut at the window
    segments: np.ndarray | None = None  # int32 [N, T + 1]: 1, 2, ... per conversation, 0 = padding
    positions: np.ndarray | None = None  # int32 [N, T + 1]: restarting at 0 in each conversation

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx) -> "Rows":
        return Rows(self.tokens[idx], self.weights[idx],
                    segments=None if self.segments is None else self.segments[idx],
                    positions=None if self.positions is None else self.positions[idx])


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    n = 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not a JSON object ({e.msg}); one example per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: not a JSON object; one example per line")
        n += 1
        yield i, row
    if n == 0:
        raise DataError(f"{path}: no examples (an empty JSONL file)")


def _messages(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every message needs a string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: role '{m['role']}' is not one the chat template knows ({', '.join(ROLES)})")
    return msgs


def _reply(value, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise DataError(f"{where}: '{key}' must be a string (or a list of one assistant message)")


def sft_conversation(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        msgs = _messages(row, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message: nothing to learn from")
        return msgs
    missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing string field(s) {', '.join(missing)}; an SFT row is "
                        f"{{\"prompt\", \"completion\"}} or {{\"messages\": [...]}}")
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def dpo_prompt(row: dict, where: str) -> tuple[list[dict], str, str]:
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if "messages" not in row and not isinstance(row.get("prompt"), str):
        missing.insert(0, "prompt")
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; a DPO row is "
                        f"{{\"prompt\", \"chosen\", \"rejected\"}} or {{\"messages\", \"chosen\", \"rejected\"}}")
    prompt = _messages(row, where) if "messages" in row else [{"role": "user", "content": row["prompt"]}]
    return prompt, _reply(row["chosen"], where, "chosen"), _reply(row["rejected"], where, "rejected")


def encode_conversation(msgs: list[dict], template: ChatTemplate, encode: Callable[[str], list[int]],
                        eos_id: int) -> tuple[list[int], list[float]]:
    """(tokens, weights per token): assistant replies (+ end-of-turn text + EOS) weigh 1."""
    tokens: list[int] = []
    weights: list[float] = []
    done = ""  # text rendered so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = template.render(msgs[:i], add_generation_prompt=True)
        full = template.render(msgs[:i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "use one that does (chatml, or a Hugging Face model's own)")
        context = encode(prefix[len(done):])
        reply = encode(full[len(prefix):]) + [eos_id]
        tokens += context + reply
        weights += [0.0] * len(context) + [1.0] * len(reply)
        done = full
    return tokens, weights


def _pad(seqs: list[tuple[list[int], list[float]]], seq_len: int, pad_id: int) -> Rows:
    n = len(seqs)
    tokens = np.full((n, seq_len + 1), pad_id, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    truncated = 0
    for r, (t, w) in enumerate(seqs):
        if len(t) > seq_len + 1:
            truncated += 1
            t, w = t[:seq_len + 1], w[:seq_len + 1]
        tokens[r, :len(t)] = t
        # weights align with targets: target j is token j + 1
        weights[r, :len(t) - 1] = w[1:len(t)]
    return Rows(tokens, weights, truncated)


def _pack(seqs: list[tuple[list[int], list[float]]], seq_len: int, pad_id: int) -> Rows:
    """Greedy in-order packing into rows of seq_len + 1 tokens (a conversation longer than a row is
    cut, as in `_pad`, and fills a row of its own)."""
    width = seq_len + 1
    placed: list[list[tuple[list[int], list[float]]]] = []  # per row, its conversations
    used = width  # tokens used in the current row; width: start a new row
    truncated = 0
    for t, w in seqs:
        if len(t) > width:
            truncated += 1
            t, w = t[:width], w[:width]
        if used + len(t) > width:
            placed.append([])
            used = 0
        placed[-1].append((t, w))
        used += len(t)
    n = len(placed)
    tokens = np.full((n, width), pad_id, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    segments = np.zeros((n, width), np.int32)
    positions = np.zeros((n, width), np.int32)
    for r, row in enumerate(placed):
        o = 0
        for s, (t, w) in enumerate(row, 1):
            m = len(t)
            tokens[r, o:o + m] = t
            segments[r, o:o + m] = s
            positions[r, o:o + m] = np.arange(m)
            # target j is token j + 1; the last token's target (the next conversation's first) weighs 0
            weights[r, o:o + m - 1] = w[1:m]
            o += m
    return Rows(tokens, weights, truncated, segments, positions)


def _check_fits(where: str, tokens: list[int], weights: list[float], seq_len: int) -> None:
    first_reply = weights.index(1.0) if 1.0 in weights else len(weights)
    if first_reply >= seq_len + 1:
        raise DataError(f"{where}: the prompt alone is {first_reply} tokens, leaving no room for a reply in "
                        f"data.seq_len={seq_len}; raise data.seq_len or shorten the prompt")


def sft_rows(paths: list[Path], template: ChatTemplate, tok, seq_len: int, pack: bool = False) -> Rows:
    """One padded row per conversation, or with `pack` (data.pack) conversations packed into rows."""
    seqs = []
    for path in paths:
        for line, row in read_jsonl(path):
            where = f"{path}:{line}"
            t, w = encode_conversation(sft_conversation(row, where), template, tok.encode, tok.eos_id)
            _check_fits(where, t, w, seq_len)
            seqs.append((t, w))
    return (_pack if pack else _pad)(seqs, seq_len, _pad_id(tok))


def dpo_rows(paths: list[Path], template: ChatTemplate, tok, seq_len: int) -> tuple[Rows, Rows]:
    """(chosen rows, rejected rows), row i of each the same prompt."""
    chosen, rejected = [], []
    for path in paths:
        for line, row in read_jsonl(path):
            where = f"{path}:{line}"
            prompt, good, bad = dpo_prompt(row, where)
            for reply, out in ((good, chosen), (bad, rejected)):
                t, w = encode_conversation(prompt + [{"role": "assistant", "content": reply}], template,
                                           tok.encode, tok.eos_id)
                _check_fits(where, t, w, seq_len)
                out.append((t, w))
    return _pad(chosen, seq_len, _pad_id(tok)), _pad(rejected, seq_len, _pad_id(tok))


def _pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id >= 0 else tok.eos_id


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a seeded permutation; at least one val example when there are two."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = int(round(n * val_fraction))
    n_val = min(max(n_val, 1 if n > 1 and val_fraction > 0 else 0), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
