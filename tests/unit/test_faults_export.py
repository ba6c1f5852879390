"""Fault injection on the two GGUF entry points, `scripts/to_gguf.py` and `scripts/llamacpp_generate.py`
(atlas_jax/export/to_gguf.py, atlas_jax/export/llamacpp_generate.py), each run as a subprocess.

The promise (issue #18): every bad input or fault is exactly one `error: ...` line on stderr that
names the file or flag, exit 2, no traceback, and no file of the run changed (sha256 of every file
under the run dir, the run's tokenizer, the GGUF files and the --out dir, before and after). Each
case is one parametrized test; the good path of each command runs once.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N_CTX = 64  # the tiny model's max_seq_len: its GGUF context_length
LONG_PROMPT = "ROMEO: " * 40  # about 240 tokens with the 512-piece tokenizer


def run(script: str, *args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}", *map(str, args)], cwd=REPO, input=stdin or b"",
                          capture_output=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under each root: any change, new file
    (a temporary left behind) or removal shows."""
    out = {}
    for root in roots:
        for p in [root] if not root.is_dir() else sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = f"-> {os.readlink(p)}"
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


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_tokenizer) -> SimpleNamespace:
    """A run dir as the trainer leaves it: checkpoints/<step> written by checkpoint.save, config.yaml,
    metrics.jsonl and tokenizer.model; its config names a tokenizer outside the run (data.tokenizer).
    The model is untrained: these tests are about files, not text."""
    from atlas_jax import checkpoint
    from atlas_jax.config import Config, DataConfig, ModelConfig, resolve, resolve_model, save_config
    from atlas_jax.model import init_params
    from atlas_jax.optim import make_optimizer

    root = tmp_path_factory.mktemp("faults_run")
    external = root / "tokenizers" / "shakespeare.model"
    external.parent.mkdir()
    shutil.copy(shakespeare_tokenizer.path, external)
    model = resolve_model(ModelConfig(vocab_size=shakespeare_tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                      n_kv_heads=2, max_seq_len=N_CTX, arch="llama"))
    cfg = resolve(Config(model=model, data=DataConfig(seq_len=32, tokenizer=str(external))))
    params = jax.tree_util.tree_map(np.asarray, init_params(model, jax.random.key(0)))
    state = {"params": params, "opt_state": make_optimizer(cfg.train).init(params), "step": np.int32(1),
             "rng": jax.random.key_data(jax.random.key(0)), "bad_steps": np.int32(0)}
    run_dir = root / "run"
    checkpoint.save(checkpoint.make_manager(run_dir, keep=1), state, {}, cfg)
    shutil.copy(shakespeare_tokenizer.path, run_dir / "tokenizer.model")
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (run_dir / "notes.gguf").write_text("not a GGUF file, but named like one\n")
    step_dir = checkpoint.find_checkpoint(run_dir)[1]
    return SimpleNamespace(dir=run_dir, step_dir=step_dir, tokenizer=external, params=params, cfg=cfg,
                           roots=(run_dir, external.parent))


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, trained_run) -> SimpleNamespace:
    """The run as an f32 GGUF (export_gguf) and the bad files: a truncated copy (its tensors cut), one
    cut inside the header, an empty file, a text file, and a valid GGUF llama.cpp cannot load."""
    from atlas_jax.export.gguf import export_gguf

    d = tmp_path_factory.mktemp("faults_gguf")
    good = export_gguf(trained_run.params, trained_run.cfg.model, trained_run.dir / "tokenizer.model", d / "m.gguf")
    data = good.read_bytes()
    reader = gguf.GGUFReader(good)
    first = min(int(t.data_offset) for t in reader.tensors)
    (d / "truncated.gguf").write_bytes(data[:first + (len(data) - first) // 2])
    (d / "header-cut.gguf").write_bytes(data[:100])
    (d / "empty.gguf").write_bytes(b"")
    (d / "text.gguf").write_text("ROMEO: this is a text file, not a model\n")
    writer = gguf.GGUFWriter(d / "unknown-arch.gguf", "atlas-unknown")
    writer.add_uint32(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch="atlas-unknown"), N_CTX)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return SimpleNamespace(dir=d, good=good, **{p.stem.replace("-", "_"): p for p in d.iterdir()})


# --------------------------------------------------------------------------- llamacpp_generate

# case -> (arguments after the GGUF path, stdin, substrings of the line); "{f.x}" picks a file of gguf_files
GENERATE_CASES = {
    "text-file-not-gguf": ("text", ["--prompt", "ROMEO:"], None, ["{file}", "not a GGUF file"]),
    "empty-file": ("empty", ["--prompt", "ROMEO:"], None, ["{file}", "empty"]),
    "truncated-tensors": ("truncated", ["--prompt", "ROMEO:"], None, ["{file}", "truncated"]),
    "truncated-header": ("header_cut", ["--prompt", "ROMEO:"], None, ["{file}", "truncated"]),
    "a-directory": ("dir", ["--prompt", "ROMEO:"], None, ["{file}", "directory"]),
    "missing-file": ("missing", ["--prompt", "ROMEO:"], None, ["{file}", "no such GGUF file"]),
    "llamacpp-refuses-the-file": ("unknown_arch", ["--prompt", "ROMEO:"], None,
                                  ["{file}", "unknown model architecture", "to_gguf.py"]),
    "prompt-longer-than-context": ("good", ["--prompt", LONG_PROMPT, "--max-tokens", "8"], None,
                                   ["--prompt", "--max-tokens 8", f"context of {N_CTX} tokens",
                                    f"at most {N_CTX - 8} tokens"]),
    "prompt-fills-context-default-max-tokens": ("good", ["--prompt", LONG_PROMPT], None,
                                                ["--prompt", f"context of {N_CTX} tokens",
                                                 f"at most {N_CTX - 1} tokens"]),
    "prompt-plus-max-tokens-past-context": ("good", ["--prompt", "ROMEO:", "--max-tokens", str(N_CTX - 2)], None,
                                            ["--max-tokens 62", f"<= {N_CTX}", "shorten the prompt"]),
    "max-tokens-negative": ("good", ["--prompt", "ROMEO:", "--max-tokens", "-5"], None, ["--max-tokens -5"]),
    "max-tokens-zero": ("good", ["--prompt", "ROMEO:", "--max-tokens", "0"], None, ["--max-tokens 0"]),
    "max-tokens-the-whole-context": ("good", ["--prompt", "ROMEO:", "--max-tokens", str(N_CTX)], None,
                                     [f"--max-tokens {N_CTX}", f"at most {N_CTX - 1}"]),
    "max-tokens-not-a-number": ("good", ["--prompt", "ROMEO:", "--max-tokens", "many"], None, ["--max-tokens"]),
    "temperature-negative": ("good", ["--prompt", "ROMEO:", "--temperature", "-1"], None, ["--temperature", ">= 0"]),
    "temperature-nan": ("good", ["--prompt", "ROMEO:", "--temperature", "nan"], None, ["--temperature nan"]),
    "temperature-inf": ("good", ["--prompt", "ROMEO:", "--temperature", "inf"], None, ["--temperature inf"]),
    "top-k-negative": ("good", ["--prompt", "ROMEO:", "--top-k", "-1"], None, ["--top-k -1"]),
    "top-p-zero": ("good", ["--prompt", "ROMEO:", "--top-p", "0"], None, ["--top-p 0"]),
    "top-p-above-one": ("good", ["--prompt", "ROMEO:", "--top-p", "1.5"], None, ["--top-p 1.5"]),
    "seed-negative": ("good", ["--prompt", "ROMEO:", "--seed", "-1"], None, ["--seed -1"]),
    "prompt-not-utf8-argv": ("good", ["--prompt", "RO\udcffMEO:"], None, ["--prompt", "UTF-8"]),  # argv byte 0xff
    "prompt-not-utf8-stdin": ("good", [], b"RO\xffMEO:", ["stdin", "UTF-8", "0xff"]),
    "prompt-empty": ("good", ["--prompt", ""], None, ["--prompt", "empty"]),
    "stdin-empty": ("good", [], b"", ["stdin", "empty"]),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_llamacpp_generate_fault_is_one_line_and_changes_nothing(case, gguf_files):
    which, args, stdin, names = GENERATE_CASES[case]
    path = {"dir": gguf_files.dir, "missing": gguf_files.dir / "missing.gguf"}.get(which) or getattr(gguf_files, which)
    before = snapshot(gguf_files.dir)
    proc = run("llamacpp_generate.py", path, *args, stdin=stdin)
    line = assert_one_line_error(proc, *(n.replace("{file}", str(path)) for n in names))
    if case.startswith("prompt-") and "context" in case:
        assert re.search(r"the prompt is \d+ tokens", line), line
    assert snapshot(gguf_files.dir) == before


def test_llamacpp_generate_streams_with_the_files_context_and_no_llamacpp_noise(gguf_files):
    before = snapshot(gguf_files.dir)
    proc = run("llamacpp_generate.py", gguf_files.good, "--prompt", "ROMEO:", "--max-tokens", "8", "--seed", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.decode().startswith("ROMEO:")
    assert "n_ctx_seq" not in err and "llama_" not in err, err  # llama.cpp's log stays in the child
    lines = err.splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"\[llama.cpp: \d+ tokens in .*, prompt \d+ tokens, context {N_CTX}\]",
                                            lines[0]), err
    assert snapshot(gguf_files.dir) == before


# --------------------------------------------------------------------------- to_gguf


def _readonly_dir(tmp_path: Path) -> Path:
    """A directory no new file can be created in: a mode 0555 dir, or /sys where root ignores modes."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    for place in (ro, Path("/sys")):
        try:
            (place / ".atlas-probe").touch()
        except OSError:
            return place
        (place / ".atlas-probe").unlink()
    pytest.skip("no unwritable directory here (root, and /sys is writable)")


def _link_to_config(tmp_path: Path, run_dir: Path) -> Path:
    link = tmp_path / "link.gguf"
    link.symlink_to(run_dir / "config.yaml")
    return link


def _existing_file(tmp_path: Path, run_dir: Path) -> Path:
    other = tmp_path / "other.gguf"
    other.write_text("someone else's file\n")
    return other


# case -> (--out given (tmp_path, run dir), extra flags, substrings of the line); "--from-step-dir" (not a
# flag of to_gguf.py) exports from the run's checkpoints/<step> dir instead of the run dir
TO_GGUF_CASES = {
    "out-is-a-directory": (lambda t, r: t, [], ["--out", "is a directory"]),
    "out-in-readonly-dir": (lambda t, r: _readonly_dir(t) / "m.gguf", [], ["--out", "cannot write in"]),
    "out-parent-is-a-file": (lambda t, r: r / "config.yaml" / "m.gguf", [], ["--out", "is not a directory"]),
    "out-parent-missing": (lambda t, r: t / "no" / "such" / "m.gguf", [], ["--out", "does not exist"]),
    "out-is-run-tokenizer": (lambda t, r: r / "tokenizer.model", ["--force"], ["tokenizer.model", "never replaced"]),
    "out-is-run-config": (lambda t, r: r / "config.yaml", ["--force"], ["config.yaml", "never replaced"]),
    "out-is-run-metrics": (lambda t, r: r / "metrics.jsonl", ["--force"], ["metrics.jsonl", "never replaced"]),
    "out-is-run-config-from-a-step-dir": (lambda t, r: r / "config.yaml", ["--force", "--from-step-dir"],
                                          ["config.yaml", "never replaced"]),
    "out-inside-checkpoints": (lambda t, r: r / "checkpoints" / "1" / "model.gguf", ["--force"],
                               ["checkpoints", "never replaced"]),
    "out-is-run-non-gguf-named-gguf": (lambda t, r: r / "notes.gguf", ["--force"], ["notes.gguf", "not a GGUF file"]),
    "out-is-configs-external-tokenizer": (lambda t, r: r.parent / "tokenizers" / "shakespeare.model", ["--force"],
                                          ["shakespeare.model", "tokenizer"]),
    "out-links-to-run-config": (_link_to_config, ["--force"], ["link.gguf", "never replaced"]),
    "out-exists-without-force": (_existing_file, [], ["other.gguf", "--force"]),
    "calibration-windows-zero": (lambda t, r: t / "q.gguf", ["--type", "q4_0", "--calibration-windows", "0"],
                                 ["--calibration-windows 0"]),
    "calibration-windows-negative": (lambda t, r: t / "q.gguf", ["--type", "q4_0", "--calibration-windows", "-4"],
                                     ["--calibration-windows -4"]),
    "type-unknown": (lambda t, r: t / "q.gguf", ["--type", "q3_z"], ["--type", "q3_z"]),
}


@pytest.mark.parametrize("case", list(TO_GGUF_CASES))
def test_to_gguf_fault_is_one_line_and_changes_nothing(case, trained_run, tmp_path):
    out_of, flags, names = TO_GGUF_CASES[case]
    out = out_of(tmp_path, trained_run.dir)
    roots = (*trained_run.roots, tmp_path)
    before = snapshot(*roots)
    source = trained_run.step_dir if "--from-step-dir" in flags else trained_run.dir  # a checkpoints/<step> dir
    proc = run("to_gguf.py", source, "--out", out, *(f for f in flags if f != "--from-step-dir"))
    assert_one_line_error(proc, *names)
    assert snapshot(*roots) == before


def test_to_gguf_writes_then_replaces_only_with_force(trained_run, tmp_path):
    out = tmp_path / "m.gguf"
    run_files = snapshot(*trained_run.roots)
    proc = run("to_gguf.py", trained_run.dir, "--out", out)
    assert proc.returncode == 0 and proc.stdout.decode().startswith(f"wrote {out}"), proc.stderr.decode()
    assert gguf.GGUFReader(out).tensors
    first = out.read_bytes()
    again = run("to_gguf.py", trained_run.dir, "--out", out, "--name", "second")
    assert_one_line_error(again, str(out), "--force")
    assert out.read_bytes() == first
    forced = run("to_gguf.py", trained_run.dir, "--out", out, "--name", "second", "--force")
    assert forced.returncode == 0, forced.stderr.decode()
    assert out.read_bytes() != first  # general.name changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary or probe left
    assert snapshot(*trained_run.roots) == run_files
