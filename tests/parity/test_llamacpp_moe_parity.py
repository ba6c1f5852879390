"""Real llama.cpp runs Atlas' mixture-of-experts models as Atlas does.

A llama with every layer MoE is written as llama.cpp's converter writes Mixtral: `llama`
architecture, blk.N.ffn_gate_inp (the router, kept f32), ffn_{gate,up,down}_exps stacked with the
expert on the slowest axis, llama.expert_count / expert_used_count. llama.cpp's logits on 48-token
prompts (f32 KV cache) equal Atlas' within 1e-4 for f32 files, greedy text matches, f16 stays
within 2e-2, and q8_0 / q4_0 cost at most twice what they cost the same model without experts. Params are the parity suite's O(1) draws, so routing is decided by clear margins.
"""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from atlas_jax.config import ModelConfig, SampleConfig, resolve_model
from atlas_jax.export.gguf import ExportError, export_gguf
from atlas_jax.export.llamacpp import llamacpp_generate, llamacpp_logits
from atlas_jax.export.quality import atlas_logits

from .test_model_parity import parity_params

import llama_cpp  # noqa: E402,F401  (part of the test install: a missing llama.cpp is a failure, not a skip)

PROMPT_TOKENS = 48
CASES = {
    "moe-e4-k2-tied": dict(moe_experts=4, moe_experts_per_token=2, n_kv_heads=2),
    "moe-e3-k1-f96-untied": dict(moe_experts=3, moe_experts_per_token=1, moe_d_ff=96, tie_embeddings=False),
}
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n")


@pytest.fixture(scope="module")
def prompts(shakespeare_tokenizer) -> np.ndarray:
    ids = shakespeare_tokenizer.encode(TEXT * 4)
    return np.asarray(ids[:2 * PROMPT_TOKENS], np.int32).reshape(2, PROMPT_TOKENS)


def build(case: str, vocab_size: int, **extra):
    cfg = resolve_model(ModelConfig(arch="llama", vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
                                    max_seq_len=64, **{**CASES[case], **extra}))
    return cfg, parity_params(cfg, seed=list(CASES).index(case))


@pytest.mark.parametrize("case", CASES)
def test_moe_f32_logits_match_atlas(case, prompts, tmp_path, shakespeare_tokenizer, observe):
    cfg, params = build(case, shakespeare_tokenizer.vocab_size)
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / f"{case}.gguf")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    e, f = cfg.moe_experts, cfg.moe_d_ff
    # gguf-py lists ggml's dims fastest first: {n_embd, n_ff, n_expert} for gate/up, {n_ff, n_embd, n_expert} down
    assert [int(x) for x in tensors["blk.1.ffn_gate_exps.weight"].shape] == [64, f, e]
    assert [int(x) for x in tensors["blk.1.ffn_down_exps.weight"].shape] == [f, 64, e]
    assert [int(x) for x in tensors["blk.0.ffn_gate_inp.weight"].shape] == [64, e]
    assert "blk.0.ffn_gate.weight" not in tensors
    field = reader.fields["llama.expert_used_count"]
    assert int(field.parts[field.data[0]][0]) == cfg.moe_experts_per_token
    ref = atlas_logits(params, cfg, prompts)
    got = np.stack(llamacpp_logits(path, [p.tolist() for p in prompts]))
    diff = np.abs(got - ref)
    observe("llama.cpp moe f32 max|dlogit|", float(diff.max()))
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    assert diff.max() <= 1e-4, f"{case}: llama.cpp logits differ from Atlas by {diff.max():.3g} at {where}"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_moe_greedy_generation_matches_atlas(prompts, tmp_path, shakespeare_tokenizer):
    from atlas_jax.sample import generate
    import jax

    cfg, params = build("moe-e4-k2-tied", shakespeare_tokenizer.vocab_size)
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "moe.gguf")
    prompt = prompts[0, :12].tolist()
    toks, lengths = generate(params, [prompt], jax.random.key(0), SampleConfig(temperature=0.0, max_new_tokens=24),
                             cfg)
    want = np.asarray(toks)[0, :int(lengths[0])].tolist()
    got = llamacpp_generate(path, prompt, 24, greedy=True)
    assert got == want, f"llama.cpp greedy {got} vs Atlas {want}"


def file_logits(cfg, params, prompts, tmp_path, tokenizer, ftype, name):
    path = export_gguf(params, cfg, tokenizer.path, tmp_path / f"{name}-{ftype}.gguf", ftype)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors}
    return np.stack(llamacpp_logits(path, [p.tolist() for p in prompts])), atlas_logits(params, cfg, prompts), types


def test_moe_f16_logits_stay_close(prompts, tmp_path, shakespeare_tokenizer, observe):
    cfg, params = build("moe-e4-k2-tied", shakespeare_tokenizer.vocab_size)
    got, ref, types = file_logits(cfg, params, prompts, tmp_path, shakespeare_tokenizer, "f16", "moe")
    assert types["blk.0.ffn_up_exps.weight"] == "F16" and types["blk.0.ffn_gate_inp.weight"] == "F32", types
    observe("llama.cpp moe f16 max|dlogit|", float(np.abs(got - ref).max()))
    assert np.abs(got - ref).max() <= 2e-2, f"f16: max |dlogit| {np.abs(got - ref).max():.3g}"


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_moe_quantized_costs_at_most_twice_the_dense_twin(ftype, prompts, tmp_path, shakespeare_tokenizer, observe):
    """A quantized file rounds the experts (and llama.cpp the activations), and a token whose top-k is
    close may pick another expert, a jump a dense model has not: the mean |dlogit| is held to twice
    that of the same architecture without experts, exported and run the same way."""
    cfg, params = build("moe-e4-k2-tied", shakespeare_tokenizer.vocab_size)
    got, ref, types = file_logits(cfg, params, prompts, tmp_path, shakespeare_tokenizer, ftype, "moe")
    assert types["blk.0.ffn_up_exps.weight"] == ftype.upper() and types["blk.0.ffn_gate_inp.weight"] == "F32", types
    dense_cfg = resolve_model(dataclasses.replace(cfg, moe_experts=0, moe_d_ff=None))
    dense_got, dense_ref, _ = file_logits(dense_cfg, parity_params(dense_cfg, seed=0), prompts, tmp_path,
                                          shakespeare_tokenizer, ftype, "dense")
    moe_mean, dense_mean = float(np.abs(got - ref).mean()), float(np.abs(dense_got - dense_ref).mean())
    observe(f"llama.cpp moe {ftype} mean|dlogit| / dense twin's", moe_mean / dense_mean)
    observe(f"llama.cpp moe {ftype} top-1 disagreement (random, not peaked)", float(np.mean(got.argmax(-1) != ref.argmax(-1))))
    assert moe_mean <= 2 * dense_mean, f"{ftype}: MoE mean |dlogit| {moe_mean:.3g} vs the dense twin's {dense_mean:.3g}"


def test_moe_in_some_layers_only_is_refused_in_one_line(tmp_path, shakespeare_tokenizer):
    cfg, params = build("moe-e4-k2-tied", shakespeare_tokenizer.vocab_size, moe_every=2)
    with pytest.raises(ExportError, match=r"model.moe_every=2.*leave layers \[1\] dense.*model.moe_every=1") as e:
        export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "mixed.gguf")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir()), "a refused export left a file behind"
