"""scripts/streaming_ppl.py and atlas_jax.eval.streaming: perplexity by position through each cache policy."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax.config import Config, DataConfig, ModelConfig, resolve
from atlas_jax.eval import streaming as S

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import streaming_ppl  # noqa: E402

MAX_T = 16


def _random_run(root: Path, tokenizer, data_dir: Path, **model) -> Path:
    from atlas_jax import checkpoint
    from atlas_jax.model import init_params
    from atlas_jax.optim import make_optimizer

    cfg = resolve(Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, max_seq_len=MAX_T,
                                           **model),
                         data=DataConfig(seq_len=MAX_T, data_dir=str(data_dir))))
    # O(1) logits, so that the policies' differences are not rounding noise.
    params = jax.tree.map(lambda x: x * 3, init_params(cfg.model, jax.random.key(0)))
    state = {"params": params, "opt_state": jax.jit(make_optimizer(cfg.train).init)(params),
             "step": np.int32(1), "rng": jax.random.key_data(jax.random.key(0)), "bad_steps": np.int32(0)}
    checkpoint.save(checkpoint.make_manager(root, keep=1), state, {}, cfg)
    shutil.copy(tokenizer.path, root / "tokenizer.model")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_tokenizer, shakespeare_data_dir):
    make = lambda name, **m: _random_run(tmp_path_factory.mktemp(name), shakespeare_tokenizer,  # noqa: E731
                                         shakespeare_data_dir, **m)
    return {"one_layer": make("one_layer", n_layers=1)}


def test_table_json_and_png_cover_8x_the_context_and_a_one_layer_rolling_window_is_a_recompute(runs, tmp_path,
                                                                                              capsys):
    """One layer: every cached key depends on its token and cache position only, so the rolling window
    (sinks=0) must score exactly what the window recomputed from scratch does, at every position."""
    out, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    streaming_ppl.main(["--checkpoint", str(runs["one_layer"]),
                        "--length", str(8 * MAX_T), "--rows", "2", "--sinks", "0,2", "--dense",
                        "--out", str(out), "--markdown", str(md), "--plot", str(png)])
    results = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in results] == ["recompute", "dense", "sinks=0", "sinks=2"]
    for r in results:
        assert [b["to"] for b in r["buckets"]] == [8, 16, 32, 64, 128] and r["buckets"][-1]["tokens"] == 2 * 64
    recompute, dense, rolling, sinks = results
    for a, b in zip(recompute["buckets"], rolling["buckets"]):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    for r in (dense, sinks):  # the cache has not filled yet: no difference
        for a, b in zip(rolling["buckets"][:2], r["buckets"][:2]):
            assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    assert sinks["buckets"][-1]["perplexity"] != pytest.approx(rolling["buckets"][-1]["perplexity"], rel=1e-3)
    assert md.read_text().startswith("| model, policy | 1-8 | 9-16 | 17-32 | 33-64 | 65-128 |") and png.stat().st_size
    assert f"| {runs['one_layer'].name} sinks=2 |" in capsys.readouterr().out


def test_position_edges_and_bad_input_are_one_line(runs, monkeypatch, capsys):
    assert S.position_edges(64, 1024) == [0, 32, 64, 128, 256, 512, 1024]
    from atlas_jax.errors import run_cli

    for argv, message in [(["--rows", "100000"], "fewer than --rows 100000"),
                          (["--sinks", "16"], "--sinks 16 with --window 16: need 0 <= sinks < window"),
                          (["--sinks", "a"], "--sinks 'a': expected comma-separated integers")]:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: streaming_ppl.main(["--checkpoint", str(runs["one_layer"]), "--length", "32",
                                                "--no-recompute", *argv]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
