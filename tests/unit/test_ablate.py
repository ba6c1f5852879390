"""`python -m atlas_jax.ablate` end to end on a tiny set (2 toggles, 3 steps each), and its one-line errors."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from atlas_jax import ablate
from atlas_jax.config import load_config
from atlas_jax.errors import ConfigError
from cli_checks import one_line_error

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.batch_size=4", "train.eval_batches=1", "train.log_interval=1"]


@pytest.fixture
def tiny_args(shakespeare_data_dir, shakespeare_tokenizer):
    return ["--config", "configs/tiny.yaml", *TINY, f"data.data_dir={shakespeare_data_dir}",
            f"data.tokenizer={shakespeare_tokenizer.path}"]


def test_two_toggles_at_an_equal_budget_write_a_consistent_table_and_png(tiny_args, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out, png = tmp_path / "ablations.md", tmp_path / "ablations.png"
    tokens = 3 * 4 * 32  # 3 steps of batch 4 x seq_len 32
    assert ablate.main([*tiny_args, "--tokens", str(tokens), "--toggles", "baseline,positions=learned",
                        "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = out.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines[0] == "| " + " | ".join(ablate.COLUMNS) + " |" and len(lines) == 4, text
    cells = {ln.split(" | ")[0].lstrip("| "): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]}
    assert set(cells) == {"baseline", "positions=learned"}
    num = lambda c: float(c.replace(",", ""))  # noqa: E731
    for name, row in cells.items():
        bpb, loss, tps, total, active, rss, wall = map(num, row[2:])
        assert all(math.isfinite(v) and v > 0 for v in (bpb, loss, tps, total, active, rss, wall)), row
        assert 3 < bpb < 12 and total == active, row  # a dense model, 3 steps from a uniform 9 bits/token
    # The same budget: 3 steps each, and the learned positions add exactly their table (max_seq_len x d_model).
    cfg = load_config(REPO / "configs/tiny.yaml", TINY)
    assert num(cells["positions=learned"][5]) - num(cells["baseline"][5]) == cfg.model.max_seq_len * cfg.model.d_model
    for run in ("baseline", "positions-learned"):
        steps = [ln for ln in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
        assert len(steps) == 3, run
    assert f"--tokens {tokens}" in text and "3 steps x batch 4 x seq_len 32 = 384 tokens per run" in text
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1210, 440)  # figsize (11, 4) at 110 dpi


def test_default_set_toggles_each_option_once():
    cfg = load_config(REPO / "configs/shakespeare.yaml")
    toggles = ablate.default_toggles(cfg.model)
    assert list(toggles) == ["baseline", "positions=learned", "positions=none", "norm=layer", "mlp=gelu",
                             "n_kv_heads=1", "moe=4x2", "sinks=4"]
    assert toggles["sinks=4"] == ["model.sink_tokens=4"]
    plans = ablate.plan(cfg, toggles, 10 * 32 * 128, Path("/tmp/unused"))
    assert {c.train.steps for c in plans.values()} == {10}
    assert plans["mlp=gelu"].model.d_ff == 4 * 192 and plans["moe=4x2"].model.moe_d_ff == plans["baseline"].model.d_ff // 2


@pytest.mark.parametrize("extra, words", [
    (["--toggles", "baseline,rope"], ["--toggles rope", "not in --set default", "positions=learned"]),
    (["--set", "huge"], ["--set huge", "default"]),
    (["--tokens", "10"], ["--tokens 10", "one step", "raise --tokens"]),
    (["model.arch=gpt2", "--toggles", "moe=4x2"], ["toggle 'moe=4x2'", "model.moe_experts=4", "arch=llama only"]),
])
def test_bad_input_is_one_line(extra, words):
    with pytest.raises(ConfigError) as e:
        ablate.main(["--config", str(REPO / "configs/tiny.yaml"), *extra])
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_cli_error_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "atlas_jax.ablate", "--config", "configs/tiny.yaml", "--toggles", "x"],
                       cwd=REPO, capture_output=True, text=True)
    one_line_error(r, "--toggles x")
