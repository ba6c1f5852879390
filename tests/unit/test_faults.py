"""Fault injection over the training, data, tokenizer and generation entry points: each bad input or
fault exits 2 with exactly one `error:` line on stderr naming the file or key, no traceback, and no
file of the run changed (sha256 of every file before and after). The GGUF entry points have their
own suite (test_faults_export.py)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_jax.files import LOCK_NAME, DirLock

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def run(module: str, *args, stdin: bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]  # bytes: raw, possibly not UTF-8
    return subprocess.run([sys.executable, "-m", module, *argv], env=_env(), cwd=REPO,
                          input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file of the run (the lock file holds the PID of whoever held it last: not the run's)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def assert_fault(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got: {lines}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` unwritable even for root (the immutable attribute), or by mode bits as a fallback."""
    immutable = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if not immutable:
        if os.geteuid() == 0:
            pytest.fail("cannot make a directory read-only for root here (chattr +i failed)")
        path.chmod(0o555)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


@pytest.fixture(scope="module")
def run_args(shakespeare_data_dir, shakespeare_tokenizer):
    return ["--config", "configs/tiny.yaml", "--no-progress", "--no-samples",
            f"data.data_dir={shakespeare_data_dir}", f"data.tokenizer={shakespeare_tokenizer.path}",
            "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "train.eval_batches=1",
            "train.steps=4", "train.checkpoint_interval=4", "train.eval_interval=4", "train.log_interval=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_args) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    proc = run("atlas_jax.train", *run_args, f"train.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return run_dir


@pytest.fixture
def unchanged(trained):
    before = checksums(trained)
    yield trained
    assert checksums(trained) == before, "a file of the run changed"


# --------------------------------------------------------------------------- concurrency


def test_second_trainer_on_a_run_dir_in_use_is_refused_naming_the_pid(unchanged, run_args):
    with DirLock(unchanged, "train.run_dir"):  # this test process holds the run, as a first trainer would
        proc = run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", "train.steps=8")
    assert_fault(proc, "train.run_dir", f"in use by PID {os.getpid()}")


def test_second_data_prepare_into_one_directory_is_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    with DirLock(out, "--out"):
        proc = run("atlas_jax.data", "prepare", "--input", "tinyshakespeare", "--out", out, "--vocab-size", "512")
    assert_fault(proc, "--out", f"in use by PID {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [".atlas.lock"]


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, needles", [
    ("train.lr=.nan", ["train.lr", "finite"]), ("train.lr=inf", ["train.lr", "finite"]),
    ("train.min_lr=-.inf", ["train.min_lr", "finite"]), ("model.dropout=nan", ["model.dropout", "finite"])])
def test_nonfinite_config_values_are_refused(unchanged, run_args, override, needles):
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", override), *needles)


def test_empty_yaml_and_duplicate_keys_are_refused(tmp_path, unchanged, run_args):
    empty, dup = tmp_path / "empty.yaml", tmp_path / "dup.yaml"
    empty.write_text("# nothing\n")
    dup.write_text("train:\n  steps: 4\n  lr: 1.0e-3\n  steps: 8\n")
    assert_fault(run("atlas_jax.train", "--config", empty, f"train.run_dir={unchanged}"), str(empty), "empty")
    assert_fault(run("atlas_jax.train", "--config", dup, f"train.run_dir={unchanged}"), str(dup),
                 "'steps' appears twice (lines 2 and 4)")


def test_steps_below_the_checkpoint_say_the_run_is_past_them(unchanged, run_args):
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", "train.steps=2"),
                 "already at step 4", "train.steps=2", "--fresh")


# --------------------------------------------------------------------------- paths


def test_run_dir_or_data_dir_that_is_a_file(tmp_path, run_args, unchanged):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={a_file}"), "train.run_dir", "is a file")
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={a_file / 'run'}"), "train.run_dir",
                 f"{a_file} is a file")
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", f"data.data_dir={a_file}"),
                 "data.data_dir", "is a file")
    assert a_file.read_text() == "x"


def test_read_only_run_dir_is_found_before_any_step(tmp_path, run_args):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    with read_only(run_dir):
        proc = run("atlas_jax.train", *run_args, f"train.run_dir={run_dir}")
    assert_fault(proc, "train.run_dir", "not writable")
    assert not any(run_dir.iterdir())


def test_read_only_checkpoints_are_found_before_any_step_not_at_the_first_save(unchanged, run_args):
    with read_only(unchanged / "checkpoints"):
        proc = run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", "train.steps=8")
    assert_fault(proc, "checkpoints", "not writable")


def test_data_prepare_and_tokenizer_train_out_an_existing_file(tmp_path):
    a_file = tmp_path / "out"
    a_file.write_text("keep me")
    assert_fault(run("atlas_jax.data", "prepare", "--input", "tinyshakespeare", "--out", a_file, "--vocab-size", "512"),
                 "--out", "is a file")
    assert_fault(run("atlas_jax.tokenizer", "train", "--input", "tinyshakespeare", "--out", a_file,
                     "--vocab-size", "512"), "--out", "is a file")
    assert a_file.read_text() == "keep me"


def test_tokenizer_vocab_size_out_of_range_is_atlas_own_message(tmp_path):
    for bad in ("-5", "0"):
        line = assert_fault(run("atlas_jax.tokenizer", "train", "--input", "tinyshakespeare", "--out", tmp_path / "t",
                                "--vocab-size", bad), "--vocab-size", "positive")
        assert "sentencepiece" not in line.lower() and "trainer_spec" not in line, line
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- checkpoints, generation


def test_corrupt_checkpoint_line_has_no_cut_off_repr(tmp_path, trained, run_args):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    for f in (copy / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\x00garbage" * 8)
    before = checksums(copy)
    for proc in (run("atlas_jax.train", *run_args, f"train.run_dir={copy}", "train.steps=8"),
                 run("atlas_jax.generate", "--checkpoint", copy, "--prompt", "ROMEO:")):
        line = assert_fault(proc, "corrupt")
        assert "<bound method" not in line and "pybind11" not in line, line
    assert checksums(copy) == before


@pytest.mark.parametrize("args, stdin, needles", [
    (["--prompt", "ROMEO:", "--temperature", "nan"], None, ["temperature", "finite"]),
    (["--prompt", "ROMEO:", "--top-p", "inf"], None, ["top_p", "finite"]),
    (["--prompt", b"ROMEO \xff\xfe:"], None, ["--prompt", "UTF-8"]),
    ([], b"JULIET \xff:\n", ["stdin", "UTF-8", "0xff"]),
    (["--prompt", "ROMEO: " * 40, "--max-new-tokens", "8"], None, ["max_new_tokens=8", "at most 24 tokens"]),
])
def test_generate_refuses_bad_prompts_and_sampling_values(unchanged, args, stdin, needles):
    assert_fault(run("atlas_jax.generate", "--checkpoint", unchanged, *args, stdin=stdin), *needles)


def test_unreachable_tracking_uri_is_one_line_before_anything_is_written(unchanged, run_args):
    assert_fault(run("atlas_jax.train", *run_args, f"train.run_dir={unchanged}", "train.steps=8",
                     "train.tracking=mlflow", "train.tracking_uri=http://127.0.0.1:9"), "train.tracking_uri")
