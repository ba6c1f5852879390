"""Attention maps: the weights the model sows are its attention (row-stochastic, causal, and weights @ V is
the layer's output), and `python -m atlas_jax.viz attention` draws them, refusing bad input in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from atlas_jax import viz
from atlas_jax.config import ModelConfig, resolve_model
from atlas_jax.errors import AtlasError
from atlas_jax.model import ATTENTION_WEIGHTS, Transformer, init_params
from cli_checks import one_line_error

REPO = Path(__file__).resolve().parents[2]
T = 12


def sharp_params(cfg: ModelConfig):
    """init_params with q and k scaled up, so the attention is far from uniform (a real check of the rows)."""
    params = init_params(cfg, jax.random.key(0))
    for i in range(cfg.n_layers):
        for w in ("wq", "wk"):
            params[f"layers_{i}"]["attn"][w]["kernel"] = params[f"layers_{i}"]["attn"][w]["kernel"] * 25
    return params


@pytest.mark.parametrize("options", [dict(arch="llama", n_kv_heads=2), dict(arch="gpt2", positions="none")],
                         ids=["llama-gqa2", "gpt2-biases-nope"])
def test_sown_weights_are_the_attention_the_layer_computes(options):
    cfg = resolve_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, **options))
    params = sharp_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, T)), jnp.int32)
    model = Transformer(cfg)
    logits, sown = model.apply({"params": params}, tokens, capture_intermediates=True,
                               mutable=[ATTENTION_WEIGHTS, "intermediates"])
    plain = model.apply({"params": params}, tokens)
    assert np.abs(np.asarray(logits) - np.asarray(plain)).max() <= 1e-6, "sowing changed the forward"
    probs = viz.attention_weights(params, cfg, list(map(int, tokens[0])))
    assert probs.shape == (2, 4, T, T)
    assert np.abs(probs.sum(-1) - 1).max() <= 1e-5, "rows do not sum to 1"
    assert np.all(probs[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0), "weight above the diagonal"
    assert probs.max(-1).mean() > 0.5, "attention nearly uniform: the check would be weak"
    g = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        inter = sown["intermediates"][f"layers_{i}"]["attn"]
        v_TxKxH = np.asarray(inter["wv"]["__call__"][0][0]).reshape(T, cfg.n_kv_heads, cfg.head_dim)
        mixed_TxNxH = np.stack([probs[i, n] @ v_TxKxH[:, n // g] for n in range(cfg.n_heads)], axis=1)
        wo = params[f"layers_{i}"]["attn"]["wo"]
        out = mixed_TxNxH.reshape(T, -1) @ np.asarray(wo["kernel"]) + (np.asarray(wo["bias"]) if "bias" in wo else 0)
        layer_out = np.asarray(inter["__call__"][0][0][0])
        assert np.abs(out - layer_out).max() <= 1e-5, f"layer {i}: weights @ V is not the attention output"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shakespeare_data_dir, shakespeare_tokenizer):
    run = tmp_path_factory.mktemp("viz") / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "atlas_jax.train", "--config", "configs/tiny.yaml", "--no-progress",
                        "--no-samples", f"data.data_dir={shakespeare_data_dir}",
                        f"data.tokenizer={shakespeare_tokenizer.path}", f"train.run_dir={run}", "train.steps=2",
                        "train.eval_batches=1", "train.tracking=none"], cwd=REPO, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


PROMPT = "ROMEO: But soft, what light"


def test_cli_writes_the_grid_and_one_cell(tiny_run, shakespeare_tokenizer, tmp_path):
    n = len(shakespeare_tokenizer.encode(PROMPT))
    for extra, rows, cols in (([], 2, 4), (["--layer", "1", "--head", "3"], 1, 1)):
        out = tmp_path / f"att{len(extra)}.png"
        assert viz.main(["attention", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", str(out),
                         *extra]) == 0
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size == viz.figure_pixels(rows, cols, n), (extra, im.size)


@pytest.mark.parametrize("extra, words", [
    (["--layer", "2"], ["--layer 2", "2 layers (0..1)"]),
    (["--head", "-1"], ["--head -1", "4 heads (0..3)"]),
    (["--prompt", "ROMEO " * 80], ["tokens, longer than", "model.max_seq_len=64", "shorten"]),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, extra, words):
    with pytest.raises(AtlasError) as e:
        viz.main(["attention", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", str(tmp_path / "a.png"),
                  *extra])
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "a.png").exists()


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "atlas_jax.viz", "attention", "--checkpoint", str(tmp_path / "nope"),
                        "--prompt", "x"], cwd=REPO, capture_output=True, text=True)
    one_line_error(r, str(tmp_path / "nope"))
