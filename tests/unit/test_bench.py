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
    _positive(sec, ["peak_flops_bf16", "peak_flops_torch_bf16"], "train")  # the bf16 rows' own peaks
    bf16 = abs(fws["atlas_jax bf16"]["first_loss"] - fws["atlas_jax"]["first_loss"])  # beside torch_best_bf16
    assert bf16 < BF16_FIRST_LOSS_ATOL, f"train.atlas_jax bf16.first_loss differs from f32 by {bf16:.2e}"
    assert sec["torch_settings"] == TORCH_SETTINGS, sec["torch_settings"]
    assert "torch_best: attention=sdpa" in bench["md"], "the train table does not say how torch_best runs"


def test_decode_measures_atlas_and_llamacpp_at_both_batch_sizes(bench):
    sec = _ok(bench, "decode")
    fws = sec["frameworks"]
    assert {"atlas_jax", "llama.cpp f32", "llama.cpp q8_0"} <= set(fws), f"engines: {sorted(fws)}"
    for name, r in fws.items():
        assert "error" not in r, f"decode.{name}: {r.get('error')}"
        if "skipped" in r:  # llama.cpp's tools, not built on this machine: one line naming the build script
            assert name.startswith(("llama-bench ", "llama-batched-bench ")), f"decode.{name} skipped: {r['skipped']}"
            assert "scripts/build_llamacpp_tools.py" in r["skipped"] and "\n" not in r["skipped"], r["skipped"]
            continue
        _positive(r, ["peak_rss_mib"], f"decode.{name}")
        want = {"batch_1"} if name.startswith("llama-bench ") else {"batch_1", "batch_32"}  # llama-bench: batch 1
        assert set(r["results"]) == want, f"decode.{name}: {sorted(r['results'])}"
        for key, row in r["results"].items():
            _positive(row, ["prefill_tokens_per_s", "decode_tokens_per_s"], f"decode.{name}.{key}")
            if name != "atlas_jax":
                _positive(row, ["atlas_jax_decode_speedup"], f"decode.{name}.{key}")


def test_decode_without_the_llamacpp_tools_has_one_skipped_line_per_tool_and_still_measures_the_rest(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "scripts/bench.py", "decode", "--quick", "--batches", "1", "--ftypes", "f32",
                           "--llamacpp-tools", str(tmp_path), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench.py decode --quick exited {proc.returncode}: {proc.stderr[-3000:]}"
    fws = json.loads(out.read_text())["decode"]["frameworks"]
    for tool in ("llama-bench f32", "llama-batched-bench f32"):
        assert set(fws[tool]) == {"skipped"}, f"decode.{tool}: {fws[tool]}"
        assert "python scripts/build_llamacpp_tools.py" in fws[tool]["skipped"], fws[tool]["skipped"]
    for name in ("atlas_jax", "llama.cpp f32"):
        _positive(fws[name]["results"]["batch_1"], ["prefill_tokens_per_s", "decode_tokens_per_s"], f"decode.{name}")
    md = out.with_suffix(".md").read_text()
    assert f"| llama-bench f32 | skipped: llama.cpp tools not built in {tmp_path}" in md, md[-2000:]


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
        assert point.get("block", 0) > 0, f"longctx.{point['seq_len']}: no blocked block size recorded"
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


# Real output of the tools built by scripts/build_llamacpp_tools.py (llama-cpp-python 0.3.36's
# vendored llama.cpp) on the --quick tiny llama exported as q8_0, 2 threads, cut to a few fields:
#   llama-bench -m q8_0.gguf -p 16 -n 16 -r 2 -t 2 -o json --repack 0
#   llama-batched-bench -m q8_0.gguf -c 1024 -npp 16 -ntg 16 -npl 32,32 -t 2 -tb 2 --output-format jsonl --no-repack
LLAMA_BENCH_JSON = """[
  {
    "model_type": "llama ?B Q8_0",
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": -1,
    "repack": false,
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ns": 176837,
    "avg_ts": 91164.597871,
    "stddev_ts": 11184.237142,
    "samples_ns": [ 192178, 161497 ],
    "samples_ts": [ 83256.1, 99073 ]
  },
  {
    "model_type": "llama ?B Q8_0",
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": -1,
    "repack": false,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 0,
    "avg_ns": 880506,
    "avg_ts": 18231.571701,
    "stddev_ts": 1481.732928,
    "samples_ns": [ 931108, 829905 ],
    "samples_ts": [ 17183.8, 19279.3 ]
  }
]
"""
BATCHED_BENCH_OUT = """\
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 16, "pl": 32, "n_kv": 1024, "t_pp": 0.008591, "speed_pp": 59597.253906, "t_tg": 0.013154, "speed_tg": 38923.519531, "t": 0.021745, "speed": 47091.285156}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 16, "pl": 32, "n_kv": 1024, "t_pp": 0.004189, "speed_pp": 122224.875000, "t_tg": 0.011497, "speed_tg": 44533.355469, "t": 0.015686, "speed": 65281.144531}

0.00.008.437 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 8192
0.00.008.482 W llama_context: n_ctx_seq (256) > n_ctx_train (64) -- possible training context overflow
"""  # noqa: E501


def test_llama_bench_json_parser_finds_the_prompt_and_the_generation_test():
    from atlas_jax.bench.llamacpp_tools import parse_llama_bench_json

    tests = parse_llama_bench_json(LLAMA_BENCH_JSON)
    assert tests["pp"]["n_prompt"] == 16 and tests["pp"]["avg_ts"] == 91164.597871, tests["pp"]
    assert tests["tg"]["n_gen"] == 16 and tests["tg"]["avg_ts"] == 18231.571701, tests["tg"]
    assert tests["pp"]["type_k"] == "f16" and tests["tg"]["samples_ts"] == [17183.8, 19279.3]
    with pytest.raises(ValueError, match="expected a pp and a tg test"):
        parse_llama_bench_json("[]")


def test_batched_bench_jsonl_parser_reads_each_result_line_and_skips_the_log():
    from atlas_jax.bench.llamacpp_tools import parse_batched_bench_jsonl

    rows = parse_batched_bench_jsonl(BATCHED_BENCH_OUT)
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(16, 16, 32)] * 2, rows
    assert [r["speed_pp"] for r in rows] == [59597.253906, 122224.875], "S_PP"
    assert [r["speed_tg"] for r in rows] == [38923.519531, 44533.355469], "S_TG"
    with pytest.raises(ValueError, match="no result line"):  # what a run whose lines were lost gives
        parse_batched_bench_jsonl(BATCHED_BENCH_OUT.split("\n\n")[1])


def test_llamacpp_tool_rows_without_the_tools_are_one_skipped_line_naming_the_build_script(tmp_path):
    from atlas_jax.bench.llamacpp_tools import TOOLS, tool_rows

    rows = tool_rows(tmp_path, str(tmp_path / "m.gguf"), 16, 16, [1, 32], 1, 2)
    assert set(rows) == set(TOOLS), rows
    for tool, row in rows.items():
        assert set(row) == {"skipped"} and "python scripts/build_llamacpp_tools.py" in row["skipped"], (tool, row)
        assert str(tmp_path) in row["skipped"] and "\n" not in row["skipped"], row


def test_a_llamacpp_tool_run_reports_its_own_peak_rss_not_the_python_parents():
    import resource

    from atlas_jax.bench.llamacpp_tools import _run_tool

    rc, _, _, rss_mib = _run_tool(["sleep", "0.3"])
    parent_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # what wait4 would carry over
    assert rc == 0 and 0 < rss_mib < min(50, parent_mib / 2), f"sleep's peak RSS {rss_mib} MiB (parent {parent_mib})"
