"""Fault injection on the benchmark CLI, `python -m atlas_jax.bench` (scripts/bench.py calls it), each case
run as a subprocess.

The promise (issue #18): every bad flag, number, config, run directory, corpus or output file is exactly
one `error: ...` line on stderr naming it, exit 2, no traceback, nothing on stdout, and no file changed
(sha256 of every file under the test's directory and of the repo's docs/benchmarks.*, before and after).
Every case fails before a child process, a JAX compile or a measurement starts: the suite takes seconds.
The good paths run in test_bench.py (`--quick`); the output checks that accept a file are tested here
in-process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from atlas_jax.bench.common import BenchError
from atlas_jax.bench.report import MARK_BEGIN, MARK_END, PNG_MAGIC, check_outputs, check_png, write_outputs
from cli_checks import read_only  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run(*args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "atlas_jax.bench", *map(str, args)], cwd=REPO, env=env,
                          input=b"", capture_output=True, timeout=timeout)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root, and each directory's name: a change, a new file or
    directory (a temporary or probe left behind) or a removal shows."""
    out = {}
    for root in roots:
        for p in [root] if not root.is_dir() else [root, *sorted(root.rglob("*"))]:
            if p.is_symlink():
                out[str(p)] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, nothing on stdout, one `error: ` line on stderr holding every name."""
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{len(lines)} lines on stderr:\n{err}"
    for name in names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    assert proc.stdout == b"", proc.stdout
    return lines[0]


def _files(d: Path) -> SimpleNamespace:
    """What the cases point at: bench results and their markdown, files that are not bench files, bad
    configs, run dirs without a checkpoint, bad corpora, a read-only directory."""
    (d / "results.json").write_text(json.dumps({"machine": {"cpu": "x"}, "earlier": {"kept": True}}) + "\n")
    (d / "results.md").write_text(f"# Benchmarks\n\n{MARK_BEGIN}\nold\n{MARK_END}\n")
    (d / "package.json").write_text('{"name": "someone-elses"}\n')
    (d / "notes.json").write_text("plain notes, not JSON\n")
    (d / "list.json").write_text("[1, 2, 3]\n")
    (d / "latin1.md").write_bytes("caf\u00e9\n".encode("latin-1"))
    (d / "two-begins.md").write_text(f"{MARK_BEGIN}\n{MARK_BEGIN}\ntable\n{MARK_END}\n")
    (d / "photo.png").write_text("not a PNG image\n")
    (d / "bad.yaml").write_text("model: [d_model: 64\n")
    (d / "empty.yaml").write_text("# nothing\n")
    (d / "a_file").write_text("x")
    (d / "run_without_checkpoint").mkdir()
    (d / "run_without_checkpoint" / "config.yaml").write_text("model: {}\n")
    (d / "run_with_empty_checkpoints" / "checkpoints").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("ROMEO: caf\u00e9\n".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    (d / "readonly").mkdir()
    (d / "outdir").mkdir()
    return SimpleNamespace(dir=d, **{p.name.replace(".", "_").replace("-", "_"): p for p in d.iterdir()})


O = "{dir}/new.json"  # a valid --out for the cases that are not about it

# case -> (arguments, substrings of the line); "{x}" is the path of _files' x (dots and dashes as _)
CASES = {
    # the command line
    "unknown-subcommand": (["profile"], ["invalid choice: 'profile'", "train"]),
    "no-subcommand": ([], ["required"]),
    "unknown-flag": (["train", "--out", O, "--iterations", "3"], ["--iterations"]),
    "steps-not-a-number": (["train", "--out", O, "--steps", "ten"], ["--steps", "'ten'"]),
    "steps-zero": (["train", "--out", O, "--steps", "0"], ["--steps", "at least 1"]),
    "steps-negative": (["scaling", "--out", O, "--steps", "-2"], ["--steps", "-2"]),
    "warmup-zero": (["train", "--out", O, "--warmup", "0"], ["--warmup", "at least 1"]),
    "rounds-negative": (["train", "--out", O, "--rounds", "-1"], ["--rounds", "-1"]),
    "rounds-nan": (["train", "--out", O, "--rounds", "nan"], ["--rounds", "'nan'"]),
    "frameworks-unknown": (["train", "--out", O, "--frameworks", "atlas_jax,tensorflow"],
                           ["--frameworks", "'tensorflow'"]),
    "batches-not-numbers": (["decode", "--out", O, "--batches", "1,many"], ["--batches", "'many'"]),
    "batches-zero": (["decode", "--out", O, "--batches", "0,32"], ["--batches", "0"]),
    "batches-empty-item": (["decode", "--out", O, "--batches", "1,,32"], ["--batches", "empty item"]),
    "prompt-len-negative": (["decode", "--out", O, "--prompt-len", "-16"], ["--prompt-len", "-16"]),
    "new-tokens-zero": (["decode", "--out", O, "--new-tokens", "0"], ["--new-tokens"]),
    "threads-zero": (["decode", "--out", O, "--threads", "0"], ["--threads"]),
    "reps-float": (["decode", "--out", O, "--reps", "1.5"], ["--reps", "'1.5'"]),
    "decode-ftypes-unknown": (["decode", "--out", O, "--ftypes", "f32,q3_z"], ["--ftypes", "'q3_z'"]),
    "seq-lens-zero": (["scaling", "--out", O, "--seq-lens", "0,64"], ["--seq-lens", "0"]),
    "tokens-per-step-negative": (["scaling", "--out", O, "--tokens-per-step", "-256"], ["--tokens-per-step"]),
    "sizes-unknown": (["scaling", "--out", O, "--sizes", "tiny,7B"], ["--sizes", "'7B'"]),
    "sizes-bad-yaml": (["scaling", "--out", O, "--sizes", "tiny,{bad_yaml}"], ["{bad_yaml}", "not valid YAML"]),
    "windows-zero": (["quality", "--out", O, "--checkpoint", "{run_without_checkpoint}", "--windows", "0"],
                     ["--windows"]),
    "quality-ftypes-unknown": (["quality", "--out", O, "--checkpoint", "{dir}", "--ftypes", "q4_0-gptq"],
                               ["--ftypes", "'q4_0-gptq'"]),
    # configs and overrides
    "config-missing": (["train", "--out", O, "--config", "{dir}/missing.yaml"], ["missing.yaml", "not found"]),
    "config-bad-yaml": (["train", "--out", O, "--config", "{bad_yaml}"], ["{bad_yaml}", "not valid YAML"]),
    "config-empty": (["decode", "--out", O, "--config", "{empty_yaml}"], ["{empty_yaml}", "empty"]),
    "scaling-config-bad-yaml": (["scaling", "--out", O, "--config", "{bad_yaml}"], ["{bad_yaml}"]),
    "override-nan": (["train", "--out", O, "train.lr=nan"], ["train.lr", "finite"]),
    "override-unknown-key": (["train", "--out", O, "model.width=64"], ["model.width", "unknown key"]),
    "override-without-value": (["train", "--out", O, "steps"], ["'steps'", "section.key=value"]),
    # run directories
    "decode-checkpoint-missing": (["decode", "--out", O, "--checkpoint", "{dir}/no_run"],
                                  ["--checkpoint", "no_run", "no such run"]),
    "decode-checkpoint-without-one": (["decode", "--out", O, "--checkpoint", "{run_without_checkpoint}"],
                                      ["--checkpoint", "no checkpoint found"]),
    "decode-checkpoint-is-a-file": (["decode", "--out", O, "--checkpoint", "{a_file}"],
                                    ["--checkpoint", "no checkpoint found"]),
    "quality-checkpoint-missing": (["quality", "--out", O, "--checkpoint", "{dir}/no_run"], ["--checkpoint", "no_run"]),
    "quality-checkpoint-empty": (["quality", "--out", O, "--checkpoint", "{run_with_empty_checkpoints}"],
                                 ["--checkpoint", "no checkpoint found"]),
    "quality-without-checkpoint": (["quality", "--out", O], ["--checkpoint RUN_DIR"]),
    "decode-checkpoint-and-override": (["decode", "--out", O, "--checkpoint", "{run_with_empty_checkpoints}",
                                        "model.d_model=128"], ["--checkpoint"]),
    # the corpus (decode trains a tokenizer on it and takes the prompts from it)
    "corpus-missing": (["decode", "--out", O, "--corpus", "{dir}/missing.txt"], ["--corpus", "not found"]),
    "corpus-a-directory": (["decode", "--out", O, "--corpus", "{dir}"], ["--corpus", "directory"]),
    "corpus-not-utf8": (["decode", "--out", O, "--corpus", "{latin1_txt}"], ["--corpus", "UTF-8", "offset 10"]),
    "corpus-empty": (["decode", "--out", O, "--corpus", "{empty_txt}"], ["--corpus", "no text"]),
    # output files
    "out-is-a-directory": (["train", "--out", "{outdir}"], ["--out", "is a directory"]),
    "out-parent-missing": (["train", "--out", "{dir}/no/such/b.json"], ["--out", "does not exist"]),
    "out-parent-is-a-file": (["train", "--out", "{a_file}/b.json"], ["--out", "is not a directory"]),
    "out-in-read-only-dir": (["train", "--out", "{readonly}/b.json"], ["--out", "cannot write in"]),
    "out-not-json": (["train", "--out", "{notes_json}"], ["--out", "not JSON", "never replace"]),
    "out-someone-elses-json": (["train", "--out", "{package_json}"], ["--out", "no bench results"]),
    "out-json-list": (["train", "--out", "{list_json}"], ["--out", "no bench results"]),
    "out-not-a-json-name": (["train", "--out", "{dir}/results.txt"], ["--out", "not a .json name"]),
    "out-default-md-not-utf8": (["train", "--out", "{dir}/latin1.json"], ["--md", "latin1.md", "not UTF-8"]),
    "md-is-a-directory": (["train", "--out", O, "--md", "{outdir}"], ["--md", "is a directory"]),
    "md-not-an-md-name": (["train", "--out", O, "--md", "{bad_yaml}"], ["--md", "not a .md name"]),
    "md-two-begin-markers": (["train", "--out", O, "--md", "{two_begins_md}"], ["--md", "markers"]),
    "md-in-read-only-dir": (["train", "--out", O, "--md", "{readonly}/b.md"], ["--md", "cannot write in"]),
    "png-is-a-directory": (["scaling", "--quick", "--out", O, "--png", "{outdir}"], ["--png", "is a directory"]),
    "png-not-a-png": (["scaling", "--quick", "--out", O, "--png", "{photo_png}"], ["--png", "not a PNG"]),
    "png-not-a-png-name": (["scaling", "--quick", "--out", O, "--png", "{dir}/plot.svg"], ["--png", ".png"]),
    "png-default-in-read-only-dir": (["scaling", "--quick", "--out", "{readonly}/b.json"], ["--out", "cannot write"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_fault_is_one_line_and_changes_nothing(case, tmp_path):
    args, names = CASES[case]
    files = _files(tmp_path)

    def fill(text: str) -> str:
        for name, path in vars(files).items():
            text = text.replace("{" + name + "}", str(path))
        return text

    docs = [p for p in (REPO / "docs" / "benchmarks.json", REPO / "docs" / "benchmarks.md") if p.exists()]
    before = snapshot(tmp_path, *docs)
    with read_only(files.readonly):
        proc = run(*map(fill, args))
    assert_one_line_error(proc, *map(fill, names))
    assert snapshot(tmp_path, *docs) == before


def test_scripts_bench_py_keeps_the_promise_too(tmp_path):
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "scripts/bench.py", "train", "--steps", "0", "--out", tmp_path / "b.json"],
                          cwd=REPO, capture_output=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert_one_line_error(proc, "bench.py train", "--steps")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- what the output checks accept


def test_outputs_that_hold_bench_results_or_are_new_are_accepted(tmp_path):
    files = _files(tmp_path)
    check_outputs(files.results_json, files.results_md)  # earlier results: merged into
    check_outputs(tmp_path / "new.json", tmp_path / "new.md")
    (tmp_path / "empty.json").write_text("")
    check_outputs(tmp_path / "empty.json", tmp_path / "plain.md")
    (tmp_path / "plain.md").write_text("# Notes\n\nno markers yet: the tables are appended\n")
    check_outputs(tmp_path / "new.json", tmp_path / "plain.md")
    (tmp_path / "plot.png").write_bytes(PNG_MAGIC + b"rest")
    check_png(tmp_path / "plot.png")
    check_png(tmp_path / "new.png")


def test_write_outputs_into_a_directory_made_read_only_during_the_run_changes_nothing(tmp_path):
    """The checks run again when the results are written (minutes later): a directory that went
    read-only is one BenchError line, and the earlier files are untouched (no temporary left)."""
    files = _files(tmp_path)
    out_dir = tmp_path / "later"
    out_dir.mkdir()
    out, md = out_dir / "b.json", out_dir / "b.md"
    shutil.copy(files.results_json, out)
    shutil.copy(files.results_md, md)
    before = snapshot(out_dir)
    section = {"checkpoint": "runs/x", "n_windows": 1, "command": "python scripts/bench.py quality", "types": {}}
    with read_only(out_dir), pytest.raises(BenchError) as e:
        write_outputs("quality", section, out, md)
    assert "--out" in str(e.value) and "cannot write in" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out_dir) == before


def test_write_outputs_replaces_atomically_and_keeps_the_file_mode(tmp_path):
    files = _files(tmp_path)
    files.results_json.chmod(0o644)
    section = {"checkpoint": "runs/x", "n_windows": 1, "command": "python scripts/bench.py quality", "types": {}}
    data = write_outputs("quality", section, files.results_json, files.results_md)
    assert data["earlier"] == {"kept": True} and data["quality"]["checkpoint"] == "runs/x"
    assert json.loads(files.results_json.read_text())["quality"]["checkpoint"] == "runs/x"
    assert files.results_json.stat().st_mode & 0o777 == 0o644
    assert files.results_md.read_text().count(MARK_BEGIN) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left"
