"""Mixture-of-experts runs <-> Hugging Face MixtralForCausalLM, proven with real transformers (issue #15).

A tiny random-weight Mixtral (d 64, 2 layers, 4 experts top-2, GQA) built with transformers is
imported into an Atlas run, its logits compared with transformers', exported back and loaded by
transformers with no missing or unexpected keys: the same logits (max |d| <= 1e-4) and the same
tensors, bit for bit. An Atlas-trained MoE run exports the same way; other MoE layouts are refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from test_hf import TOL, VOCAB, _atlas_cli, _hf_logits, _randomize, _tokens, _train, bpe_tokenizer_dir  # noqa: E402,F401


def _atlas(run, tokens):
    from atlas_jax.checkpoint import load_for_inference
    from atlas_jax.export.quality import atlas_logits

    params, cfg, _ = load_for_inference(run)
    return atlas_logits(params, cfg.model, tokens), cfg.model


def _load(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(model).__name__ == "MixtralForCausalLM"
    return model.eval()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, bpe_tokenizer_dir):
    """(HF dir, transformers model, imported run)."""
    root = tmp_path_factory.mktemp("mixtral")
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                                     rope_theta=5000.0, sliding_window=None, tie_word_embeddings=False,
                                     output_router_logits=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize(model)
    src = root / "src"
    model.save_pretrained(src)
    for f in bpe_tokenizer_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    run = root / "run"
    r = _atlas_cli("import", str(src), "--out", str(run))
    assert r.returncode == 0, r.stderr
    return src, model, run


def test_imported_mixtral_logits_equal_transformers(mixtral):
    src, model, run = mixtral
    logits, m = _atlas(run, _tokens())
    assert (m.moe_experts, m.moe_experts_per_token, m.moe_d_ff, m.n_kv_heads) == (4, 2, 48, 2)
    assert np.abs(logits - _hf_logits(model, _tokens())).max() <= TOL


def test_mixtral_export_round_trip_is_exact(mixtral, tmp_path):
    src, model, run = mixtral
    out = tmp_path / "hf"
    r = _atlas_cli("export", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    hf = json.loads((out / "config.json").read_text())
    assert {k: hf[k] for k in ("model_type", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                               "num_key_value_heads", "rope_theta", "rms_norm_eps", "sliding_window",
                               "tie_word_embeddings")} == {
        "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48,
        "num_key_value_heads": 2, "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False}
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.abs(_hf_logits(_load(out), _tokens()) - _hf_logits(model, _tokens())).max() == 0.0


def test_an_atlas_moe_run_exports_as_mixtral(tmp_path):
    run = tmp_path / "run"
    r = _train(f"train.run_dir={run}", "model.arch=llama", "model.vocab_size=512", "model.d_model=64",
               "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "train.steps=2",
               "train.checkpoint_interval=2", "model.tie_embeddings=false", "model.moe_experts=4",
               "model.moe_d_ff=96")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    r = _atlas_cli("export", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    tokens = np.random.default_rng(1).integers(0, 512, (2, 17))
    logits, m = _atlas(run, tokens)
    assert np.abs(_hf_logits(_load(out), tokens) - logits).max() <= TOL


@pytest.mark.parametrize("layout", [dict(moe_every=2), dict(moe_first_layer=1)])
def test_export_refuses_moe_layouts_mixtral_lacks(layout):
    from atlas_jax.config import ModelConfig, resolve_model
    from atlas_jax.hf.convert import HFError, hf_config

    m = resolve_model(ModelConfig(arch="llama", n_layers=2, moe_experts=4, **layout))
    first, every = layout.get("moe_first_layer", 0), layout.get("moe_every", 1)
    with pytest.raises(HFError, match=f"^model.moe_first_layer={first}, model.moe_every={every}: MixtralForCausalLM "
                                      f"has every layer mixture-of-experts; export a model trained with "
                                      f"model.moe_first_layer=0 and model.moe_every=1$"):
        hf_config(m, 1, 2)
