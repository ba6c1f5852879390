"""Data parallel, FSDP, expert parallel and multi-process runs give the losses of a 1-device run
with the same batch.

Each runs in a subprocess: forced host devices (XLA_FLAGS) must be set before jax starts, and the
2-process run needs two jax runtimes joined through jax.distributed on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from atlas_jax.config import Config, DataConfig, ModelConfig, resolve
from atlas_jax.errors import ConfigError
from atlas_jax.model import init_params
from atlas_jax.sharding import make_mesh, state_shardings
from tests.runs import step_losses

REPO = Path(__file__).resolve().parents[2]

MESH_SCRIPT = r"""
import json, sys
import jax
from atlas_jax.config import Config, DataConfig, ModelConfig, TrainConfig, resolve
from atlas_jax.data.loader import make_train_iterator
from atlas_jax.sharding import global_batch, make_mesh
from atlas_jax.train_step import create_sharded_state, make_train_step

data_dir = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
cfg = resolve(Config(
    model=ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
    data=DataConfig(seq_len=32),
    train=TrainConfig(batch_size=16, microbatches=2, steps=5, lr=3e-3, warmup_steps=2, min_lr=3e-4, seed=0)))
it = make_train_iterator(data_dir, 32, 16, 0)
batches = [next(it) for _ in range(5)]
out = {}
for name, shape, devices in [("1x1", (1, 1), jax.devices()[:1]), ("8x1", (8, 1), None),
                             ("1x8", (1, 8), None), ("2x4", (2, 4), None)]:
    mesh = make_mesh(shape, devices)
    state, shardings = create_sharded_state(cfg, mesh)
    step = make_train_step(cfg, mesh, shardings)
    losses = []
    for b in batches:
        state, m = step(state, global_batch(b, mesh))
        losses.append(float(m["loss"]))
    emb = state["params"]["embed"]["embedding"]
    out[name] = {"losses": losses, "embed_spec": str(emb.sharding.spec),
                 "embed_shard_shape": list(emb.addressable_shards[0].data.shape)}
print("RESULT " + json.dumps(out))
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def test_data_parallel_and_fsdp_match_one_device(shakespeare_data_dir):
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(shakespeare_data_dir)],
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    ref = np.array(out["1x1"]["losses"])
    for name in ("8x1", "1x8", "2x4"):
        got = np.array(out[name]["losses"])
        worst = np.max(np.abs(got - ref))
        assert worst <= 1e-5, f"mesh {name}: losses {got} vs 1 device {ref}, max |diff| {worst:.2e}"
    # FSDP really shards: each device holds 1/8 (1x8) or 1/4 (2x4) of the [512, 64] embedding.
    assert "fsdp" in out["1x8"]["embed_spec"] and out["1x8"]["embed_shard_shape"] == [64, 64], out["1x8"]
    assert out["2x4"]["embed_shard_shape"] == [128, 64], out["2x4"]
    assert out["8x1"]["embed_shard_shape"] == [512, 64], out["8x1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, shakespeare_data_dir, shakespeare_tokenizer):
    common = ["--config", "configs/tiny.yaml", "--no-progress", "--no-samples",
              f"data.data_dir={shakespeare_data_dir}", f"data.tokenizer={shakespeare_tokenizer.path}",
              "train.steps=5", "train.log_interval=1", "train.eval_interval=5", "train.checkpoint_interval=5",
              "train.batch_size=8", "model.max_seq_len=32", "data.seq_len=32"]
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "atlas_jax.train", *common, f"train.run_dir={single}"],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "atlas_jax.train", *common, f"train.run_dir={multi}",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    assert "'data': 2" in outs[0][1], "the 2-process run should see 2 devices on its data axis"
    want, got = step_losses(single), step_losses(multi)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5, f"step {s}: 2 processes {got[s]} vs 1 process {want[s]}"
    assert (multi / "checkpoints" / "5").is_dir(), "the 2-process run wrote no checkpoint"


def test_one_signalled_process_stops_both_at_the_same_step_and_resumes_exactly(
        tmp_path, shakespeare_data_dir, shakespeare_tokenizer):
    """SIGTERM to process 1 only: both processes agree on the stop, save the same step together and
    exit 130; resumed, the run's per-step losses equal a 1-process run that never stopped."""
    import signal
    import time

    common = ["--config", "configs/tiny.yaml", "--no-progress", "--no-samples",
              f"data.data_dir={shakespeare_data_dir}", f"data.tokenizer={shakespeare_tokenizer.path}",
              "train.log_interval=1", "train.eval_interval=100000", "train.checkpoint_interval=100000",
              "train.batch_size=8", "model.max_seq_len=32", "data.seq_len=32",
              "train.schedule=constant", "train.warmup_steps=0"]  # the schedule does not depend on train.steps
    multi = tmp_path / "multi"

    def launch(steps: int):
        port = _free_port()
        return [subprocess.Popen(
            [sys.executable, "-m", "atlas_jax.train", *common, f"train.steps={steps}", f"train.run_dir={multi}",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]

    procs = launch(100000)
    deadline, metrics = time.time() + 300, multi / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 130, f"process {i} exited {p.returncode}: {err[-3000:]}"
    saved = [int(d.name) for d in (multi / "checkpoints").iterdir() if d.name.isdigit()]
    assert len(saved) == 1, saved
    stop = saved[0]
    assert max(step_losses(multi)) == stop

    procs = launch(stop + 3)
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"resumed process {i}: {err[-3000:]}"
    assert "resumed from" in outs[0][1]

    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "atlas_jax.train", *common, f"train.steps={stop + 3}",
                           f"train.run_dir={single}"], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = step_losses(single), step_losses(multi)
    assert sorted(got) == sorted(want) == list(range(1, stop + 4))
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5, f"step {s}: 2 processes (resumed) {got[s]} vs 1 process {want[s]}"


# The 2x1x4 state saved (checkpoint.save) and restored into the 1x1x8 shardings: the same values, 1 expert a device.
RESTORE_ON_ANOTHER_MESH = r"""
import tempfile
from pathlib import Path
import numpy as np
from atlas_jax import checkpoint as ckpt
from atlas_jax.sharding import state_shardings
from atlas_jax.train_step import abstract_state
with tempfile.TemporaryDirectory() as tmp:
    manager = ckpt.make_manager(Path(tmp), 1)
    ckpt.save(manager, kept["2x1x4"], {}, cfg)
    abstract = abstract_state(cfg)
    back, _ = ckpt.restore(manager, manager.latest_step(), abstract, state_shardings(abstract, make_mesh((1, 1, 8))), cfg)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(kept["2x1x4"])))
    w = back["params"]["layers_0"]["moe"]["w_up"]
    out["2x1x4 restored on 1x1x8"] = {"max_diff": diff, "w_up_shard": list(w.addressable_shards[0].data.shape)}
"""


def test_moe_data_fsdp_and_expert_parallel_match_one_device(shakespeare_data_dir):
    # A mixture-of-experts llama (8 experts, 2 per token, the default moe_impl): the sort by expert and
    # the load-balancing loss run over the whole microbatch whichever devices hold its rows. 2x4: FSDP
    # splits the stacked expert weights like any other array; [d, f, e]: the expert axis holds 8/e
    # experts per device (with fsdp splitting another dimension at 2x2x2); a checkpoint of 2x1x4 restores on
    # 1x1x8. Each mesh compiles its own step.
    script = MESH_SCRIPT.replace("max_seq_len=32)", "max_seq_len=32, moe_experts=8, moe_experts_per_token=2)").replace(
        '("8x1", (8, 1), None),\n                             ("1x8", (1, 8), None), ',
        '("1x1x8", (1, 1, 8), None), ("2x1x4", (2, 1, 4), None), ("2x2x2", (2, 2, 2), None), ').replace(
        'out[name] = {"losses": losses,',
        'w = state["params"]["layers_0"]["moe"]["w_up"]\n'
        '    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])\n'
        '          if ".mu" in jax.tree_util.keystr(p) and jax.tree_util.keystr(p).endswith("[\'layers_0\'][\'moe\'][\'w_up\']")][0]\n'
        '    out[name] = {"losses": losses, "w_up_spec": str(w.sharding.spec),\n'
        '                 "w_up_shard": list(w.addressable_shards[0].data.shape),\n'
        '                 "w_up_mu_shard": list(mu.addressable_shards[0].data.shape),').replace(
        "out = {}\n", "out, kept = {}, {}\n").replace('    emb = state[', '    kept[name] = state\n    emb = state[').replace(
        'print("RESULT "', RESTORE_ON_ANOTHER_MESH + 'print("RESULT "')
    assert "moe_experts" in script and '"1x1x8"' in script and "w_up_mu_shard" in script and "kept[name]" in script, \
        "MESH_SCRIPT changed: update this test's edits"
    proc = subprocess.run([sys.executable, "-c", script, str(shakespeare_data_dir)],
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    ref = np.array(out["1x1"]["losses"])
    for name in ("2x4", "1x1x8", "2x1x4", "2x2x2"):
        got = np.array(out[name]["losses"])
        worst = np.max(np.abs(got - ref))
        assert worst <= 1e-5, f"MoE mesh {name}: losses {got} vs 1 device {ref}, max |diff| {worst:.2e}"
    # The expert axis really places experts: w_up [8, 64, d_ff] and its Adam moment hold 8/e experts per device.
    d_ff = out["1x1"]["w_up_shard"][2]
    for name, shard in [("1x1", [8, 64, d_ff]), ("1x1x8", [1, 64, d_ff]), ("2x1x4", [2, 64, d_ff]),
                        ("2x2x2", [4, 64, d_ff // 2])]:
        assert out[name]["w_up_shard"] == out[name]["w_up_mu_shard"] == shard, (name, out[name])
    assert out["1x1x8"]["w_up_spec"] == "P('expert', None, None)", out["1x1x8"]
    # A checkpoint saved on one mesh restores on another (orbax reshards on restore).
    moved = out["2x1x4 restored on 1x1x8"]
    assert moved["max_diff"] == 0.0 and moved["w_up_shard"] == [1, 64, d_ff], moved


def test_expert_axis_splits_expert_tensors_and_refuses_one_that_does_not_divide():
    # Shardings on an abstract (data, fsdp, expert) mesh: no devices needed. A -1 expert axis is resolved
    # from the device count, so the check that config.validate makes on a given size is made here again.
    cfg = resolve(Config(model=ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8,
                                           moe_experts=6), data=DataConfig(seq_len=8)))
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    got = state_shardings(shapes, AbstractMesh((1, 2, 2), ("data", "fsdp", "expert")))
    assert got["layers_0"]["moe"]["w_up"].spec == P("expert", None, "fsdp"), got["layers_0"]["moe"]["w_up"]
    assert got["layers_0"]["moe"]["router"]["kernel"].spec != P("expert"), "only the [E, ...] expert tensors"
    with pytest.raises(ConfigError, match=r"^train.mesh expert axis 4 does not divide model.moe_experts=6; "
                                          r"use an expert axis that divides 6$"):
        state_shardings(shapes, AbstractMesh((1, 1, 4), ("data", "fsdp", "expert")))
    # A saved 2-entry mesh still loads: expert = 1.
    assert dict(make_mesh([1, 1], jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "expert": 1}
    assert dict(make_mesh([1, 1, -1], jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "expert": 1}
