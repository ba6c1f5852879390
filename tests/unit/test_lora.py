"""LoRA fine-tuning through the trainer (issue #13): a base run, adapters trained on it with
train.init_from + lora.rank, the base frozen bit for bit, the optimizer over adapters only, exact
resume, merged loading for generate / GGUF (llama.cpp), and one-line refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax import checkpoint as ckpt
from atlas_jax import lora as L
from atlas_jax.config import load_config
from atlas_jax.model import Transformer, loss_fn
from cli_checks import one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.seq_len=32", "train.batch_size=4", "train.log_interval=1", "train.eval_interval=100",
          "train.eval_batches=2", "train.warmup_steps=0", "train.tracking=none"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_jax.train", "--no-progress", "--no-samples", *COMMON, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A small llama (GQA, untied head) trained for a few steps: the base the adapters adapt."""
    run = tmp_path_factory.mktemp("lora") / "base"
    r = _cli(f"train.run_dir={run}", "model.vocab_size=512", "model.d_model=64", "model.n_layers=2",
             "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "model.tie_embeddings=false",
             "train.steps=20", "train.checkpoint_interval=20", "train.lr=3e-3")
    assert r.returncode == 0, r.stderr
    return run


def test_lora_trains_adapters_only_on_a_frozen_base(base_run, tmp_path):
    from atlas_jax.data.loader import make_train_iterator
    from atlas_jax.init_from import load_model
    from atlas_jax.train import train

    run = tmp_path / "lora"
    cfg = load_config(None, [*COMMON, f"train.run_dir={run}", f"train.init_from=run:{base_run}", "lora.rank=4",
                             "lora.targets=[all]", "train.steps=8", "train.checkpoint_interval=8", "train.lr=1e-2"])
    result = train(cfg, progress=False)
    base, base_cfg, _ = ckpt.load_for_inference(base_run)
    # the base the run trained on is the source's params, bit for bit, after 8 steps
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(result.base), jax.tree.leaves(base)))
    # step 1's loss is the base model's loss on the first batch (B = 0: the adapted model is the base)
    batch = next(make_train_iterator(run / "data", 32, 4, 0, 0, 1))
    want = float(loss_fn(base, base_cfg.model, batch["inputs"], batch["targets"]))
    losses = _losses(run)
    assert abs(losses[1] - want) <= 1e-6, (losses[1], want)
    # the optimizer holds state for the adapters only: Adam's two moments, each the adapters' size
    adapters = result.state["params"]
    n_adapter = L.count(adapters)
    opt_sizes = sum(x.size for x in jax.tree.leaves(result.state["opt_state"]) if x.ndim > 0)
    assert opt_sizes == 2 * n_adapter
    assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(base))
    # the checkpoint holds adapters; load_model merges them into the base
    saved, saved_cfg, _ = ckpt.load_adapters(run)
    assert L.adapter_paths(saved) == L.adapter_paths(adapters) and len(L.adapter_paths(saved)) == 2 * 7 + 1
    merged, _, _ = load_model(run)
    tokens = np.asarray(batch["inputs"], np.int32)
    got = Transformer(saved_cfg.model).apply({"params": merged}, tokens)
    want_logits = L.apply(saved_cfg.model, base, saved, saved_cfg.lora, tokens)
    assert np.abs(np.asarray(got) - np.asarray(want_logits)).max() <= 1e-5
    # fine-tuning lowered the loss on the batches it trained on
    it = make_train_iterator(run / "data", 32, 4, 0, 0, 1)
    seen = [next(it) for _ in range(8)]
    before = np.mean([float(loss_fn(base, base_cfg.model, b["inputs"], b["targets"])) for b in seen])
    after = np.mean([float(loss_fn(merged, base_cfg.model, b["inputs"], b["targets"])) for b in seen])
    assert after < before - 0.05, (before, after)
    with pytest.raises(ckpt.CheckpointError, match="a LoRA run"):
        ckpt.load_for_inference(run)


def test_lora_resume_is_exact(base_run, tmp_path):
    args = [f"train.init_from=run:{base_run}", "lora.rank=2", "lora.targets=[q,v,down]", "lora.dropout=0.1",
            "train.lr=1e-2", "train.checkpoint_interval=3", "train.schedule=constant"]  # LR independent of train.steps
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert (r := _cli(f"train.run_dir={straight}", "train.steps=6", *args)).returncode == 0, r.stderr
    assert (r := _cli(f"train.run_dir={split}", "train.steps=3", *args)).returncode == 0, r.stderr
    r = _cli(f"train.run_dir={split}", "train.steps=6", *args)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr
    a, b = _losses(straight), _losses(split)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_lora_run_exports_merged_gguf_that_llamacpp_runs(base_run, tmp_path):
    from atlas_jax.export.llamacpp import llamacpp_logits
    from atlas_jax.export.quality import atlas_logits
    from atlas_jax.init_from import load_model

    run = tmp_path / "lora"
    r = _cli(f"train.run_dir={run}", f"train.init_from=run:{base_run}", "lora.rank=4", "train.steps=4",
             "train.checkpoint_interval=4", "train.lr=3e-2")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "merged.gguf"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.export.to_gguf", str(run), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    merged, cfg, _ = load_model(run)
    base, _, _ = ckpt.load_for_inference(base_run)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 17))
    want = atlas_logits(merged, cfg.model, tokens)
    assert np.abs(want - atlas_logits(base, cfg.model, tokens)).max() > 1e-3  # the adapters changed something
    got = np.stack(llamacpp_logits(out, [list(map(int, t)) for t in tokens]))
    assert np.abs(got - want).max() <= 1e-4
    r = subprocess.run([sys.executable, "-m", "atlas_jax.generate", "--checkpoint", str(run), "--prompt", "ROMEO:",
                        "--max-new-tokens", "5"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr


def test_lora_refusals_are_one_line(base_run, tmp_path):
    run = tmp_path / "lora"
    args = [f"train.run_dir={run}", f"train.init_from=run:{base_run}", "lora.rank=2", "train.steps=2",
            "train.checkpoint_interval=2"]
    assert (r := _cli(*args)).returncode == 0, r.stderr
    record = json.loads((run / "lora_base.json").read_text())
    (run / "lora_base.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    one_line_error(_cli(*args[:-2], "train.steps=4", "train.checkpoint_interval=2"), "trained on another base")
    one_line_error(_cli(f"train.run_dir={tmp_path / 'x'}", f"train.init_from=run:{base_run}", "lora.rank=2",
                   "lora.targets=[q,nope]"), "lora.targets: unknown nope")
    one_line_error(_cli(f"train.run_dir={tmp_path / 'y'}", "lora.rank=2"), "set train.init_from")
    one_line_error(_cli(f"train.run_dir={tmp_path / 'z'}", f"train.init_from=run:{base_run}", "lora.rank=-3"),
              "lora.rank must be >= 0")
    (run / "lora_base.json").write_text(json.dumps(record))
    one_line_error(_cli(*args[:2], "lora.rank=4", "train.steps=4"), "other adapters", "lora.rank")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("checkpoints/*"))


def test_quantized_base_codes_and_error():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (128, 96)).astype(np.float32)
    tree = {"layer": {"kernel": w, "bias": np.ones(96, np.float32)}, "norm": {"scale": np.ones(96, np.float32)}}
    q8, q4 = L.quantize_base(tree, "int8"), L.quantize_base(tree, "nf4")
    assert q8["layer"]["kernel"]["int8"].dtype == np.int8 and q4["layer"]["kernel"]["nf4"].dtype == np.uint8
    assert L.tree_bytes(q8["layer"]["kernel"]) < w.nbytes / 3.5 and L.tree_bytes(q4["layer"]["kernel"]) < w.nbytes / 6
    d8 = np.asarray(L.dequantize_base(q8)["layer"]["kernel"])
    d4 = np.asarray(L.dequantize_base(q4)["layer"]["kernel"])
    scale = np.abs(w).max(axis=0) / 127
    assert np.all(np.abs(d8 - w) <= scale / 2 + 1e-7)  # int8: round to nearest step of each column
    # nf4: every weight is the NF4 level nearest to it, times its 64-block's absmax
    blocks = w.T.reshape(96, 2, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    nearest = L.NF4_LEVELS[np.abs(blocks[..., None] / absmax[..., None] - L.NF4_LEVELS).argmin(-1)] * absmax
    assert np.allclose(d4, nearest.reshape(96, 128).T, atol=1e-7)
    assert np.array_equal(np.asarray(L.dequantize_base(q8)["norm"]["scale"]), tree["norm"]["scale"])
    with pytest.raises(L.ConfigError, match="nf4.*not a multiple of 64"):
        L.quantize_base({"k": {"kernel": np.zeros((80, 8), np.float32)}}, "nf4")


def test_qlora_trains_against_the_dequantized_base(base_run, tmp_path):
    from atlas_jax.data.loader import make_train_iterator
    from atlas_jax.init_from import load_model

    run = tmp_path / "qlora"
    r = _cli(f"train.run_dir={run}", f"train.init_from=run:{base_run}", "lora.rank=4", "lora.base_quant=nf4",
             "lora.targets=[q,k,v,o]", "train.steps=3", "train.checkpoint_interval=3", "train.lr=1e-2")
    assert r.returncode == 0, r.stderr
    assert "lora.base_quant=nf4: the frozen base holds" in r.stderr
    base, cfg, _ = ckpt.load_for_inference(base_run)
    deq = jax.tree.map(np.asarray, L.dequantize_base(L.quantize_base(base, "nf4")))
    batch = next(make_train_iterator(run / "data", 32, 4, 0, 0, 1))
    want = float(loss_fn(deq, cfg.model, batch["inputs"], batch["targets"]))
    assert abs(_losses(run)[1] - want) <= 1e-5  # B = 0: the model is the dequantized base
    assert abs(want - float(loss_fn(base, cfg.model, batch["inputs"], batch["targets"]))) > 1e-4
    merged, _, _ = load_model(run)
    adapters, saved_cfg, _ = ckpt.load_adapters(run)
    tokens = np.asarray(batch["inputs"], np.int32)
    got = Transformer(saved_cfg.model).apply({"params": merged}, tokens)
    assert np.abs(np.asarray(got) - np.asarray(L.apply(saved_cfg.model, deq, adapters, saved_cfg.lora, tokens))).max() <= 1e-5
