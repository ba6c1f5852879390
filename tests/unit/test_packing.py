"""SFT packing (data.pack, issue #13): conversations packed greedily in order into rows of seq_len + 1,
with segment ids / positions aligned with the tokens and weights that never cross a conversation."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from atlas_jax.config import load_config
from atlas_jax.errors import ConfigError
from atlas_jax.finetune.batches import as_batch
from atlas_jax.finetune.data import encode_conversation, sft_conversation, sft_rows
from atlas_jax.finetune.templates import load_template

TOK = SimpleNamespace(encode=lambda s: [ord(c) % 250 + 3 for c in s], eos_id=1, pad_id=0)
EXAMPLES = [("Hi", "Yo"), ("What is two and two?", "Four."), ("A", "B"), ("x" * 10, "y" * 300), ("Q", "R")]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in EXAMPLES))
    return path


def test_sft_rows_pack_conversations_greedily_in_order(jsonl):
    template, seq_len = load_template("chatml"), 200
    convs = [encode_conversation(sft_conversation({"prompt": p, "completion": c}, "x"), template, TOK.encode, TOK.eos_id)
             for p, c in EXAMPLES]
    lengths = [len(t) for t, _ in convs]
    padded = sft_rows([jsonl], template, TOK, seq_len)
    packed = sft_rows([jsonl], template, TOK, seq_len, pack=True)
    assert padded.segments is None and len(padded) == len(EXAMPLES)
    # the greedy layout, recomputed from the lengths
    rows, used = [], seq_len + 1
    for i, n in enumerate(lengths):
        n = min(n, seq_len + 1)
        if used + n > seq_len + 1:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    assert len(packed) == len(rows) < len(EXAMPLES) and packed.truncated == padded.truncated == 1
    assert packed.tokens.shape == packed.segments.shape == packed.positions.shape == (len(rows), seq_len + 1)
    assert packed.segments.dtype == packed.positions.dtype == np.int32
    for r, members in enumerate(rows):
        o = 0
        for s, i in enumerate(members, 1):
            t, w = convs[i]
            n = min(len(t), seq_len + 1)
            assert packed.tokens[r, o:o + n].tolist() == t[:n]
            assert (packed.segments[r, o:o + n] == s).all() and packed.positions[r, o:o + n].tolist() == list(range(n))
            assert packed.weights[r, o:o + n - 1].tolist() == w[1:n]
            if o + n <= seq_len:  # the target across the boundary (or into padding) weighs 0
                assert packed.weights[r, o + n - 1] == 0.0
            o += n
        assert (packed.segments[r, o:] == 0).all() and (packed.weights[r, o:] == 0).all()
        assert (packed.tokens[r, o:] == TOK.pad_id).all()
    # the same assistant tokens carry loss either way
    assert packed.weights.sum() == padded.weights.sum()
    batch = as_batch({"": packed.take(np.array([1, 0]))})
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert batch["segment_ids"].shape == batch["positions"].shape == batch["inputs"].shape == (2, seq_len)
    assert (batch["segment_ids"] == packed.segments[[1, 0], :-1]).all()
    assert (batch["positions"] == packed.positions[[1, 0], :-1]).all()
    assert set(as_batch({"": padded.take(np.array([0]))})) == {"inputs", "targets", "weights"}


def test_data_pack_is_for_sft_only():
    assert load_config(None, []).data.pack is False
    with pytest.raises(ConfigError, match="data.pack"):
        load_config(None, ["data.pack=true", "train.objective=dpo", "train.init_from=run:x"])
