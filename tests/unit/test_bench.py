"""scripts/bench.py --quick: every subcommand runs in a subprocess into one JSON file, which then holds
every expected figure, positive, and the markdown the tables. A smoke test of the machinery: it
asserts structure, never speed. The package's pieces (atlas_jax.bench) are tested directly where a
subprocess would prove less: pooling rounds, merging reports, `python -m atlas_jax.bench`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_jax.bench.report import MARK_BEGIN, MARK_END, write_outputs
from atlas_jax.bench.train import FRAMEWORKS, TORCH_SETTINGS, pool_rounds

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("train", "decode", "scaling", "longctx")
BF16_FIRST_LOSS_ATOL = 0.05  # torch_best_bf16's forward in bfloat16 (8 mantissa bits) against f32


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """Run the subcommands with --quick into one bench.json; their exit codes, stderr and the results."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    runs = {}
    for cmd in SUBCOMMANDS:
        proc = subprocess.run([sys.executable, "scripts/bench.py", cmd, "--quick", "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        runs[cmd] = proc
    data = json.loads(out.read_text()) if out.is_file() else {}
    md = out.with_suffix(".md")
    return {"runs": runs, "data": data, "md": md.read_text() if md.is_file() else "", "dir": tmp}


def _ok(bench, cmd) -> dict:
    proc = bench["runs"][cmd]
    assert proc.returncode == 0, f"bench.py {cmd} --quick exited {proc.returncode}: {proc.stderr[-3000:]}"
    assert cmd in bench["data"], f"bench.json has no '{cmd}' section"
    return bench["data"][cmd]


def _positive(d: dict, keys, where: str) -> None:
    for key in keys:
        assert isinstance(d.get(key), (int, float)) and d[key] > 0, f"{where}.{key} = {d.get(key)!r}, expected > 0"


def test_train_measures_every_framework_from_the_same_params(bench):
    sec = _ok(bench, "train")
    _positive(sec, ["flops_per_token", "peak_flops", "batch_size", "seq_len"], "train")
    fws = sec["frameworks"]
    assert set(FRAMEWORKS) <= set(fws), f"frameworks: {sorted(fws)}, expected {FRAMEWORKS} (the default list)"
    for name, r in fws.items():
        assert "error" not in r, f"train.{name}: {r.get('error')}"
        _positive(r, ["step_s_median", "tokens_per_s", "mfu", "peak_rss_mib", "compile_s"], f"train.{name}")
        assert len(r["step_s"]) == sec["steps"], f"train.{name}: {len(r['step_s'])} step times, expected {sec['steps']}"
    for name in TORCH_SETTINGS:
        _positive(fws[name], ["atlas_jax_speedup"], f"train.{name}")
        # The same initial params and batch: the loss before the first update agrees across frameworks
        # (bf16 autocast within bf16's rounding).
        diff = abs(fws[name]["first_loss"] - fws["atlas_jax"]["first_loss"])
        bar = BF16_FIRST_LOSS_ATOL if name.endswith("_bf16") else 1e-3
        assert diff < bar, f"train.{name}.first_loss differs from atlas_jax's by {diff:.2e} (bar {bar:g})"
    assert sec["torch_settings"] == TORCH_SETTINGS, sec["torch_settings"]
    assert "torch_best: attention=sdpa" in bench["md"], "the train table does not say how torch_best runs"


def test_decode_measures_atlas_and_llamacpp_at_both_batch_sizes(bench):
    sec = _ok(bench, "decode")
    fws = sec["frameworks"]
    assert {"atlas_jax", "llama.cpp f32", "llama.cpp q8_0"} <= set(fws), f"engines: {sorted(fws)}"
    for name, r in fws.items():
        assert "error" not in r, f"decode.{name}: {r.get('error')}"
        _positive(r, ["peak_rss_mib"], f"decode.{name}")
        assert set(r["results"]) == {"batch_1", "batch_32"}, f"decode.{name}: {sorted(r['results'])}"
        for key, row in r["results"].items():
            _positive(row, ["prefill_tokens_per_s", "decode_tokens_per_s"], f"decode.{name}.{key}")
            if name != "atlas_jax":
                _positive(row, ["atlas_jax_decode_speedup"], f"decode.{name}.{key}")


def test_scaling_covers_sequence_lengths_and_sizes_and_plots(bench):
    sec = _ok(bench, "scaling")
    assert len(sec["seq_len"]) >= 2 and len(sec["params"]) >= 2, "scaling needs at least two points per axis"
    for point in sec["seq_len"] + sec["params"]:
        where = f"scaling.{point.get('name') or point['seq_len']}"
        assert "skipped" not in point, f"{where}: skipped ({point.get('skipped')})"
        assert "error" not in point["atlas_jax"], f"{where}: {point['atlas_jax'].get('error')}"
        _positive(point["atlas_jax"], ["tokens_per_s", "mfu"], f"{where}.atlas_jax")
        _positive(point, ["params", "batch_size", "seq_len"], where)
    png = bench["dir"] / "scaling.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png}: no PNG written"


def test_longctx_measures_each_attention_at_each_sequence_length_and_plots(bench):
    sec = _ok(bench, "longctx")
    assert sec["attention"] == ["einsum", "blocked"], f"longctx.attention = {sec['attention']}"
    assert len(sec["points"]) >= 2, "longctx needs at least two sequence lengths"
    for point in sec["points"]:
        assert "skipped" not in point, f"longctx.{point['seq_len']}: skipped ({point.get('skipped')})"
        for impl in sec["attention"]:
            where = f"longctx.{point['seq_len']}.{impl}"
            assert "error" not in point[impl], f"{where}: {point[impl].get('error')}"
            _positive(point[impl], ["tokens_per_s", "peak_rss_mib", "attention_temp_bytes"], where)
    assert "### longctx" in bench["md"] and "blocked vs einsum" in bench["md"], "longctx table missing from the .md"
    png = bench["dir"] / "longctx.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png}: no PNG written"


def test_outputs_merge_into_one_json_and_markdown(bench):
    data, md = bench["data"], bench["md"]
    for key in ("cpu", "cores", "jax_backend", "device_kind"):
        assert data.get("machine", {}).get(key), f"machine.{key} missing"
    for key in ("jax", "jaxlib", "flax", "torch", "llama_cpp_python"):
        assert data.get("versions", {}).get(key), f"versions.{key} missing"
    for cmd in SUBCOMMANDS:
        if cmd in data:
            assert data[cmd]["command"].startswith(f"python scripts/bench.py {cmd} --quick"), data[cmd]["command"]
            assert f"`{data[cmd]['command']}`" in md, f"the markdown lacks the {cmd} command"
    assert md.count(MARK_BEGIN) == 1 and md.count(MARK_END) == 1


def test_pool_rounds_keeps_every_step_and_each_rounds_median_and_a_failure_stands_for_all():
    rounds = [{"step_s": [1.0, 3.0], "first_loss": 7.0}, {"step_s": [2.0, 4.0], "first_loss": 9.0}]
    pooled = pool_rounds(rounds)
    assert pooled["step_s"] == [1.0, 3.0, 2.0, 4.0], pooled["step_s"]
    assert pooled["round_medians"] == [2.0, 3.0], pooled["round_medians"]
    assert pooled["first_loss"] == 7.0, "the first round's fields should be kept"
    failed = pool_rounds([rounds[0], {"error": "boom"}])
    assert failed == {"error": "boom"}, f"a failed round should stand for all, got {failed}"


def test_write_outputs_merges_into_the_json_and_replaces_only_the_marked_block(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    out.write_text(json.dumps({"earlier": {"kept": True}}))
    md.write_text(f"# Benchmarks\n\nprose before\n\n{MARK_BEGIN}\nold table\n{MARK_END}\n\nprose after\n")
    row = {"bytes": 2**20, "max_abs": 0.01, "top1": 0.99, "ppl_llamacpp": 5.0, "ppl_atlas": 5.0, "greedy_match": True}
    for run in ("runs/a", "runs/b"):  # the same subcommand twice: the second run's section replaces the first
        section = {"checkpoint": run, "n_windows": 2, "command": f"python scripts/bench.py quality --checkpoint {run}",
                   "types": {"f32": row}}
        write_outputs("quality", section, out, md)
    data = json.loads(out.read_text())
    assert data["earlier"] == {"kept": True}, "a section of an earlier run was dropped from the JSON"
    assert data["quality"]["checkpoint"] == "runs/b" and data["machine"] and data["versions"], sorted(data)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n\n") and text.endswith("\n\nprose after\n"), text
    assert text.count(MARK_BEGIN) == 1 and text.count(MARK_END) == 1 and "old table" not in text, text
    assert "`python scripts/bench.py quality --checkpoint runs/b`" in text and "runs/a" not in text, text
    assert "| f32 | 1.00 | 0.01 | 99.00% | 5.000 | +0.00% | yes |" in text, text


def test_python_m_atlas_jax_bench_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "atlas_jax.bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"python -m atlas_jax.bench --help exited {proc.returncode}: {proc.stderr[-2000:]}"
    for cmd in ("train", "decode", "scaling", "longctx", "quality"):
        assert cmd in proc.stdout, f"--help does not list {cmd}: {proc.stdout}"


def test_cpu_utilisation_is_labelled_so_and_each_framework_has_its_own_matmul_peak():
    """On a CPU there is no data-sheet peak: the column is utilisation against an f32 matmul measured in
    the row's own framework (jnp.dot for atlas_jax, torch.mm for torch), and the table says which."""
    from atlas_jax.bench.common import CPU_UTIL, peak_flops
    from atlas_jax.bench.report import _md_train

    jax_peak, jax_src, label = peak_flops(quick=True)
    torch_peak, torch_src, torch_label = peak_flops(quick=True, framework="torch")
    assert label == torch_label == CPU_UTIL
    assert "jnp.dot 1024^3" in jax_src and "torch.mm 1024^3" in torch_src, (jax_src, torch_src)
    assert jax_peak > 0 and torch_peak > 0
    row = {"step_s_median": 0.1, "round_medians": [0.1], "tokens_per_s": 100.0, "mfu": 0.25, "peak_rss_mib": 1.0,
           "compile_s": 1.0, "first_loss": 7.0}
    tr = {"config": "configs/tiny.yaml", "command": "python scripts/bench.py train", "batch_size": 8, "seq_len": 64,
          "microbatches": 1, "steps": 3, "warmup": 1, "rounds": 1, "load_avg_start": [0], "load_avg_end": [0],
          "model": {"arch": "llama", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
                    "params": 1},
          "peak_flops": jax_peak, "peak_source": jax_src, "peak_flops_torch": torch_peak,
          "peak_source_torch": torch_src, "mfu_label": label,
          "frameworks": {"atlas_jax": row, "torch_eager": {**row, "mfu": 0.5}}}
    text = "\n".join(_md_train(tr))
    assert f"| {CPU_UTIL} |" in text and "| MFU |" not in text, text
    assert f"({jax_src}) for atlas_jax rows" in text and f"({torch_src}) for torch rows" in text, text


def test_moe_measures_dense_and_every_moe_impl_with_their_param_counts(tmp_path):
    """bench.py moe --quick: the dense twin (same active params) and grouped/ragged/dense dispatch, each
    with step time, tokens/s, peak RSS and param counts, in the JSON and the markdown table."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "scripts/bench.py", "moe", "--quick", "--steps", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench.py moe --quick exited {proc.returncode}: {proc.stderr[-3000:]}"
    mo = json.loads(out.read_text())["moe"]
    assert mo["moe_experts"] == 8 and mo["moe_experts_per_token"] == 2, mo
    names = list(mo["rows"])
    assert names[0].startswith("dense d_ff=") and names[1:] == ["moe grouped", "moe ragged", "moe dense"], names
    for name, r in mo["rows"].items():
        assert "error" not in r, (name, r)
        _positive(r, ("step_s_median", "tokens_per_s", "peak_rss_mib", "params_total", "params_active"), name)
    dense, moe = mo["rows"][names[0]], mo["rows"]["moe grouped"]
    # The dense twin matches the MoE's active params to within one d_ff column per layer (3 * d_model each).
    assert abs(dense["params_active"] - moe["params_active"]) <= 3 * mo["d_model"] * mo["n_layers"], (dense, moe)
    assert moe["params_total"] > moe["params_active"] == mo["rows"]["moe dense"]["params_active"], moe
    md = out.with_suffix(".md").read_text()
    assert "### moe:" in md and "| moe ragged |" in md, md


def test_moe_on_a_dense_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/bench.py", "moe", "--quick", "model.moe_experts=0",
                           "--out", str(tmp_path / "bench.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.moe_experts" in lines[0], proc.stderr
