"""The trainer, end to end through `python -m atlas_jax.train`: exact resume after kill -9,
SIGTERM saves, non-finite steps, --fresh, and errors that are one line and keep checkpoints intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import Config, DataConfig, ModelConfig, TrainConfig, resolve
from atlas_jax.sharding import make_mesh
from atlas_jax.train_step import create_sharded_state, make_train_step
from tests.runs import step_losses

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base_args(shakespeare_data_dir, shakespeare_tokenizer):
    return ["--config", "configs/tiny.yaml", "--no-progress", "--no-samples",
            f"data.data_dir={shakespeare_data_dir}", f"data.tokenizer={shakespeare_tokenizer.path}",
            "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "train.eval_batches=1"]


def run_train(args, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "atlas_jax.train", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def start_train(args) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "atlas_jax.train", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until it holds `step` (or later); returns the last logged step."""
    deadline, metrics = time.time() + timeout, run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"the run never logged step {step} (exit {proc.poll()})")


def full_state(run_dir: Path, cfg_path: Path):
    """The whole train state of the run's latest checkpoint: params, optimizer state, step, rng."""
    from atlas_jax.config import load_config
    from atlas_jax.sharding import state_shardings
    from atlas_jax.train_step import abstract_state

    cfg = load_config(cfg_path)
    manager = ckpt.make_manager(run_dir, 3, read_only=True)
    abstract = abstract_state(cfg)
    mesh = make_mesh([1, 1], jax.devices()[:1])
    state, it_state = ckpt.restore(manager, manager.latest_step(), abstract, state_shardings(abstract, mesh), cfg)
    return jax.device_get(state), it_state


def test_resume_after_kill_is_bit_exact(tmp_path, base_args):
    """A run killed with SIGKILL from outside, at a step the test observes, and resumed has the same
    per-step losses and the same whole train state (params, Adam moments, counts, rng, data
    iterator) as a run that never stopped: bit for bit."""
    args = base_args + ["train.steps=40", "train.checkpoint_interval=4", "train.log_interval=1",
                        "train.eval_interval=100", "train.microbatches=2", "model.dropout=0.1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(args + [f"train.run_dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = start_train(args + [f"train.run_dir={killed}"])
    seen = wait_for_step(killed, victim, 6)
    victim.kill()
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended by itself before it was killed (step {seen})"
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 4 <= max(saved) < 40, saved
    proc = run_train(args + [f"train.run_dir={killed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr

    a, b = step_losses(straight), step_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for s in a:
        assert a[s] == b[s], f"step {s}: loss {b[s]!r} after resume vs {a[s]!r} straight"
    (sa, ia), (sb, ib) = full_state(straight, straight / "config.yaml"), full_state(killed, killed / "config.yaml")
    assert ia == ib, f"data iterator state {ib} after resume vs {ia} straight"
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(sa)[0], jax.tree_util.tree_flatten_with_path(sb)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert any("opt_state" in jax.tree_util.keystr(p) for p, _ in flat_a)
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)}: max |diff| {np.max(np.abs(x - y)):.3g}"


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, base_args):
    run_dir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "atlas_jax.train", *base_args, f"train.run_dir={run_dir}",
                             "train.steps=100000", "train.log_interval=1", "train.checkpoint_interval=100000",
                             "train.eval_interval=100000"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3, steps
    assert max(step_losses(run_dir)) == steps[0]


def test_nonfinite_updates_are_skipped_and_counted():
    cfg = resolve(Config(model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=8),
                         data=DataConfig(seq_len=8), train=TrainConfig(batch_size=2, mesh=[1, 1])))
    mesh = make_mesh([1, 1], jax.devices()[:1])
    state, shardings = create_sharded_state(cfg, mesh)
    step = make_train_step(cfg, mesh, shardings)
    batch = {"inputs": np.zeros((2, 8), np.int32), "targets": np.ones((2, 8), np.int32)}
    state, m = step(state, batch)
    assert int(m["skipped"]) == 0 and int(state["bad_steps"]) == 0
    poisoned = jax.tree_util.tree_map(lambda x: x, state)
    poisoned["params"]["final_norm"]["scale"] = poisoned["params"]["final_norm"]["scale"].at[0].set(np.nan)
    before = jax.device_get(poisoned)
    after, m = step(poisoned, batch)
    after = jax.device_get(after)
    assert int(m["skipped"]) == 1 and int(after["bad_steps"]) == 1 and int(after["step"]) == 2
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(before["params"])[0],
                                 jax.tree_util.tree_flatten_with_path(after["params"])[0]):
        assert np.array_equal(x, y, equal_nan=True), f"{jax.tree_util.keystr(path)} changed on a skipped step"
    assert np.array_equal(jax.tree_util.tree_leaves(before["opt_state"])[1], jax.tree_util.tree_leaves(after["opt_state"])[1])


def test_the_finite_check_is_computed_once_not_once_per_leaf():
    """The skip-if-non-finite flag is an `and` over every param leaf; XLA used to fuse that whole chain
    into each leaf's select (leaves^2 scalar ands: a 36-layer GPT-2 compiled for 15 minutes, 10 GiB)."""
    cfg = resolve(Config(model=ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=8, n_heads=2,
                                           max_seq_len=8),
                         data=DataConfig(seq_len=8), train=TrainConfig(batch_size=2, mesh=[1, 1])))
    mesh = make_mesh([1, 1], jax.devices()[:1])
    state, shardings = create_sharded_state(cfg, mesh)
    batch = {"inputs": np.zeros((2, 8), np.int32), "targets": np.ones((2, 8), np.int32)}
    hlo = make_train_step(cfg, mesh, shardings).lower(state, batch).compile().as_text()
    leaves = len(jax.tree_util.tree_leaves(state["params"]))
    ands = hlo.count("pred[] and(")
    assert leaves <= ands < 3 * leaves, f"{ands} scalar ands in the compiled step for {leaves} param leaves"


def test_nonfinite_run_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, base_args):
    run_dir = tmp_path / "run"
    # lr 1e30 makes the first update finite but the params enormous: every later gradient overflows.
    proc = run_train(base_args + [f"train.run_dir={run_dir}", "train.lr=1e30", "train.min_lr=0",
                                  "train.warmup_steps=0", "train.steps=50", "train.log_interval=1",
                                  "train.checkpoint_interval=1", "train.max_nonfinite_steps=3",
                                  "train.eval_interval=1000"])
    assert_one_line_error(proc, "non-finite", "train.lr")
    skipped = {r["step"]: r["skipped"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1}, skipped
    params, _, _ = ckpt.load_for_inference(run_dir)  # the newest checkpoint loads, with finite params
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_fresh_moves_the_old_run_aside(tmp_path, base_args):
    run_dir = tmp_path / "run"
    args = base_args + [f"train.run_dir={run_dir}", "train.steps=2", "train.checkpoint_interval=2",
                        "train.eval_interval=2", "train.log_interval=1"]
    assert run_train(args).returncode == 0
    proc = run_train(args + ["--fresh"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" not in proc.stderr and (tmp_path / "run.old1" / "checkpoints" / "2").is_dir()


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, base_args):
    run_dir = tmp_path / "run"
    args = base_args + [f"train.run_dir={run_dir}", "train.steps=2", "train.checkpoint_interval=2",
                        "train.eval_interval=2"]
    assert run_train(args).returncode == 0
    proc = run_train(args + ["model.d_model=32", "train.steps=4"])
    assert_one_line_error(proc, "different model", "d_model: checkpoint 64 vs config 32")
    assert (run_dir / "checkpoints" / "2").is_dir()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, base_args):
    run_dir = tmp_path / "run"
    args = base_args + [f"train.run_dir={run_dir}", "train.steps=2", "train.checkpoint_interval=2",
                        "train.eval_interval=2"]
    assert run_train(args).returncode == 0
    step_dir = run_dir / "checkpoints" / "2"
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\x00garbage" * 8)
    proc = run_train(args + ["train.steps=4"])
    assert_one_line_error(proc, str(step_dir), "corrupt")
    proc = subprocess.run([sys.executable, "-c", "from atlas_jax.checkpoint import load_for_inference as l; "
                           f"from atlas_jax.errors import run_cli; run_cli(lambda: l({str(step_dir)!r}) and 0)"],
                          capture_output=True, text=True, cwd=REPO)
    assert_one_line_error(proc, "corrupt")


@pytest.mark.parametrize("override,needles", [
    (["model.d_modle=64"], ["unknown key 'd_modle'", "d_model"]),
    (["model.n_heads=5"], ["n_heads=5 does not divide model.d_model=64"]),
    (["train.lr=fast"], ["train.lr", "expected float"]),
    (["train.microbatches=3"], ["microbatches=3 does not divide"]),
])
def test_bad_config_is_one_line(override, needles, base_args):
    proc = run_train(base_args + override, timeout=120)
    assert_one_line_error(proc, *needles)


def test_missing_config_file_is_one_line():
    proc = run_train(["--config", "configs/nope.yaml"], timeout=120)
    assert_one_line_error(proc, "configs/nope.yaml", "not found")


def test_summary_loss_curve_and_tensorboard(tmp_path, base_args):
    run_dir = tmp_path / "run"
    proc = run_train(base_args + [f"train.run_dir={run_dir}", "train.steps=6", "train.eval_interval=3",
                                  "train.log_interval=2", "train.checkpoint_interval=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("train loss", "val loss", "val bits/byte", "tokens seen", "tokens/s", "MFU"):
        assert key in proc.stdout, proc.stdout
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any((run_dir / "tb").iterdir())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpb" in r] == [3, 6]
    assert (run_dir / "config.yaml").is_file()
    from atlas_jax.config import load_config
    assert load_config(run_dir / "config.yaml").model.d_model == 64


# --------------------------------------------------------------------------- defects of the review (#11)


def _tiny_cfg(**train):
    return resolve(Config(model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=8),
                          data=DataConfig(seq_len=8), train=TrainConfig(batch_size=8, mesh=[1, 1], **train)))


def test_skipped_steps_still_advance_the_schedule_to_min_lr():
    """Every step non-finite: params and moments stay, but the LR schedule reaches min_lr at train.steps."""
    from atlas_jax.optim import lr_schedule
    from atlas_jax.train_step import schedule_count

    cfg = _tiny_cfg(steps=4, warmup_steps=0, lr=1e-3, min_lr=1e-4, schedule="cosine")
    mesh = make_mesh([1, 1], jax.devices()[:1])
    state, shardings = create_sharded_state(cfg, mesh)
    step = make_train_step(cfg, mesh, shardings)
    state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(np.nan)
    batch = {"inputs": np.zeros((8, 8), np.int32), "targets": np.ones((8, 8), np.int32)}
    lrs = []
    for _ in range(4):
        state, m = step(state, batch)
        assert int(m["skipped"]) == 1
        lrs.append(float(m["lr"]))
    assert int(schedule_count(state["opt_state"])) == 4, "the schedule did not count the skipped steps"
    assert float(lr_schedule(cfg.train)(schedule_count(state["opt_state"]))) == pytest.approx(1e-4)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1] < lrs[0], lrs


def test_eval_runs_in_microbatches_with_the_same_loss():
    """The val loss is the same whether the eval batch runs whole or in the train step's microbatches,
    and the microbatched eval compiles to smaller temporaries (one microbatch's logits at a time)."""
    from atlas_jax.train_step import make_eval_step

    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 512, (16, 32)).astype(np.int32),
             "targets": rng.integers(0, 512, (16, 32)).astype(np.int32)}
    mesh = make_mesh([1, 1], jax.devices()[:1])
    totals, temps = {}, {}
    for micro in (1, 4):
        cfg = resolve(Config(model=ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, max_seq_len=32),
                             data=DataConfig(seq_len=32), train=TrainConfig(batch_size=16, microbatches=micro,
                                                                            mesh=[1, 1])))
        state, shardings = create_sharded_state(cfg, mesh)
        eval_step = make_eval_step(cfg, mesh, shardings["params"])
        totals[micro] = float(eval_step(state["params"], batch))
        temps[micro] = eval_step.lower(state["params"], batch).compile().memory_analysis().temp_size_in_bytes
    assert totals[4] == pytest.approx(totals[1], rel=1e-6), totals
    assert temps[4] < temps[1], f"microbatched eval temporaries {temps[4]} B vs whole batch {temps[1]} B"


def _saved_checkpoint(tmp_path, cfg):
    mesh = make_mesh([1, 1], jax.devices()[:1])
    state, _ = create_sharded_state(cfg, mesh)
    manager = ckpt.make_manager(tmp_path / "run", 3)
    ckpt.save(manager, state, {"step": 0}, cfg)
    return manager


def _restore_under(manager, cfg):
    """Restore step 0 of `manager` into the state `cfg` builds (on one device): what a resume does."""
    from atlas_jax.sharding import state_shardings
    from atlas_jax.train_step import abstract_state

    abstract = abstract_state(cfg)
    return ckpt.restore(manager, 0, abstract, state_shardings(abstract, make_mesh([1, 1], jax.devices()[:1])), cfg)


@pytest.mark.parametrize("override", [
    {"rope_theta": 500000.0}, {"norm_eps": 1e-6}, {"arch": "gpt2"}, {"d_ff": 192}, {"tie_embeddings": False},
    {"vocab_size": 96}, {"n_kv_heads": 1}, {"dropout": 0.1}])
def test_resume_refuses_a_model_field_that_changes_the_math(tmp_path, override):
    import dataclasses

    cfg = _tiny_cfg()
    manager = _saved_checkpoint(tmp_path, cfg)
    other = resolve(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **override)))
    (field, value), = override.items()
    with pytest.raises(ckpt.CheckpointError, match=f"model.{field}: checkpoint .* vs config {value!r}"):
        _restore_under(manager, other)


def test_resume_accepts_an_implementation_change(tmp_path):
    import dataclasses

    cfg = _tiny_cfg()
    manager = _saved_checkpoint(tmp_path, cfg)
    other = resolve(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla", matmul="xla")))
    state, _ = _restore_under(manager, other)
    assert int(state["step"]) == 0


@pytest.mark.parametrize("train", [{"grad_clip": 0.0}])
def test_resume_says_which_optimizer_setting_changed(tmp_path, train):
    import dataclasses

    cfg = _tiny_cfg()
    manager = _saved_checkpoint(tmp_path, cfg)
    other = resolve(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train)))
    (field, _), = train.items()
    with pytest.raises(ckpt.CheckpointError, match=f"optimizer state was saved with another structure .*train.{field}"):
        _restore_under(manager, other)


def test_nonfinite_streak_is_checked_every_step_not_only_at_log_boundaries(tmp_path, base_args):
    run_dir = tmp_path / "run"
    proc = run_train(base_args + [f"train.run_dir={run_dir}", "train.lr=1e30", "train.min_lr=0",
                                  "train.warmup_steps=0", "train.steps=60", "train.log_interval=50",
                                  "train.checkpoint_interval=1000", "train.max_nonfinite_steps=3",
                                  "train.eval_interval=1000"])
    line = assert_one_line_error(proc, "non-finite", "no checkpoint was written")
    stopped = int(line.split("stopped at step ")[1].split(":")[0])
    # Step 1 applies, steps 2-4 are skipped: the streak of 3 is read at step 4 (or, one step late, 5).
    assert stopped in (4, 5), line
    assert not (run_dir / "checkpoints").is_dir() or not any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())


GPU_PRESETS = ["configs/gpt2-124m.yaml", "configs/llama-125m.yaml", "configs/gpt2-355m.yaml", "configs/gpt2-774m.yaml",
               "configs/llama-350m.yaml", "configs/llama-760m.yaml"]


@pytest.mark.parametrize("config", GPU_PRESETS)
def test_gpu_presets_state_their_parameter_count(config):
    """The count in each preset's header is the model's (with the 32k vocabulary), and each names a
    real corpus (the missing-corpus line is checked on two of them below: the data sections are one text)."""
    from atlas_jax.config import load_config
    from atlas_jax.model import count_params_from_config

    cfg = load_config(REPO / config)
    total = count_params_from_config(cfg.model)["total"]
    assert f"{total:,}" in (REPO / config).read_text().split("model:")[0], (config, total)
    assert cfg.data.sources == ["corpora/fineweb-edu/*.jsonl"], cfg.data.sources


@pytest.mark.parametrize("config", GPU_PRESETS[:2])
def test_gpu_presets_name_a_real_corpus_and_say_when_it_is_missing(tmp_path, config):
    from atlas_jax.config import load_config

    assert load_config(REPO / config).data.sources != ["tinyshakespeare"]
    run_dir = tmp_path / "run"
    proc = run_train(["--config", config, f"train.run_dir={run_dir}", "--no-progress"], timeout=300)
    assert_one_line_error(proc, "data.sources", "matches no files")
    assert not run_dir.exists()


def test_training_with_mlflow_tracking_logs_params_metrics_and_artifacts(tmp_path, base_args):
    """train.tracking=mlflow against the real local store: the config as params, train loss per step,
    val loss at each eval, loss.png and config.yaml as artifacts; a resumed run continues the same run."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "tracked"
    args = base_args + [f"train.run_dir={run_dir}", "train.tracking=mlflow", "train.steps=4",
                        "train.log_interval=1", "train.eval_interval=2", "train.checkpoint_interval=2"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(args[:-4] + ["train.steps=6", "train.log_interval=1", "train.eval_interval=2",
                                  "train.checkpoint_interval=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "atlas"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "64" and run.data.params["train.tracking"] == "mlflow"
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps == [1, 2, 3, 4, 5, 6], loss_steps
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}) == [2, 4, 6]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"loss.png", "config.yaml"}
