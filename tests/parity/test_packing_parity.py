"""Parity of packed rows (SFT data.pack, issue #13): segment ids keep attention inside each example and
positions restart at 0 in each one, in the Flax model and in the torch twin (its mask spelled out).

On a GQA llama and a gpt2 (test_model_parity's configs and O(1) params), for einsum and xla
attention: a batch of packed rows (row 0: three segments filling the window; row 1: three segments
and a padding tail, segment 0) gives logits within LOGITS_ATOL and gradients within GRAD_RTOL of
torch, and the logits of each segment equal that segment run alone within ALONE_ATOL.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from atlas_jax import model as M
from atlas_torch_ref import grads_to_tree

from tests.parity.test_model_parity import (BLOCKED_BLOCK, GRAD_RTOL, LOGITS_ATOL, MAX_T, assert_close,
                                            assert_grads_close, bundle, model_config)

ALONE_ATOL = 1e-5
CASES = ["llama-gqa2-untied", "gpt2-tied"]
ATTENTIONS = ["einsum", "xla", "blocked"]
# per row: segment lengths; what is left of MAX_T is padding (segment 0)
LAYOUT = [(5, 7, 4), (6, 3, 4)]


def packed_batch(name: str) -> SimpleNamespace:
    cfg = bundle(name).cfg
    rng = np.random.default_rng(7)
    b = len(LAYOUT)
    tokens = rng.integers(0, cfg.vocab_size, (b, MAX_T), dtype=np.int32)
    targets = rng.integers(0, cfg.vocab_size, (b, MAX_T), dtype=np.int32)
    segments = np.zeros((b, MAX_T), np.int32)
    positions = np.zeros((b, MAX_T), np.int32)
    spans = []  # (row, start, stop) of each segment
    for r, lengths in enumerate(LAYOUT):
        o = 0
        for s, n in enumerate(lengths, 1):
            segments[r, o:o + n] = s
            positions[r, o:o + n] = np.arange(n)
            spans.append((r, o, o + n))
            o += n
    return SimpleNamespace(tokens=tokens, targets=targets, segments=segments, positions=positions, spans=spans)


@functools.cache
def jax_fns(name: str, attention: str, remat: str = "none") -> SimpleNamespace:
    block = {"attention_block": BLOCKED_BLOCK} if attention == "blocked" else {}  # several blocks, the mask tiled
    cfg = model_config(name, attention=attention, remat=remat, **block)
    model = M.Transformer(cfg)

    def loss(p, x, y, pos, seg):
        return M.loss_terms(p, cfg, x, y, positions_BxT=pos, segment_ids_BxT=seg)["loss"]

    return SimpleNamespace(
        packed=jax.jit(lambda p, x, pos, seg: model.apply({"params": p}, x, True, pos, seg)),
        plain=jax.jit(lambda p, x: model.apply({"params": p}, x)),
        loss_and_grad=jax.jit(jax.value_and_grad(loss)))


@functools.cache
def torch_packed(name: str) -> SimpleNamespace:
    ref, pb = bundle(name).ref, packed_batch(name)
    tokens, targets, pos, seg = (torch.from_numpy(a).long() for a in (pb.tokens, pb.targets, pb.positions, pb.segments))
    with torch.no_grad():
        logits = ref(tokens, pos, seg).numpy()
    ref.zero_grad(set_to_none=True)
    loss = ref.loss(tokens, targets, pos, seg)
    loss.backward()
    return SimpleNamespace(logits=logits, loss=loss.item(), grads=grads_to_tree(ref))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", CASES)
def test_packed_logits_and_grads_match_torch(name, attention, observe):
    b, pb, want = bundle(name), packed_batch(name), torch_packed(name)
    fns = jax_fns(name, attention)
    got = np.asarray(fns.packed(b.jax_params, pb.tokens, pb.positions, pb.segments))
    observe(f"packed logits jax vs torch, max |Δ| ({attention})",
            assert_close(f"{name} packed logits ({attention})", got, want.logits, LOGITS_ATOL))
    loss, grads = fns.loss_and_grad(b.jax_params, pb.tokens, pb.targets, pb.positions, pb.segments)
    assert abs(float(loss) - want.loss) <= 1e-5, (float(loss), want.loss)
    observe(f"packed grads jax vs torch, max rel ({attention})",
            assert_grads_close(f"{name} packed grads ({attention})", jax.tree.map(np.asarray, grads), want.grads,
                               GRAD_RTOL))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", CASES)
def test_each_segment_equals_it_run_alone(name, attention, observe):
    b, pb = bundle(name), packed_batch(name)
    fns = jax_fns(name, attention)
    packed = np.asarray(fns.packed(b.jax_params, pb.tokens, pb.positions, pb.segments))
    worst = 0.0
    for r, start, stop in pb.spans:
        alone = np.asarray(fns.plain(b.jax_params, pb.tokens[r:r + 1, start:stop]))
        worst = max(worst, assert_close(f"{name} ({attention}) row {r} segment [{start}, {stop}) packed vs alone",
                                        packed[r:r + 1, start:stop], alone, ALONE_ATOL))
    observe(f"packed segment vs alone, max |Δ| ({attention})", worst)


def test_packed_rows_under_remat_match_torch(observe):
    """nn.remat takes the mask as a traced argument (deterministic stays the static one)."""
    name = "llama-gqa2-untied"
    b, pb, want = bundle(name), packed_batch(name), torch_packed(name)
    got = np.asarray(jax_fns(name, "einsum", "full").packed(b.jax_params, pb.tokens, pb.positions, pb.segments))
    observe("packed logits jax (remat=full) vs torch, max |Δ|",
            assert_close(f"{name} packed logits (remat=full)", got, want.logits, LOGITS_ATOL))
