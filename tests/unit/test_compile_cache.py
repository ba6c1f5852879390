"""Start-up: JAX's persistent compilation cache (atlas_jax.compile_cache) and `train --dry-run`, the
train step compiled ahead of time to report its memory per device before step 1."""
from __future__ import annotations

import re

import jax
import pytest

from tests.unit.test_train import assert_one_line_error, base_args, run_train  # noqa: F401 (a fixture)


def _entries(path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def test_second_run_loads_the_train_step_from_the_cache(tmp_path):
    """Two `train --dry-run` (each compiles the train step): the first writes the cache, the second
    loads every program from it and writes nothing."""
    cache = tmp_path / "jax-compile"
    args = ["--config", "configs/tiny.yaml", "--dry-run", "model.n_layers=1"]
    first = run_train(args, {"ATLAS_COMPILE_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr[-3000:]
    written = _entries(cache)
    compiled = int(re.search(r"0 programs loaded, (\d+) compiled", first.stdout)[1])
    assert compiled > 0 and len([n for n in written if n.endswith("-cache")]) >= compiled, (first.stdout, written)
    second = run_train(args, {"ATLAS_COMPILE_CACHE": str(cache)})
    assert re.search(rf"{compiled} programs loaded, 0 compiled", second.stdout), (first.stdout, second.stdout)
    assert _entries(cache) == written


def test_train_with_the_cache_off_writes_none_and_says_so(tmp_path, base_args):
    cache = tmp_path / "jax-compile"
    proc = run_train(["--no-compile-cache", *base_args, "train.steps=1", f"train.run_dir={tmp_path / 'run'}"],
                     {"ATLAS_COMPILE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("time to first step")]
    assert re.fullmatch(r"time to first step \d+\.\ds \(data, state, compile; compile cache off\)", line), line
    assert not cache.exists()


def test_cache_path_follows_the_environment(tmp_path, monkeypatch):
    from atlas_jax.compile_cache import cache_path

    monkeypatch.setenv("ATLAS_CACHE", str(tmp_path / "atlas"))
    monkeypatch.delenv("ATLAS_COMPILE_CACHE")
    assert cache_path() == tmp_path / "atlas" / "jax-compile"
    for off in ("0", "off", "OFF"):
        monkeypatch.setenv("ATLAS_COMPILE_CACHE", off)
        assert cache_path() is None
    monkeypatch.setenv("ATLAS_COMPILE_CACHE", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine"


def test_a_cache_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_train(["--config", "configs/tiny.yaml", "--dry-run"], {"ATLAS_COMPILE_CACHE": str(blocker)})
    assert_one_line_error(proc, "ATLAS_COMPILE_CACHE", "not a directory", "ATLAS_COMPILE_CACHE=0")


# --------------------------------------------------------------------------- --dry-run


def _sharded_bytes(fsdp: int) -> int:
    """The tiny config's params per device: each array split along a dimension fsdp divides, if any."""
    from atlas_jax.config import load_config
    from atlas_jax.train_step import base_shapes
    from tests.unit.test_train import REPO

    leaves = jax.tree_util.tree_leaves(base_shapes(load_config(REPO / "configs/tiny.yaml")))
    return sum(x.size * x.dtype.itemsize // (fsdp if any(d % fsdp == 0 for d in x.shape) else 1) for x in leaves)


def _report(stdout: str) -> dict[str, int]:
    return {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^  (\w[\w ]*?)\s{2,}([\d,]+) B", stdout, re.M)}


def test_dry_run_reports_memory_without_data_or_files(tmp_path):
    """One device: the params' bytes, Adam's two moments, the donated state aliased, and nothing read or
    written (the corpus named does not exist; the run dir is never made)."""
    from atlas_jax.config import load_config
    from atlas_jax.train import dry_run
    from tests.unit.test_train import REPO

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"train.run_dir={run_dir}", "train.mesh=[1,1]",
                                                   f"data.sources=[{tmp_path}/none/*.jsonl]"])
    d = dry_run(cfg)
    n = d["params"]
    assert d["params_bytes"] == _sharded_bytes(1) == 4 * n
    assert 2 * d["params_bytes"] <= d["opt_state_bytes"] < 2 * d["params_bytes"] + 1024  # mu, nu + counts
    assert d["argument_bytes"] >= d["params_bytes"] + d["opt_state_bytes"] + 2 * 8 * 64 * 4  # + the batch
    assert d["alias_bytes"] >= d["params_bytes"] + d["opt_state_bytes"]  # the state is donated
    assert d["temp_bytes"] > 0
    assert d["total_bytes"] == d["argument_bytes"] + d["output_bytes"] - d["alias_bytes"] + d["temp_bytes"]
    assert not run_dir.exists()


@pytest.mark.parametrize("mesh, fsdp", [("[8,1]", 1), ("[2,4]", 4)])
def test_dry_run_on_8_devices_divides_params_by_fsdp(tmp_path, mesh, fsdp):
    run_dir = tmp_path / "run"
    proc = run_train(["--config", "configs/tiny.yaml", "--dry-run", f"train.mesh={mesh}", f"train.run_dir={run_dir}",
                      f"data.sources=[{tmp_path}/none/*.jsonl]"],
                     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _report(proc.stdout)
    assert f"mesh {{'data': {8 // fsdp}, 'fsdp': {fsdp}, 'expert': 1}}" in proc.stdout, proc.stdout
    assert rows["parameters"] == _sharded_bytes(fsdp), proc.stdout
    assert rows["parameters"] * 2 <= rows["optimizer state"] < rows["parameters"] * 2 + 1024, proc.stdout
    assert rows["total"] == rows["XLA arguments"] + rows["XLA outputs"] - rows["XLA aliased"] + rows["XLA temporaries"]
    assert not run_dir.exists()


def test_dry_run_from_another_model_is_one_line(tmp_path):
    proc = run_train(["--config", "configs/tiny.yaml", "--dry-run", f"train.init_from=run:{tmp_path}"])
    assert_one_line_error(proc, "train.init_from", "--dry-run", "model.*")
