"""Fault injection over the training, data, tokenizer and generation entry points: each bad input or
fault exits 2 with exactly one `error:` line on stderr naming the file or key, no traceback, and no
file of the run changed (sha256 of every file before and after). The GGUF entry points have their
own suite (test_faults_export.py)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlas_jax.files import LOCK_NAME, DirLock
from cli_checks import read_only  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def run(module: str, *args, stdin: bytes | None = None, timeout: int = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]  # bytes: raw, possibly not UTF-8
    return subprocess.run([sys.executable, "-m", module, *argv], env={**_env(), **(env or {})}, cwd=REPO,
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


# --------------------------------------------------------------------------- the tokenizer and data CLIs


def _inputs(tmp_path: Path) -> dict[str, Path]:
    """Bad inputs for the tokenizer and data CLIs: a directory without text, a Latin-1 file, an empty
    file, a file, and a copy of tinyshakespeare with one byte more."""
    d = tmp_path / "inputs"
    (d / "no_text").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    (d / "a_file").write_text("x")
    (d / "shakespeare-plus.txt").write_bytes(
        (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_bytes() + b"!")
    return {p.name: p for p in d.iterdir()}


# case -> (module, arguments ({name} is a path of _inputs, {tmp} the test's tmp dir), substrings of the line)
CLI_CASES = {
    "tokenizer-unknown-subcommand": ("atlas_jax.tokenizer", ["fit"], ["invalid choice: 'fit'", "--help"]),
    "tokenizer-unknown-flag": ("atlas_jax.tokenizer", ["train", "--input", "tinyshakespeare", "--vocab-size", "512",
                                                       "--out", "{tmp}/t", "--lowercase"], ["--lowercase"]),
    "tokenizer-vocab-size-not-a-number": ("atlas_jax.tokenizer", ["train", "--input", "tinyshakespeare",
                                                                  "--vocab-size", "lots", "--out", "{tmp}/t"],
                                          ["--vocab-size", "'lots'"]),
    "tokenizer-input-dir-without-text": ("atlas_jax.tokenizer", ["train", "--input", "{no_text}", "--vocab-size",
                                                                 "512", "--out", "{tmp}/t"],
                                         ["--input", "no_text", "no .txt or .jsonl"]),
    "tokenizer-input-not-utf8": ("atlas_jax.tokenizer", ["train", "--input", "{latin1.txt}", "--vocab-size", "512",
                                                         "--out", "{tmp}/t"], ["latin1.txt", "UTF-8", "offset 3"]),
    "tokenizer-input-empty": ("atlas_jax.tokenizer", ["train", "--input", "{empty.txt}", "--vocab-size", "512",
                                                      "--out", "{tmp}/t"], ["no text"]),
    "tokenizer-input-missing": ("atlas_jax.tokenizer", ["train", "--input", "{tmp}/nothing.txt", "--vocab-size",
                                                        "512", "--out", "{tmp}/t"], ["--input", "nothing.txt"]),
    "tokenizer-out-under-a-file": ("atlas_jax.tokenizer", ["train", "--input", "tinyshakespeare", "--vocab-size",
                                                           "512", "--out", "{a_file}/t"], ["--out", "is a file"]),
    "data-unknown-subcommand": ("atlas_jax.data", ["stats"], ["invalid choice: 'stats'"]),
    "data-prepare-workers-not-a-number": ("atlas_jax.data", ["prepare", "--input", "tinyshakespeare", "--out",
                                                             "{tmp}/d", "--workers", "two"], ["--workers", "'two'"]),
    "data-prepare-negative-split-seed": ("atlas_jax.data", ["prepare", "--input", "tinyshakespeare", "--out",
                                                            "{tmp}/d", "--vocab-size", "512", "--doc-separator",
                                                            "\\n\\n", "--split-seed", "-1"], ["--split-seed", "-1"]),
    "data-seed-missing-arguments": ("atlas_jax.data", ["seed"], ["required: name, path"]),
    "data-seed-unknown-corpus": ("atlas_jax.data", ["seed", "tinystories", "{shakespeare-plus.txt}"],
                                 ["'tinystories' is not a known corpus"]),
    "data-seed-missing-file": ("atlas_jax.data", ["seed", "tinyshakespeare", "{tmp}/nothing.txt"],
                               ["nothing.txt", "not found"]),
    "data-seed-a-directory": ("atlas_jax.data", ["seed", "tinyshakespeare", "{no_text}"], ["no_text", "directory"]),
    "data-seed-wrong-file": ("atlas_jax.data", ["seed", "tinyshakespeare", "{shakespeare-plus.txt}"],
                             ["shakespeare-plus.txt", "sha256", "not the original"]),
    "train-unknown-flag": ("atlas_jax.train", ["--config", "configs/tiny.yaml", "--resume"], ["--resume"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_tokenizer_and_data_cli_faults_are_one_line(case, tmp_path):
    module, args, needles = CLI_CASES[case]
    paths = {**_inputs(tmp_path), "tmp": tmp_path}
    before = checksums(tmp_path)
    argv = []
    for a in args:
        for name, path in paths.items():
            a = a.replace("{" + name + "}", str(path))
        argv.append(a)
    assert_fault(run(module, *argv), *needles)
    assert checksums(tmp_path) == before  # no file written, changed or removed
    # `tokenizer train` makes --out before it reads the input, and leaves it (empty) when the input is bad
    assert not (tmp_path / "d").exists() and not ((tmp_path / "t").exists() and any((tmp_path / "t").iterdir()))


@pytest.mark.parametrize("cache", ["a-file", "under-a-file", "read-only"])
def test_an_unusable_corpus_cache_is_one_line_naming_atlas_cache(tmp_path, shakespeare_path, cache):
    """`data seed` and `data prepare` of a corpus name write into $ATLAS_CACHE: a file there, a parent
    that is a file or a read-only directory is found before anything is copied or downloaded."""
    place = tmp_path / "cache"
    if cache == "a-file":
        place.write_text("not a directory")
    elif cache == "under-a-file":
        (tmp_path / "file").write_text("x")
        place = tmp_path / "file" / "cache"
    else:
        place.mkdir()
    before = checksums(tmp_path)
    with read_only(place) if cache == "read-only" else contextlib.nullcontext():
        seed = run("atlas_jax.data", "seed", "tinyshakespeare", shakespeare_path, env={"ATLAS_CACHE": str(place)})
        prepare = run("atlas_jax.data", "prepare", "--input", "tinyshakespeare", "--out", tmp_path / "d",
                      "--vocab-size", "512", env={"ATLAS_CACHE": str(place)})
    for proc in (seed, prepare):
        assert_fault(proc, f"ATLAS_CACHE={place}")
    assert checksums(tmp_path) == before and not (tmp_path / "d").exists()


def test_tokenizer_out_inside_a_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        for out in (ro, ro / "tok"):
            assert_fault(run("atlas_jax.tokenizer", "train", "--input", "tinyshakespeare", "--vocab-size", "512",
                             "--out", out), "--out", str(out))
    assert not any(ro.iterdir())


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


# --------------------------------------------------------------------------- a save that fails mid-run

# `python -m atlas_jax.train ARGS` with one addition: after each checkpoint save returns or raises (the
# real orbax save, into the real directory), the trainer touches SYNC/saved-<step> and waits for
# SYNC/go-<step>. That pause is the test's moment to make checkpoints/ unwritable or writable again
# before the next save: deterministic, where a watcher racing the trainer is not.
_PAUSING_TRAINER = r"""
import sys, time
from pathlib import Path
import jax
import atlas_jax.checkpoint as ckpt
from atlas_jax.errors import run_cli
from atlas_jax.train import main

sync = Path(sys.argv.pop(1))
real_save = ckpt.save

def save(manager, state, *args, **kwargs):
    step = int(jax.device_get(state["step"]))
    try:
        return real_save(manager, state, *args, **kwargs)
    finally:
        (sync / f"saved-{step}").touch()
        deadline = time.monotonic() + 600
        while not (sync / f"go-{step}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

ckpt.save = save
run_cli(lambda: main(sys.argv[1:]))
"""


def _set_immutable(path: Path, on: bool) -> None:
    proc = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"chattr on {path} failed: {proc.stderr.decode()}")


def test_a_save_that_fails_mid_run_warns_trains_on_and_the_final_one_is_one_line(tmp_path, run_args):
    """checkpoints/ unwritable after the save of step 4: the save of step 8 warns (naming checkpoints/4)
    and training goes on; writable again, step 12 saves; unwritable again, the final save (step 16) is
    one error line naming checkpoints/12, which stays intact and resumes."""
    run_dir, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    ckpts = run_dir / "checkpoints"
    args = [*run_args, f"train.run_dir={run_dir}", "train.steps=16", "train.keep=3"]
    # before the trainer goes on past save <step>: make checkpoints/ unwritable (True) or writable (False)
    immutable_after = {4: True, 8: False, 12: True, 16: False}
    kept = {}
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSING_TRAINER, str(sync), *args], env=_env(), cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for step, immutable in immutable_after.items():
                while not (sync / f"saved-{step}").exists():
                    assert proc.poll() is None, f"trainer exited {proc.returncode} before the save of step {step}: " \
                                                f"{(tmp_path / 'stderr').read_text()[-3000:]}"
                    time.sleep(0.02)
                if step == 12:
                    assert (ckpts / "12").is_dir(), "the save of step 12 (checkpoints/ writable again) failed"
                    kept = checksums(ckpts / "12")
                _set_immutable(ckpts, immutable)
                (sync / f"go-{step}").touch()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _set_immutable(ckpts, False)
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err, err
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err[-3000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1, f"expected one warning (the save of step 8), got: {warnings}"
    assert "step 8" in warnings[0] and f"the last good checkpoint is {ckpts / '4'}" in warnings[0] \
        and "training goes on" in warnings[0], warnings[0]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == [lines[-1]], f"expected one error line, the last one, got: {lines}"
    for needle in ("step 16", f"the last good checkpoint is {ckpts / '12'}", "run the same command to resume"):
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    logged = {r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert {10, 12, 14, 16} <= logged, f"training did not go on after the failed save: steps {sorted(logged)}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "4"], "a failed save left something in checkpoints/"
    assert checksums(ckpts / "12") == kept, "the last good checkpoint changed"

    resumed = run("atlas_jax.train", *args)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert f"resumed from {ckpts / '12'}" in resumed.stderr.decode(), resumed.stderr.decode()[-3000:]
    assert (ckpts / "16").is_dir()


def test_a_save_whose_removal_of_an_older_checkpoint_fails_is_still_a_save(tmp_path, run_args):
    """train.keep=1: the save of step 8 writes checkpoints/8, then orbax removes checkpoints/4, which
    cannot be removed (made immutable after its save). Step 8 is saved and complete, so the run ends
    normally (a warning may name checkpoints/4), not with a failed save naming checkpoints/8 as the
    last good checkpoint, and checkpoints/8 loads."""
    from atlas_jax.checkpoint import find_checkpoint, load_for_inference

    run_dir, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    ckpts = run_dir / "checkpoints"
    args = [*run_args, f"train.run_dir={run_dir}", "train.steps=8", "train.keep=1"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSING_TRAINER, str(sync), *args], env=_env(), cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for step, immutable in ((4, True), (8, False)):
                while not (sync / f"saved-{step}").exists():
                    assert proc.poll() is None, f"trainer exited {proc.returncode} before the save of step {step}: " \
                                                f"{(tmp_path / 'stderr').read_text()[-3000:]}"
                    time.sleep(0.02)
                _set_immutable(ckpts / "4", immutable)
                (sync / f"go-{step}").touch()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _set_immutable(ckpts / "4", False)
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err, err
    assert proc.returncode == 0 and "error:" not in err, f"exit {proc.returncode}, stderr: {err[-3000:]}"
    assert find_checkpoint(run_dir)[1] == ckpts / "8"
    params, _, _ = load_for_inference(run_dir)
    assert params
