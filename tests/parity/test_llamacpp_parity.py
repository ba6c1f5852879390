"""Real llama.cpp (llama-cpp-python) runs our GGUF files as Atlas runs the params.

Logits on 48-token prompts with an f32 KV cache, for llama (MHA, GQA) and gpt2, tied and untied
heads, every export type; llama.cpp's tokenizer against sentencepiece; greedy generation. llama.cpp
runs in child processes (atlas_jax.export.llamacpp), so a native crash fails one test with the signal
named instead of ending the session. A briefly trained run (or the run ATLAS_GGUF_RUN_DIR names,
e.g. runs/shakespeare) is held to the trained-model bar too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from atlas_jax.config import ModelConfig, SampleConfig, resolve_model
from atlas_jax.export.gguf import export_gguf
from atlas_jax.export.llamacpp import (
    LlamaCppError,
    llamacpp_generate,
    llamacpp_logits,
    llamacpp_tokenize,
    run_in_child,
)
from atlas_jax.export.quality import atlas_logits
from atlas_jax.model import init_params

import llama_cpp  # noqa: E402,F401  (part of the test install: a missing llama.cpp is a failure, not a skip)

PROMPT_TOKENS = 48
# name -> ModelConfig fields (vocab_size comes from the tokenizer fixture)
CASES = {
    "llama-mha-tied": dict(arch="llama", n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "llama-mha-untied": dict(arch="llama", n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "llama-gqa-tied": dict(arch="llama", n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "llama-gqa-untied": dict(arch="llama", n_heads=4, n_kv_heads=1, tie_embeddings=False),
    "gpt2-tied": dict(arch="gpt2", n_heads=4, tie_embeddings=True),
    "gpt2-untied": dict(arch="gpt2", n_heads=4, tie_embeddings=False),
    # d_model 80: rows of 80 do not split into 32-blocks, so q8_0/q4_0 files mix in the f16 fallback
    "llama-d80-untied": dict(arch="llama", d_model=80, n_heads=4, n_kv_heads=2, tie_embeddings=False),
    # K-quants quantize rows in 256-blocks: d_model and d_ff multiples of 256
    "llama-d256-untied": dict(arch="llama", d_model=256, d_ff=512, n_heads=4, n_kv_heads=2, tie_embeddings=False),
}
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
        "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n")


def random_params(cfg: ModelConfig, seed: int, peaked: bool):
    """Random weights whose logits are informative (Atlas' 0.02 init gives near-uniform logits, where
    top-1 only measures ties): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²),
    embeddings N(0, 0.25²): logits have std ~1-2. peaked: embeddings N(0, 1), output projections
    (wo, w_down) at 0.7 of the above and an untied head equal to the embedding's transpose plus
    N(0, 0.5²), so the top token has probability ~0.95 as at a trained model's confident positions;
    quantized top-1 checks use these."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        if "kernel" in name:
            gain = 0.7 if peaked and ("'wo'" in name or "'w_down'" in name) else 1.0
            return noise * np.float32(gain / np.sqrt(x.shape[0]))
        if "embedding" in name:
            return noise if peaked else 0.25 * noise
        if "scale" in name:
            return 1.0 + 0.1 * noise
        return 0.1 * noise  # biases

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    if peaked and not cfg.tie_embeddings:
        noise = rng.standard_normal((cfg.d_model, cfg.vocab_size), dtype=np.float32)
        params["lm_head"]["kernel"] = params["embed"]["embedding"].T + 0.5 * noise
    return params


@pytest.fixture(scope="module")
def prompts(shakespeare_tokenizer) -> np.ndarray:
    """4 prompts of 48 tokens [4, 48]; the first starts with BOS, the others mid-text."""
    ids = [shakespeare_tokenizer.bos_id] + shakespeare_tokenizer.encode(TEXT * 4)
    assert len(ids) >= 4 * PROMPT_TOKENS
    return np.asarray(ids[:4 * PROMPT_TOKENS], np.int32).reshape(4, PROMPT_TOKENS)


@pytest.fixture(scope="module")
def model(shakespeare_tokenizer):
    """model(case, peaked) -> (cfg, params), built once per module."""
    built = {}

    def get(case: str, peaked: bool = False):
        if (case, peaked) not in built:
            fields = {"d_model": 64, "n_layers": 2, "max_seq_len": 64, **CASES[case]}
            cfg = resolve_model(ModelConfig(vocab_size=shakespeare_tokenizer.vocab_size, **fields))
            built[case, peaked] = cfg, random_params(cfg, seed=list(CASES).index(case), peaked=peaked)
        return built[case, peaked]

    return get


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, str]:
    """(max |Δ|, top-1 agreement, where the largest Δ is) for logits [..., T, V]."""
    diff = np.abs(got - ref)
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    return float(diff.max()), float(np.mean(got.argmax(-1) == ref.argmax(-1))), \
        f"position {where[-2]}, token {where[-1]}" + (f" of prompt {where[0]}" if diff.ndim == 3 else "")


def export_and_compare(model, case, prompts, tmp_path, tokenizer, ftype="f32", peaked=False, n_prompts=1,
                       write_output_for_tied=False):
    cfg, params = model(case, peaked)
    path = export_gguf(params, cfg, tokenizer.path, tmp_path / f"{case}-{ftype}.gguf", ftype,
                       write_output_for_tied=write_output_for_tied)
    windows = prompts[:n_prompts]
    ref = atlas_logits(params, cfg, windows)
    got = np.stack(llamacpp_logits(path, [w.tolist() for w in windows]))
    return path, got, ref


# --------------------------------------------------------------------------- f32: exact


@pytest.mark.parametrize("case,write_output", [
    ("llama-mha-tied", False), ("llama-mha-tied", True), ("llama-mha-untied", False),
    ("llama-gqa-tied", False), ("llama-gqa-untied", False)])
def test_llama_f32_logits_match_atlas(model, prompts, tmp_path, shakespeare_tokenizer, observe, case, write_output):
    # Adjacent-pair RoPE with Q/K rows written as they are: llama.cpp's NORM rope agrees to f32 rounding.
    _, got, ref = export_and_compare(model, case, prompts, tmp_path, shakespeare_tokenizer,
                                     write_output_for_tied=write_output)
    max_abs, top1, where = compare(got, ref)
    observe("llama.cpp llama f32 max|dlogit|", max_abs)
    assert max_abs <= 1e-4, f"{case}: llama.cpp logits differ from Atlas by {max_abs:.3g} at {where}"
    assert top1 == 1.0


@pytest.mark.parametrize("case,write_output", [("gpt2-tied", False), ("gpt2-tied", True), ("gpt2-untied", False)])
def test_gpt2_f32_logits_match_atlas(model, prompts, tmp_path, shakespeare_tokenizer, observe, case, write_output):
    # Looser than llama: llama.cpp's CPU GELU reads an fp16 lookup table.
    _, got, ref = export_and_compare(model, case, prompts, tmp_path, shakespeare_tokenizer,
                                     write_output_for_tied=write_output)
    max_abs, top1, where = compare(got, ref)
    observe("llama.cpp gpt2 f32 max|dlogit|", max_abs)
    assert max_abs <= 5e-3, f"{case}: llama.cpp logits differ from Atlas by {max_abs:.3g} at {where}"
    assert top1 == 1.0, f"{case}: top-1 differs at {np.argwhere(got.argmax(-1) != ref.argmax(-1))[:3].tolist()}"


def test_gpt2_gap_is_llamacpps_fp16_gelu_table(model, prompts, tmp_path, shakespeare_tokenizer, monkeypatch, observe):
    # ggml's CPU GELU rounds x to fp16 and reads gelu(x) from an fp16 table. Atlas with that table
    # swapped in is much closer to llama.cpp than plain Atlas (what is left: inputs sitting on an fp16
    # rounding boundary, flipped by f32 rounding differences upstream).
    from atlas_jax.model import Transformer

    cfg, params = model("gpt2-untied")
    path, got, ref = export_and_compare(model, "gpt2-untied", prompts, tmp_path, shakespeare_tokenizer, n_prompts=4)
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        table = (0.5 * h * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * h * (1 + np.float32(0.044715) * h * h))))
    table = jax.numpy.asarray(table.astype(np.float16).astype(np.float32))

    def ggml_gelu(x, approximate=True):
        y = table[jax.lax.bitcast_convert_type(x.astype(np.float16), np.uint16).astype(np.int32)]
        return jax.numpy.where(x <= -10, 0.0, jax.numpy.where(x >= 10, x, y)).astype(x.dtype)

    monkeypatch.setattr(jax.nn, "gelu", ggml_gelu)
    emulated = np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, prompts[:4]))
    plain_mean, emulated_mean = np.abs(got - ref).mean(), np.abs(got - emulated).mean()
    observe("llama.cpp gpt2 f32 mean|dlogit| vs Atlas", plain_mean)
    observe("llama.cpp gpt2 f32 mean|dlogit| vs Atlas with ggml's GELU table", emulated_mean)
    assert emulated_mean <= 0.2 * plain_mean, (plain_mean, emulated_mean)
    assert np.abs(got - emulated).max() <= 2e-3


# --------------------------------------------------------------------------- f16 / bf16


@pytest.mark.parametrize("ftype,tol", [("f16", 2e-2), ("bf16", 1e-1)])
@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2-tied"])
def test_half_precision_logits_stay_close(model, prompts, tmp_path, shakespeare_tokenizer, observe, case, ftype, tol):
    _, got, ref = export_and_compare(model, case, prompts, tmp_path, shakespeare_tokenizer, ftype)
    max_abs, top1, where = compare(got, ref)
    observe(f"llama.cpp {ftype} max|dlogit|", max_abs)
    assert max_abs <= tol, f"{case} {ftype}: llama.cpp logits differ from Atlas by {max_abs:.3g} at {where}"


# --------------------------------------------------------------------------- quantized


def _ppl(logits: np.ndarray, tokens: np.ndarray) -> float:
    x = logits[:, :-1].astype(np.float64)
    logp = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))
    return float(np.exp(-np.mean(np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1))))


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("case", ["llama-gqa-tied", "llama-mha-untied", "gpt2-tied", "gpt2-untied", "llama-d80-untied"])
def test_quantized_top1_agrees_with_atlas(model, prompts, tmp_path, shakespeare_tokenizer, observe, case, ftype):
    path, got, ref = export_and_compare(model, case, prompts, tmp_path, shakespeare_tokenizer, ftype, peaked=True,
                                        n_prompts=4)
    max_abs, top1, where = compare(got, ref)
    observe(f"llama.cpp {ftype} top-1 disagreement (random, peaked)", 1 - top1)
    observe(f"llama.cpp {ftype} ppl change % (random, peaked)", 100 * abs(_ppl(got, prompts) / _ppl(ref, prompts) - 1))
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors}
    assert ftype.upper() in types, types
    assert top1 >= 0.95, (f"{case} {ftype}: top-1 agrees at {top1:.1%} of {got.shape[0] * got.shape[1]} positions "
                          f"(max |dlogit| {max_abs:.3g} at {where})")


@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k"])
def test_llamacpp_kquants_top1_agrees_with_atlas(model, prompts, tmp_path, shakespeare_tokenizer, observe, ftype):
    # export f32, then llama.cpp's quantizer; d_model/d_ff are multiples of 256 so K blocks apply.
    path, got, ref = export_and_compare(model, "llama-d256-untied", prompts, tmp_path, shakespeare_tokenizer, ftype,
                                        peaked=True, n_prompts=4)
    max_abs, top1, where = compare(got, ref)
    observe(f"llama.cpp {ftype} top-1 disagreement (random, peaked)", 1 - top1)
    reader = gguf.GGUFReader(path)
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}[ftype.upper()] in types, types
    file_type = reader.fields[gguf.Keys.General.FILE_TYPE]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType[f"MOSTLY_{ftype.upper()}"]
    assert top1 >= 0.95, f"{ftype}: top-1 agrees at {top1:.1%} (max |dlogit| {max_abs:.3g} at {where})"


# --------------------------------------------------------------------------- tokenizer, generation


TOKENIZER_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "a    b", "   leading", "trailing   ", " ", "  ", "\t", "tab\tseparated\tvalues", "\n", "\n\n\nlines\n",
    "\r\n", "0123456789", "3.14159 + 2,718 = 5.85959", "2024-01-02T03:04:05Z",
    "😀", "emoji 👩‍💻 zwj", "日本語のテキスト", "中文 和 English", "한국어", "é e\u0301 ﬁ",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return c[i] >> 2; }",
    "\u2581", "x\u2581y", "<s> </s> <unk>", "<0x0A>", "",
]


def test_llamacpp_tokenizes_like_sentencepiece(model, tmp_path, shakespeare_tokenizer):
    cfg, params = model("llama-gqa-tied")
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "tok.gguf")
    got = llamacpp_tokenize(path, TOKENIZER_TEXTS)
    sp = shakespeare_tokenizer.sp
    for text, ids in zip(TOKENIZER_TEXTS, got):
        want = shakespeare_tokenizer.encode(text)
        assert ids == want, (f"{text!r}: llama.cpp {[sp.id_to_piece(i) for i in ids]} "
                             f"vs sentencepiece {[sp.id_to_piece(i) for i in want]}")


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2-untied"])
def test_greedy_generation_matches_atlas(model, prompts, tmp_path, shakespeare_tokenizer, case):
    from atlas_jax.sample import generate

    cfg, params = model(case)
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / f"{case}.gguf")
    prompt = prompts[0, :12].tolist()
    toks, lengths = generate(params, [prompt], jax.random.key(0), SampleConfig(temperature=0.0, max_new_tokens=24),
                             cfg)
    want = np.asarray(toks)[0, :int(lengths[0])].tolist()
    got = llamacpp_generate(path, prompt, 24, greedy=True)
    assert got == want, f"{case}: llama.cpp greedy {got} vs Atlas {want}"
    # text prompts are tokenized by llama.cpp with no BOS (add_bos_token false: Atlas trains without BOS)
    text = "First Citizen:\nBefore"
    assert llamacpp_generate(path, text, 8) == llamacpp_generate(path, shakespeare_tokenizer.encode(text), 8)


# --------------------------------------------------------------------------- crash isolation


def test_models_load_without_extra_buffer_types(model, tmp_path, shakespeare_tokenizer, monkeypatch):
    # The AMX workaround: use_extra_bufts off in the params the model was really loaded with.
    cfg, params = model("llama-gqa-tied")
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "q.gguf", "q4_0")
    (tmp_path / "probe_bufts.py").write_text(textwrap.dedent("""
        from atlas_jax.export.llamacpp import open_llama
        def flag(path):
            llm = open_llama(path, n_ctx=16)
            llm.eval([1, 2, 3])
            return bool(llm.model_params.use_extra_bufts)
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert run_in_child("probe_bufts:flag", path=str(path)) is False


def test_native_crash_is_an_error_not_a_dead_session(tmp_path, monkeypatch):
    (tmp_path / "crashing_job.py").write_text("import os, signal\ndef crash(path):\n"
                                              "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(LlamaCppError, match=r"crashed \(SIGSEGV\).*model\.gguf"):
        run_in_child("crashing_job:crash", path="model.gguf")


def test_tokens_past_the_context_are_refused_before_llamacpp_aborts(model, tmp_path, shakespeare_tokenizer):
    # llama.cpp's gpt2 graph reads position rows past context_length and aborts (GGML_ASSERT).
    cfg, params = model("gpt2-tied")
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "m.gguf")
    with pytest.raises(LlamaCppError, match=f"do not fit the model's context_length {cfg.max_seq_len}"):
        llamacpp_logits(path, [5] * (cfg.max_seq_len + 1))


def test_unreadable_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LlamaCppError, match="bad.gguf") as e:
        llamacpp_logits(bad, [1, 2, 3])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_data_dir, shakespeare_tokenizer):
    """ATLAS_GGUF_RUN_DIR, or a llama model trained here for 300 steps on tinyshakespeare (~30 s)."""
    if os.environ.get("ATLAS_GGUF_RUN_DIR"):
        return Path(os.environ["ATLAS_GGUF_RUN_DIR"])

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_jax.train", "--config", "configs/tiny.yaml", "--no-progress", "--no-samples",
         f"train.run_dir={run_dir}", f"data.data_dir={shakespeare_data_dir}",
         f"data.tokenizer={shakespeare_tokenizer.path}", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
         "train.steps=300", "train.batch_size=16", "train.warmup_steps=20", "train.lr=3e-3", "train.eval_interval=300",
         "train.checkpoint_interval=300", "train.log_interval=100"],
        cwd=repo, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_trained_run_matches_llamacpp(trained_run, tmp_path):
    """Through `scripts/bench.py quality` (compare_run_with_llamacpp), the tool docs/benchmarks.md is made with."""
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "quality", "--checkpoint", str(trained_run),
                           "--ftypes", "f32,f16,q8_0,q4_0,q4_0-rtn", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())["quality"]["types"]
    assert "| q4_0-rtn |" in out.with_suffix(".md").read_text()
    lines = [f"{t:>7}: {r['bytes'] / 2**20:7.2f} MiB  max|dlogit| {r['max_abs']:.3g}  top-1 {r['top1']:.2%}  "
             f"ppl {r['ppl_llamacpp']:.3f} (Atlas {r['ppl_atlas']:.3f})  greedy {'=' if r['greedy_match'] else '!='}"
             for t, r in report.items()]
    summary = "\n".join(lines)
    print("\n" + summary)
    assert report["f32"]["max_abs"] <= 1e-4, summary
    assert report["f32"]["greedy_match"], "llama.cpp's greedy 32 tokens differ from Atlas' (f32)\n" + summary
    assert report["f16"]["max_abs"] <= 2e-2, summary
    assert report["q8_0"]["top1"] >= 0.98, summary
    # q4_0: the top-1 >= 0.98 is not reached by models this small (0.90-0.96 measured, see the
    # issue note); what is held here is its cost in perplexity, measured in llama.cpp, and that GPTQ
    # calibrated on the train split ("q4_0") costs less than rounding each weight ("q4_0-rtn").
    ppl_change = report["q4_0"]["ppl_llamacpp"] / report["f32"]["ppl_llamacpp"] - 1
    assert ppl_change <= 0.03, f"q4_0 costs {ppl_change:.2%} perplexity\n" + summary
    assert report["q4_0"]["ppl_llamacpp"] < report["q4_0-rtn"]["ppl_llamacpp"], summary
    assert report["q4_0"]["bytes"] == report["q4_0-rtn"]["bytes"], summary


def test_cli_q4_0_is_calibrated_on_the_train_split_and_runs_in_llamacpp(trained_run, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = {}
    for flag in ([], ["--no-calibrate"]):
        path = tmp_path / f"q4{'-rtn' if flag else ''}.gguf"
        proc = subprocess.run([sys.executable, "scripts/to_gguf.py", str(trained_run), "--out", str(path),
                               "--type", "q4_0", "--calibration-windows", "8", *flag],
                              cwd=repo, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("GPTQ on 8 train windows" in proc.stdout) == (not flag), proc.stdout
        out[bool(flag)] = path
    calibrated, plain = (gguf.GGUFReader(out[k]) for k in (False, True))
    names = [t.name for t in calibrated.tensors]
    assert names == [t.name for t in plain.tensors]
    q4 = [t for t in calibrated.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert q4, "no Q4_0 tensor in the q4_0 file"
    by_name = {t.name: t for t in plain.tensors}
    assert any(not np.array_equal(t.data, by_name[t.name].data) for t in q4), "GPTQ wrote the plain rounding"
    got = np.stack(llamacpp_logits(out[False], [[5, 6, 7, 8]]))
    assert got.shape[:2] == (1, 4) and np.isfinite(got).all()
