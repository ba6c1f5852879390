"""atlas_jax.sample and the atlas_jax.generate command: what a batch, a seed, EOS and the cache promise."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import sample
from atlas_jax.config import Config, DataConfig, ModelConfig, SampleConfig, resolve, resolve_model
from atlas_jax.errors import AtlasError, ConfigError
from atlas_jax.model import init_params

REPO = Path(__file__).resolve().parents[2]

# A tiny llama with grouped-query attention (4 query heads read 2 kv heads).
CFG = resolve_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
# Sampling with every filter on, so the equivalence tests cover the whole sampling path.
SAMPLING = SampleConfig(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=12)
PROMPTS = [[5, 9, 2], list(range(1, 10)), list(range(30, 50))]  # lengths 3, 9, 20: buckets 16, 16, 32


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> dict:
    """Numpy params with O(1) logits, drawn without compiling flax's init (seconds on a small CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        return (np.ones(s.shape) if path[-1].key == "scale" else rng.normal(0, std, s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _row_key(key, b: int):
    """The [1] key that `generate` derives for row b of a batch drawn with `key`."""
    return jax.random.fold_in(key, b)[None]


def _generate(params, prompts, key, cfg=SAMPLING, **kw):
    tokens, lengths = sample.generate(params, prompts, key, cfg, CFG, **kw)
    return np.asarray(tokens), np.asarray(lengths)


def test_batched_rows_equal_each_prompt_alone(params):
    """Left padding (positions -1) and the batch around a row change none of its tokens."""
    key = jax.random.key(7)
    tokens, lengths = _generate(params, PROMPTS, key)
    assert tokens.shape == (3, SAMPLING.max_new_tokens)
    for b, prompt in enumerate(PROMPTS):
        alone, alone_len = _generate(params, [prompt], _row_key(key, b))
        np.testing.assert_array_equal(tokens[b], alone[0], err_msg=f"row {b} (prompt length {len(prompt)})")
        assert lengths[b] == alone_len[0] == SAMPLING.max_new_tokens


def test_fixed_seed_reproduces_and_another_seed_differs(params):
    a, _ = _generate(params, PROMPTS, jax.random.key(7))
    b, _ = _generate(params, PROMPTS, jax.random.key(7))
    c, _ = _generate(params, PROMPTS, jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    same_prompt, _ = _generate(params, [PROMPTS[2]] * 3, jax.random.key(7))  # shapes as above: no compile
    assert len({tuple(row) for row in same_prompt}) == 3, f"one key drew the same rows (per-row keys?): {same_prompt}"


EOS_KEY = 3
PAD = 63


def _eos_case(params) -> tuple[int, np.ndarray]:
    """An EOS id that row 0 first emits at step 3 when nothing stops it, and the unstopped tokens."""
    free, _ = _generate(params, PROMPTS, jax.random.key(EOS_KEY))
    eos = int(free[0, 3])
    assert eos not in free[0, :3] and eos != PAD, f"pick another EOS_KEY: row 0 is {free[0]}"
    return eos, free


def test_eos_stops_its_row_only(params):
    eos, free = _eos_case(params)
    tokens, lengths = _generate(params, PROMPTS, jax.random.key(EOS_KEY), eos_id=eos, pad_id=PAD)
    assert tokens.shape == (3, SAMPLING.max_new_tokens)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(free[b] == eos)
        n = hits[0] + 1 if hits.size else SAMPLING.max_new_tokens  # EOS is the row's last token
        assert lengths[b] == n, f"row {b}: length {lengths[b]}, expected {n}"
        np.testing.assert_array_equal(tokens[b, :n], free[b, :n], err_msg=f"row {b} before its EOS")
        assert (tokens[b, n:] == PAD).all(), f"row {b} emits {tokens[b, n:]} after EOS, expected pad {PAD}"
    assert lengths[0] == 4 and lengths.max() > 4


def test_stream_yields_the_tokens_of_generate_and_stops_at_eos_or_max_new_tokens(params):
    """Row 0 streamed alone (its own key, bucket 16) == row 0 of the batched generate (bucket 32)."""
    eos, _ = _eos_case(params)
    tokens, lengths = _generate(params, PROMPTS, jax.random.key(EOS_KEY), eos_id=eos, pad_id=PAD)
    def run(cfg):
        return list(sample.stream(params, PROMPTS[:1], _row_key(jax.random.key(EOS_KEY), 0), cfg, CFG,
                                  eos_id=eos, pad_id=PAD))

    steps = run(SAMPLING)
    assert len(steps) == lengths[0] == 4, f"stream ran {len(steps)} steps; its only row stopped after {lengths[0]}"
    np.testing.assert_array_equal([t[0] for t, _ in steps], tokens[0, :4])
    assert all(a[0] for _, a in steps)
    # max_new_tokens=3 ends it first: a prefix (and the same cache length, so nothing compiles).
    steps = run(dataclasses.replace(SAMPLING, max_new_tokens=3))
    np.testing.assert_array_equal([t[0] for t, _ in steps], tokens[0, :3])


def test_a_new_prompt_length_in_the_same_bucket_does_not_recompile(params):
    compiled = sample.generate_padded._cache_size
    run = lambda n: _generate(params, [list(range(1, n + 1))], _row_key(jax.random.key(0), 0))  # noqa: E731
    for bucket_lengths in [(3, 1, 7, 12, 16), (20, 17, 31)]:  # buckets 16 and 32
        before = compiled()
        for n in bucket_lengths:
            tokens, lengths = run(n)
            assert tokens.shape == (1, SAMPLING.max_new_tokens) and lengths[0] == SAMPLING.max_new_tokens
        assert compiled() <= before + 1, f"prompt lengths {bucket_lengths} compiled {compiled() - before} times"
    assert compiled() >= 2  # the counter counts: these shapes are compiled, here or before


def test_buckets_and_cache_lengths():
    assert [sample.prompt_bucket(n, 1024) for n in (1, 16, 17, 33, 100, 600, 1000)] == [16, 16, 32, 64, 128, 1024, 1024]
    assert sample.prompt_bucket(200, 256) == 256 and sample.prompt_bucket(5, 8) == 8
    assert sample.cache_length(16, 12) == 64 and sample.cache_length(64, 1) == 128


def test_errors_name_the_lengths_and_the_fix(params):
    with pytest.raises(AtlasError, match=r"prompt of 60 token\(s\) \+ max_new_tokens=12 = 72 exceeds the model's "
                                         r"max_seq_len=64; lower max_new_tokens .* to at most 4"):
        sample.generate(params, [[1], list(range(60))], jax.random.key(0), SAMPLING, CFG)
    with pytest.raises(AtlasError, match="shorten the prompt to at most 52 tokens"):
        sample.generate(params, [list(range(64))], jax.random.key(0), SAMPLING, CFG)
    with pytest.raises(AtlasError, match="prompt 1 is empty"):
        sample.stream(params, [[1], []], jax.random.key(0), SAMPLING, CFG)  # raises before the first step
    with pytest.raises(AtlasError, match="token id 64, outside the model's vocabulary"):
        sample.generate(params, [[1, 64]], jax.random.key(0), SAMPLING, CFG)
    with pytest.raises(AtlasError, match="one PRNG key or 2 keys"):
        sample.generate(params, [[1], [2]], jax.random.split(jax.random.key(0), 3), SAMPLING, CFG)
    for bad, field in [(dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                       (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ConfigError, match=f"sample.{field}"):
            sample.generate(params, [[1]], jax.random.key(0), dataclasses.replace(SAMPLING, **bad), CFG)


def test_streaming_runs_10x_max_seq_len_with_a_fixed_cache():
    """sample.window: 10 x max_seq_len new tokens from a cache of window slots; until the cache fills
    the tokens are those of plain generation, and `stream` draws what `generate` does."""
    model = dataclasses.replace(CFG, max_seq_len=16)
    params, prompts = random_params(model), PROMPTS[:2]
    window, n = 12, 10 * model.max_seq_len
    cfg = dataclasses.replace(SAMPLING, window=window, n_sink=2, max_new_tokens=n)
    key = jax.random.key(3)
    tokens, lengths = (np.asarray(a) for a in sample.generate(params, prompts, key, cfg, model))
    assert tokens.shape == (2, n) and list(lengths) == [n, n]
    first = window - len(prompts[1])  # row 1 fills its cache first: its prompt is longer
    plain, _ = sample.generate(params, prompts, key, dataclasses.replace(SAMPLING, max_new_tokens=first), model)
    assert np.array_equal(tokens[:, :first], plain), "streaming changed tokens before the cache filled"
    streamed = np.stack([t for t, _ in sample.stream(params, prompts, key, cfg, model)], axis=1)
    assert np.array_equal(streamed, tokens)
    p = sample._prepare(prompts, key, cfg, model, None, None)
    carry, logits = sample._prefill_jit(params, p.tokens_BxP, p.positions_BxP, p.key, p.model, p.plan)
    shapes = jax.tree.map(np.shape, carry.cache)
    assert shapes["pos"] == (2, window)
    for step in range(2 * window):
        carry, logits, _, _ = sample._step_jit(params, carry, logits, np.int32(step), p.model, p.plan)
    assert jax.tree.map(np.shape, carry.cache) == shapes


def test_streaming_errors_are_one_line_with_the_fix(params):
    for bad, message in [(dict(window=4, n_sink=4), r"sample.n_sink=4 leaves no rolling window in sample.window=4"),
                         (dict(window=65), r"sample.window=65 is longer than model.max_seq_len=64"),
                         (dict(window=-1), r"sample.window must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            sample.generate(params, [[1]], jax.random.key(0), dataclasses.replace(SAMPLING, **bad), CFG)
    with pytest.raises(AtlasError, match=r"prompt of 20 token\(s\) is longer than sample.window=16"):
        sample.generate(params, [PROMPTS[2]], jax.random.key(0), dataclasses.replace(SAMPLING, window=16), CFG)
    gpt2 = resolve_model(ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64))
    with pytest.raises(ConfigError, match="sample.window with model.positions=learned: a cached key cannot move"):
        sample.generate(None, [[1]], jax.random.key(0), dataclasses.replace(SAMPLING, window=16), gpt2)


# --------------------------------------------------------------------------- filters

# Many rows of small integer logits: plenty of exact ties, at the cut-off too.
_ROWS = np.random.default_rng(0).integers(-4, 4, size=(4000, 12)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_top_k_keeps_every_token_at_or_above_the_kth_value(k):
    kept = np.isfinite(np.asarray(jax.jit(sample.top_k_filter, static_argnums=1)(_ROWS, k)))
    kth = -np.sort(-_ROWS, axis=1)[:, k - 1:k]
    np.testing.assert_array_equal(kept, _ROWS >= kth)
    assert (kept.sum(1) >= k).all() and (kept.sum(1) > k).any(), "the rows exercise ties at the cut-off"
    np.testing.assert_array_equal(np.asarray(sample.top_k_filter(_ROWS, 0)), _ROWS)  # 0 disables


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_keeps_the_smallest_value_closed_set_reaching_p(p):
    out = np.asarray(jax.jit(sample.top_p_filter)(_ROWS, jnp.float32(p)))
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], _ROWS[kept])
    probs = np.exp(_ROWS - _ROWS.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cutoff = np.where(kept, _ROWS, np.inf).min(1, keepdims=True)
    np.testing.assert_array_equal(kept, _ROWS >= cutoff)  # ties with the cut-off are kept
    mass = (probs * kept).sum(1)
    above = (probs * (_ROWS > cutoff)).sum(1)  # without the cut-off's tie class
    clear = np.abs(above - p) > 1e-5  # rows whose decision float rounding cannot flip
    assert (mass >= p - 1e-6).all(), f"a kept set holds only {mass.min()} < p={p}"
    assert (above[clear] < p).all(), "a kept set is larger than it needs to be"


def test_top_p_leaves_top_k_removals_out():
    logits = jnp.array([[3.0, 2.0, 1.0, 0.0, -1.0]])
    out = sample.top_p_filter(sample.top_k_filter(logits, 2), 0.999)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[True, True, False, False, False]])


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shakespeare_tokenizer):
    """A run directory with a random tiny llama checkpoint and the shakespeare tokenizer."""
    from atlas_jax import checkpoint
    from atlas_jax.optim import make_optimizer

    cfg = resolve(Config(
        model=dataclasses.replace(CFG, vocab_size=shakespeare_tokenizer.vocab_size),
        data=DataConfig(seq_len=64), sample=SampleConfig(max_new_tokens=8, temperature=0.8, seed=3)))
    params = random_params(cfg.model)
    state = {"params": params, "opt_state": jax.jit(make_optimizer(cfg.train).init)(params),
             "step": np.int32(1), "rng": jax.random.key_data(jax.random.key(0)), "bad_steps": np.int32(0)}
    run_dir = tmp_path_factory.mktemp("tiny_run")
    checkpoint.save(checkpoint.make_manager(run_dir, keep=1), state, {}, cfg)
    shutil.copy(shakespeare_tokenizer.path, run_dir / "tokenizer.model")
    return run_dir


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "atlas_jax.generate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _cli_in_process(argv: list[str], monkeypatch, capsys, stdin: str = "") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m atlas_jax.generate ARGV`, run here through run_cli."""
    from atlas_jax.errors import run_cli
    from atlas_jax.generate import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_jsonl_in_a_subprocess_and_streaming_print_the_same_samples(tiny_run, shakespeare_tokenizer,
                                                                         monkeypatch, capsys):
    prompts = tiny_run / "prompts.txt"
    prompts.write_text("JULIET: h\u00e9llo \u20ac\nROMEO:\n", encoding="utf-8")
    r = _cli("--checkpoint", tiny_run, "--prompts-file", prompts, "--jsonl", "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == ["JULIET: h\u00e9llo \u20ac"] * 2 + ["ROMEO:"] * 2
    for rec in records:
        assert 1 <= len(rec["tokens"]) <= 8 and rec["tokens_per_s"] > 0  # checkpoint's sample.max_new_tokens
        assert rec["completion"] == shakespeare_tokenizer.decode(rec["tokens"])
    assert records[0]["tokens"] != records[1]["tokens"], "two samples of one prompt drew the same tokens"

    # Streaming, prompts from stdin, stdout not a tty: plain text, the same samples as --jsonl.
    code, out, err = _cli_in_process(["--checkpoint", str(tiny_run), "--num-samples", "2"], monkeypatch, capsys,
                                     stdin="JULIET: h\u00e9llo \u20ac\n")
    assert code == 0, err
    first, second = (f"JULIET: h\u00e9llo \u20ac{rec['completion']}\n" for rec in records[:2])
    assert out == first + "\n" + second, out
    assert "tokens/s" in err and "\x1b[" not in out


def test_cli_interactive_reads_a_prompt_per_line_until_eof(tiny_run, monkeypatch, capsys):
    code, out, err = _cli_in_process(["--checkpoint", str(tiny_run), "--interactive"], monkeypatch, capsys,
                                     stdin="ROMEO:\n\nJULIET:\n")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ROMEO:") and lines[1].startswith("JULIET:"), out
    assert err.count(" tokens in ") == 2, err  # one speed report per prompt; the empty line is skipped


@pytest.mark.parametrize("args, stdin, message", [
    (["--prompt", ""], None, "--prompt: the prompt is empty"),
    ([], "", "stdin: the prompt is empty"),
    (["--prompt", "x", "--top-p", "1.5"], None, "sample.top_p must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "64"], None, "exceeds the model's max_seq_len=64"),
    (["--prompt", "x", "--window", "8", "--n-sink", "8"], None, "sample.n_sink=8 leaves no rolling window"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tiny_run, args, stdin, message, monkeypatch, capsys):
    code, out, err = _cli_in_process(["--checkpoint", str(tiny_run), *args], monkeypatch, capsys, stdin or "")
    assert code == 2 and out == "", (code, out)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_missing_or_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    r = _cli("--checkpoint", tmp_path / "nope", "--prompt", "x")
    assert (r.returncode, r.stdout) == (2, ""), (r.returncode, r.stdout)
    assert r.stderr == f"error: {tmp_path / 'nope'}: no such run directory or checkpoint\n", r.stderr
    step = tmp_path / "run" / "checkpoints" / "5"
    (step / "params").mkdir(parents=True)
    (step / "config").mkdir()
    (step / "config" / "metadata").write_text("{not json")
    code, out, err = _cli_in_process(["--checkpoint", str(tmp_path / "run"), "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and out == "" and "corrupt" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kernel_layout", sample.KERNEL_LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_the_decode_loop_updates_the_kv_cache_in_place_without_copying_it(params, batch, kernel_layout):
    """The compiled generate loop writes each token's keys and values into the cache in place: no copy
    of a cache-sized buffer per step. A [B, K, S, H] cache read through a reshape made XLA update it
    twice and copy it 4 times per layer per step (a 102M llama at batch 1: 48 cache copies per token);
    a key cache read as q . k^T was transposed whole at every step."""
    prompts = [[5, 9, 2], list(range(1, 10)), list(range(30, 50))][:batch]
    p = sample._prepare(prompts, jax.random.key(0), SAMPLING, CFG, None, None, kernel_layout)
    if kernel_layout == "out_in":
        params = sample.transpose_kernels(params)
    hlo = sample.generate_padded.lower(params, p.tokens_BxP, p.positions_BxP, p.key, p.model, p.plan,
                                       SAMPLING.max_new_tokens).compile().as_text()
    cache = sample.init_cache(CFG, batch, p.plan.cache_len)["layers"][0]["k"]
    cache_shape = "f32[" + ",".join(map(str, cache.shape)) + "]"
    loop = next(line for line in hlo.splitlines() if " while(" in line and cache_shape in line)  # the token loop
    body_name = loop.split("body=", 1)[1].split(",", 1)[0]
    body = hlo.split("\n" + body_name + " ", 1)[1].split("\n}", 1)[0]
    assert "dynamic-update-slice" in body and body.count(cache_shape) > 2 * CFG.n_layers
    # Every copy or transpose (plain, or a fusion named after one) whose output holds as many elements as
    # a layer's cache: a copied or relaid-out cache, in any axis order.
    moved = []
    for line in body.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S*(?:copy|transpose)\S*) = f32\[([\d,]+)\]", line)
        if m and math.prod(map(int, m.group(2).split(","))) == cache.size:
            moved.append(line.strip()[:160])
    assert not moved, f"{len(moved)} copies/transposes of a {cache_shape} cache in the decode loop, e.g. {moved[0]}"


# Every kind of Dense a model has: llama's (tied head), an untied lm_head, gpt2's biases, an MoE router.
LAYOUT_MODELS = {
    "llama": CFG,
    "llama-untied-head": dataclasses.replace(CFG, tie_embeddings=False),
    "gpt2": resolve_model(ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
    "llama-moe": resolve_model(dataclasses.replace(CFG, moe_experts=4, moe_d_ff=48)),
}


@pytest.mark.parametrize("name", list(LAYOUT_MODELS))
def test_out_in_kernels_give_the_logits_and_tokens_of_the_trained_layout(name):
    """Kernels stored [out, in] (kernel_layout="out_in", batch-1 decoding on CPU) compute what [in, out]
    kernels do: the same prefill logits (<= 1e-5) and the same sampled tokens, in generate and stream."""
    cfg = LAYOUT_MODELS[name]
    params = random_params(cfg, seed=1)
    params_t = sample.transpose_kernels(params)
    flat, flat_t = (dict(jax.tree_util.tree_flatten_with_path(x)[0]) for x in (params, params_t))
    kernels = [k for k in flat if k[-1].key == "kernel"]
    assert len(kernels) >= 4 * cfg.n_layers and all(flat_t[k].shape == flat[k].shape[::-1] for k in kernels)
    assert all(flat_t[k] is flat[k] for k in flat if k[-1].key != "kernel")
    shapes = sample.transpose_kernels(jax.eval_shape(lambda: params))  # compile_generate's argument
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(np.shape, params_t)

    p = sample._prepare(PROMPTS, jax.random.key(0), SAMPLING, cfg, None, None)
    cache = sample.init_cache(cfg, len(PROMPTS), p.plan.cache_len)
    logits = {layout: np.asarray(sample.apply_with_layout(x, cfg, layout, p.tokens_BxP, p.positions_BxP, cache,
                                                          method=sample.Transformer.decode)[0])
              for layout, x in (("in_out", params), ("out_in", params_t))}
    np.testing.assert_allclose(logits["out_in"], logits["in_out"], rtol=1e-5, atol=1e-5)

    key = jax.random.key(4)
    want = np.asarray(sample.generate(params, PROMPTS, key, SAMPLING, cfg)[0])
    got = np.asarray(sample.generate(params_t, PROMPTS, key, SAMPLING, cfg, kernel_layout="out_in")[0])
    np.testing.assert_array_equal(got, want)
    streamed = [t for t, _ in sample.stream(params_t, PROMPTS[:1], _row_key(key, 0), SAMPLING, cfg,
                                            kernel_layout="out_in")]
    np.testing.assert_array_equal(np.concatenate(streamed), want[0, :len(streamed)])


def test_device_put_leafwise_writes_out_in_kernels_row_major(params):
    host = jax.tree_util.tree_map(np.array, params)  # device_put_leafwise empties the tree it is given
    put = sample.device_put_leafwise(host, "out_in")
    want = sample.transpose_kernels(params)
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(put)[0], jax.tree_util.tree_leaves(want)):
        assert isinstance(got, jax.Array) and got.shape == ref.shape, path
        np.testing.assert_array_equal(np.asarray(got), ref)
    assert host == {}


def test_a_kernel_layout_that_does_not_match_the_params_is_refused(params):
    with pytest.raises(ConfigError, match="kernel_layout='outin': expected one of in_out, out_in"):
        sample.generate(params, PROMPTS, jax.random.key(0), SAMPLING, CFG, kernel_layout="outin")
    # Trained [in, out] params declared [out, in]: wq is square, wk ([32, 16]) is not.
    with pytest.raises(ValueError, match=r"layers_0/attn/wk: kernel_layout='out_in' needs a \[16, 32\] kernel"):
        sample.generate(params, PROMPTS, jax.random.key(0), SAMPLING, CFG, kernel_layout="out_in")


def test_preferred_kernel_layout_is_out_in_for_one_row_on_cpu():
    assert jax.default_backend() == "cpu"
    assert sample.preferred_kernel_layout(1) == "out_in"
    assert [sample.preferred_kernel_layout(b) for b in (2, 4, 32)] == ["in_out"] * 3


def test_cli_kernel_layouts_print_the_same_samples(tiny_run, monkeypatch, capsys):
    """--jsonl with one sample: auto holds the kernels [out, in]; in_out and out_in print the same samples."""
    out = {}
    for layout in ("in_out", "out_in", "auto"):
        code, stdout, err = _cli_in_process(["--checkpoint", str(tiny_run), "--prompt", "ROMEO:", "--jsonl",
                                             "--kernel-layout", layout], monkeypatch, capsys)
        assert code == 0, err
        out[layout] = [json.loads(line)["tokens"] for line in stdout.splitlines()]
    assert len(out["in_out"]) == 1 and out["in_out"][0]
    assert out["out_in"] == out["in_out"] == out["auto"]
