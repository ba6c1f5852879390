"""Sampling with the KV cache: jitted whole-loop `generate`, step-by-step `stream`, logit filters.

    tokens_BxN, lengths_B = generate(params, [[1, 45, 9], [1, 7]], jax.random.key(0), sample_cfg, model_cfg,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id)

How a batch runs:
- Prompts of different lengths are LEFT-padded to a common bucket (a power of two, at least 16, at
  most model.max_seq_len); pads get position -1, which `Transformer.decode` never attends to, so each
  row generates what its prompt would alone. The cache holds bucket + max_new_tokens slots, rounded
  up to a multiple of 64. A new prompt length compiles again only when it lands in a new bucket.
- One `Transformer.decode` call prefills the whole padded block; then each step draws a token from
  the latest logits and feeds it back (T == 1) for the next ones, inside `lax.while_loop`, which ends
  as soon as every row is done. A row is done after it emits `eos_id` (the EOS is part of its output and its length) or
  max_new_tokens tokens; afterwards it emits `pad_id` and its length stops growing.
- Randomness: row b draws step i with fold_in(fold_in(key, b), i), or fold_in(keys[b], i) when a key
  per row is given. A row's tokens thus depend on its prompt and key only, not on the batch around it,
  and `stream` and `generate` draw identical tokens.
- Sampling order: logits / temperature -> top-k -> top-p (on the top-k survivors' renormalised
  probabilities) -> a draw from the softmax. temperature == 0 is greedy argmax (first index on exact
  ties), which the filters cannot change.

Ties, by value, so a kept set never depends on the order a sort leaves equal logits in:
- `top_k_filter` keeps every token whose logit >= the k-th largest logit: all tokens tied with the
  k-th are kept, so more than k may survive.
- `top_p_filter`: in descending order, the shortest prefix of tokens whose probability reaches p
  (the tokens whose exclusive cumulative mass is < p), widened to every token whose logit equals the
  last one of that prefix: ties with the cut-off token are kept as well.

An empty prompt is an error here (the caller decides whether a prompt starts with BOS), and so is
a prompt that with max_new_tokens would run past model.max_seq_len.

Streaming (sample.window > 0, StreamingLLM): the cache holds `window` tokens (plus the model's sink
tokens) whatever max_new_tokens is: the first sample.n_sink tokens of each row and a rolling window
of its latest ones, positions assigned within the cache (`model.init_cache(..., n_sink=)`), so
generation runs past model.max_seq_len. The prompt must fit in the window.

Kernel layout (`kernel_layout`): the params come as trained, every Dense kernel [in, out]
("in_out"), or with every Dense kernel stored transposed, [out, in] ("out_in": `transpose_kernels`,
or `device_put_leafwise(params, "out_in")` while loading). A batch-1 decode step is a chain of
matrix-vector products that read every weight once; XLA:CPU reads an [out, in] matrix faster for them
(`preferred_kernel_layout`). The params and the `kernel_layout` argument must agree: it is not
inferred from the shapes (square kernels look the same either way).
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.config import ModelConfig, SampleConfig, validate_sample_window
from atlas_jax.errors import AtlasError, ConfigError
from atlas_jax.model import Transformer, init_cache

Array = jax.Array
PyTree = Any

MIN_BUCKET = 16
CACHE_MULTIPLE = 64
KERNEL_LAYOUTS = ("in_out", "out_in")


# --------------------------------------------------------------------------- kernel layout


def preferred_kernel_layout(batch: int) -> str:
    """The faster layout for decoding `batch` rows on this backend: "out_in" on CPU at batch 1, else
    "in_out". Measured on a 102M llama (f32, 2 cores, greedy, 4 interleaved rounds in one process,
    medians, docs/benchmarks.md): [out, in] kernels decode batch 1 at 51.8 tok/s against 44.1, and
    batch 4 at 83.9 against 110.7. At batch 32 (375.0 against 351.0) the rounds overlap."""
    return "out_in" if batch == 1 and jax.default_backend() == "cpu" else "in_out"


def check_kernel_layout(kernel_layout: str) -> None:
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ConfigError(f"kernel_layout={kernel_layout!r}: expected one of {', '.join(KERNEL_LAYOUTS)}")


def _is_kernel(name: str, value) -> bool:
    """A Dense kernel leaf (every nn.Dense of the model names its weight `kernel`; nothing else does)."""
    return name == "kernel" and getattr(value, "ndim", 0) == 2


def laid_out(name: str, value, kernel_layout: str):
    """One params leaf named `name` as `kernel_layout` holds it: a Dense kernel transposed for "out_in"."""
    return value.T if kernel_layout == "out_in" and _is_kernel(name, value) else value


def transpose_kernels(params: PyTree) -> PyTree:
    """The params (arrays, or jax.ShapeDtypeStruct shapes) with every Dense kernel transposed
    ([in, out] <-> [out, in]); the rest as it is."""
    def transposed(v):
        return jax.ShapeDtypeStruct(v.shape[::-1], v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v.T

    if not isinstance(params, dict):
        return params
    return {k: transposed(v) if _is_kernel(k, v) else transpose_kernels(v) for k, v in params.items()}


def _out_in_dense(next_fun, args, kwargs, context):
    """A flax interceptor: nn.Dense.__call__ with its kernel stored [out, in] (same values as Dense)."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
        return next_fun(*args, **kwargs)
    x = args[0]
    kernel_OxI = module.get_variable("params", "kernel")
    if kernel_OxI.shape != (module.features, x.shape[-1]):
        raise ValueError(f"{'/'.join(module.path)}: kernel_layout='out_in' needs a [{module.features}, "
                         f"{x.shape[-1]}] kernel, got {list(kernel_OxI.shape)}")
    dtype = module.dtype or jnp.result_type(x, kernel_OxI)
    y = jax.lax.dot_general(x.astype(dtype), kernel_OxI.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


def apply_with_layout(params, cfg: ModelConfig, kernel_layout: str, *args, **kwargs):
    """Transformer(cfg).apply with params whose Dense kernels lie as kernel_layout says."""
    model = Transformer(cfg)
    if kernel_layout == "in_out":
        return model.apply({"params": params}, *args, **kwargs)
    with nn.intercept_methods(_out_in_dense):
        return model.apply({"params": params}, *args, **kwargs)


# --------------------------------------------------------------------------- filters


def top_k_filter(logits: Array, k: int) -> Array:
    """Logits with every token below the k-th largest (last axis) set to -inf; ties with it are kept.

    k is a Python int; k <= 0 or k >= V keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # min() rather than [..., -1:]: XLA's CPU compiler rewrites a top_k whose output is sliced into a
    # full sort (~70x slower for 32 x 32k logits).
    kth = jax.lax.top_k(logits, k)[0].min(axis=-1, keepdims=True)
    return jnp.where(logits >= kth, logits, -jnp.inf)


def _ordered_bits(x: Array) -> Array:
    """uint32 keys that order like the float32 values (-0.0 == 0.0): x <= y iff key(x) <= key(y)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_p_filter(logits: Array, p: float) -> Array:
    """Logits outside the nucleus of mass p (last axis) set to -inf; ties with the cut-off are kept.

    The nucleus is the shortest run of most-probable tokens whose probability reaches p, widened to
    every token whose logit equals the smallest one in it; i.e. the tokens whose logit >= the largest
    threshold t with mass(logit >= t) >= p. -inf entries (e.g. from top-k) stay out; p >= 1 keeps
    everything. p may be traced.

    No sort (XLA's CPU sort takes ~0.4 s for 32 x 32k logits): t is found exactly by bisecting the
    32-bit pattern of the logits, 32 masked sums over V.
    """
    if isinstance(p, (int, float)) and p >= 1.0:
        return logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    keys = _ordered_bits(logits)

    def halve(_, bounds):  # invariant: mass(keys >= lo) >= p, and the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # ceil of the midpoint, without overflow
        reaches = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (keys.min(-1, keepdims=True), keys.max(-1, keepdims=True)))
    return jnp.where(keys >= lo, logits, -jnp.inf)


def sample_token(logits_BxV: Array, keys_B: Array, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> Array:
    """One token per row: argmax when temperature == 0, else a draw from the filtered softmax.

    keys_B holds one PRNG key per row; temperature, top_k and top_p are Python numbers (static).
    The draw inverts the CDF with one uniform per row: the first token whose cumulative probability
    reaches u (filtered tokens have probability 0 and are never drawn). Gumbel-max
    (jax.random.categorical) needs V random numbers per row: 7x slower for 32 x 32k logits on CPU.
    """
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    cdf_BxV = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u_B = (1.0 - jax.vmap(jax.random.uniform)(keys_B)) * cdf_BxV[:, -1]  # in (0, total]
    return jnp.sum(cdf_BxV < u_B[:, None], axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- shapes + checks


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """The padded prompt length: the next power of two >= length (at least 16), capped at max_seq_len."""
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max(max_seq_len, length))


def cache_length(bucket: int, max_new_tokens: int) -> int:
    return CACHE_MULTIPLE * math.ceil((bucket + max_new_tokens) / CACHE_MULTIPLE)


def check_sample_config(s: SampleConfig) -> None:
    for key in ("temperature", "top_p"):
        if not math.isfinite(getattr(s, key)):
            raise ConfigError(f"sample.{key} (--{key.replace('_', '-')}) must be a finite number, got {getattr(s, key)}")
    if s.temperature < 0:
        raise ConfigError(f"sample.temperature must be >= 0 (0 = greedy), got {s.temperature}")
    if s.top_k < 0:
        raise ConfigError(f"sample.top_k must be >= 0 (0 disables it), got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"sample.top_p must be in (0, 1] (1 disables it), got {s.top_p}")
    if s.max_new_tokens < 1:
        raise ConfigError(f"sample.max_new_tokens must be positive, got {s.max_new_tokens}")


def check_prompt_lengths(lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """AtlasError for an empty prompt, or one that with max_new_tokens passes max_seq_len."""
    for i, n in enumerate(lengths):
        if n == 0:
            raise AtlasError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's BOS)")
    longest = max(lengths)
    if longest + max_new_tokens > max_seq_len:
        room = max_seq_len - longest
        fix = (f"lower max_new_tokens (sample.max_new_tokens, --max-new-tokens) to at most {room} or shorten the prompt"
               if room > 0 else f"shorten the prompt to at most {max_seq_len - max_new_tokens} tokens, or lower "
                                f"max_new_tokens (--max-new-tokens)" if max_new_tokens < max_seq_len
               else f"lower max_new_tokens (--max-new-tokens) below max_seq_len={max_seq_len} and shorten the prompt")
        raise AtlasError(f"prompt of {longest} token(s) + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
                         f"exceeds the model's max_seq_len={max_seq_len}; {fix}")


class _Frozen:
    """A config dataclass as a jit static argument: hashed and compared by value."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._key = (type(cfg), dataclasses.astuple(cfg))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and self._key == other._key


class _Plan(NamedTuple):
    """What a step compiles in besides the model (max_new_tokens only shapes generate's output)."""
    temperature: float
    top_k: int
    top_p: float
    cache_len: int
    eos_id: int  # -1: no EOS stop
    pad_id: int
    n_sink: int = -1  # streaming (sample.window > 0): the first tokens kept; -1: a plain cache
    kernel_layout: str = "in_out"  # how the params hold their Dense kernels (KERNEL_LAYOUTS)


class _Prepared(NamedTuple):
    tokens_BxP: np.ndarray
    positions_BxP: np.ndarray
    key: Array  # one key, or one per row
    model: _Frozen
    plan: _Plan
    max_new_tokens: int


def _prepare(prompt_tokens, key, sample_cfg: SampleConfig, model_cfg: ModelConfig,
             eos_id: int | None, pad_id: int | None, kernel_layout: str = "in_out") -> _Prepared:
    check_sample_config(sample_cfg)
    check_kernel_layout(kernel_layout)
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_tokens]
    if not prompts:
        raise AtlasError("no prompts to generate from")
    lengths = [len(p) for p in prompts]
    n_new = sample_cfg.max_new_tokens
    validate_sample_window(sample_cfg, model_cfg)
    window = sample_cfg.window
    if window:
        if max(lengths) > window:
            raise AtlasError(f"prompt of {max(lengths)} token(s) is longer than sample.window={window} (--window); "
                             f"shorten it or raise sample.window (at most model.max_seq_len={model_cfg.max_seq_len})")
        check_prompt_lengths(lengths, 0, window)  # empty prompts
    else:
        check_prompt_lengths(lengths, n_new, model_cfg.max_seq_len)
    for i, p in enumerate(prompts):
        bad = p[(p < 0) | (p >= model_cfg.vocab_size)]
        if bad.size:
            raise AtlasError(f"prompt {i} holds token id {int(bad[0])}, outside the model's vocabulary "
                             f"[0, {model_cfg.vocab_size}); was it encoded with the run's tokenizer?")
    bucket = prompt_bucket(max(lengths), model_cfg.max_seq_len)
    tokens = np.zeros((len(prompts), bucket), np.int32)
    positions = np.full((len(prompts), bucket), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, bucket - len(p):] = p
        positions[b, bucket - len(p):] = np.arange(len(p))
    eos = -1 if eos_id is None else int(eos_id)
    pad = int(pad_id) if pad_id is not None and pad_id >= 0 else max(eos, 0)  # -1: no pad token (GPT-2)
    greedy = sample_cfg.temperature == 0  # the filters cannot change an argmax: one compile for all
    plan = _Plan(float(sample_cfg.temperature), 0 if greedy else int(sample_cfg.top_k),
                 1.0 if greedy else float(sample_cfg.top_p), window or cache_length(bucket, n_new), eos, pad,
                 sample_cfg.n_sink if window else -1, kernel_layout)
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.shape not in ([(), (len(prompts),)] if typed else [(2,), (len(prompts), 2)]):
        raise AtlasError(f"expected one PRNG key or {len(prompts)} keys (one per prompt), got key shape {key.shape}")
    return _Prepared(tokens, positions, key, _Frozen(model_cfg), plan, n_new)


def _row_keys(key, batch: int) -> Array:
    """One typed key per row: fold_in(key, b) for a single key, or the given [B] keys."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))
    return key


# --------------------------------------------------------------------------- the steps


class _Carry(NamedTuple):
    cache: PyTree
    pos_B: Array  # the position of each row's next token
    done_B: Array
    keys_B: Array  # each row's PRNG key; step i draws with fold_in(keys_B[b], i)


def _prefill(params, tokens_BxP, positions_BxP, key, model: _Frozen, plan: _Plan) -> tuple[_Carry, Array]:
    """Run the padded prompts into a fresh cache -> (carry, logits_BxV of each row's next token)."""
    b = tokens_BxP.shape[0]
    cache = init_cache(model.cfg, b, plan.cache_len, n_sink=None if plan.n_sink < 0 else plan.n_sink)
    logits_BxPxV, cache = apply_with_layout(params, model.cfg, plan.kernel_layout, tokens_BxP, positions_BxP,
                                            cache, method=Transformer.decode)
    # Left padding puts every row's last prompt token in the last column.
    carry = _Carry(cache, positions_BxP[:, -1] + 1, jnp.zeros(b, bool), _row_keys(key, b))
    return carry, logits_BxPxV[:, -1]


def _step(params, carry: _Carry, logits_BxV, step, model: _Frozen, plan: _Plan):
    """Draw token `step` from logits_BxV, then run it through the model for the next step's logits.

    -> (carry, next logits_BxV, token_B, active_B). A finished row emits pad_id (active False); a row
    is done once it has emitted eos_id. The last step's model call is wasted (one decode step per
    call), so that the loop body holds one copy of the model and one of the sampler.
    """
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(carry.keys_B, step)
    sampled_B = sample_token(logits_BxV, keys_B, plan.temperature, plan.top_k, plan.top_p)
    active_B = ~carry.done_B
    token_B = jnp.where(active_B, sampled_B, plan.pad_id)
    done_B = carry.done_B | (token_B == plan.eos_id)
    logits_Bx1xV, cache = apply_with_layout(params, model.cfg, plan.kernel_layout, token_B[:, None],
                                            carry.pos_B[:, None], carry.cache, method=Transformer.decode)
    carry = carry._replace(cache=cache, pos_B=carry.pos_B + 1, done_B=done_B)
    return carry, logits_Bx1xV[:, 0], token_B, active_B


@jax.jit(static_argnums=(4, 5, 6))
def generate_padded(params, tokens_BxP, positions_BxP, key, model: _Frozen, plan: _Plan, max_new_tokens: int):
    """The jitted whole loop over prepared (padded) prompts -> (tokens_BxN, lengths_B)."""
    b, n = tokens_BxP.shape[0], max_new_tokens
    carry, logits_BxV = _prefill(params, tokens_BxP, positions_BxP, key, model, plan)

    def cond(state):
        i, carry, *_ = state
        return (i < n) & ~jnp.all(carry.done_B)

    def body(state):
        i, carry, logits_BxV, out_BxN, lengths_B = state
        carry, logits_BxV, token_B, active_B = _step(params, carry, logits_BxV, i, model, plan)
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, i))
        return i + 1, carry, logits_BxV, out_BxN, lengths_B + active_B

    state = (jnp.array(0, jnp.int32), carry, logits_BxV, jnp.full((b, n), plan.pad_id, jnp.int32),
             jnp.zeros(b, jnp.int32))
    _, _, _, out_BxN, lengths_B = jax.lax.while_loop(cond, body, state)
    return out_BxN, lengths_B


_prefill_jit = jax.jit(_prefill, static_argnums=(4, 5))
_step_jit = jax.jit(_step, static_argnums=(4, 5), donate_argnums=(1, 2))


# --------------------------------------------------------------------------- public API


def generate(params: PyTree, prompt_tokens: Sequence[Sequence[int]], key: Array, sample_cfg: SampleConfig,
             model_cfg: ModelConfig, *, eos_id: int | None = None, pad_id: int | None = None,
             kernel_layout: str = "in_out") -> tuple[Array, Array]:
    """Generate up to sample_cfg.max_new_tokens tokens after each prompt.

    prompt_tokens: B token-id lists, lengths may differ. key: one PRNG key, or B keys (one per row).
    eos_id: stop a row once it emits this token (None or -1: run to max_new_tokens). pad_id: what a
    finished row emits (None or -1, a tokenizer without one: eos_id, or 0). Returns (tokens_BxN int32, lengths_B int32): row b
    generated tokens_BxN[b, :lengths_B[b]] (ending with eos_id when it stopped there); the rest is pad_id.
    kernel_layout: how `params` hold their Dense kernels (the module docstring).
    """
    p = _prepare(prompt_tokens, key, sample_cfg, model_cfg, eos_id, pad_id, kernel_layout)
    return generate_padded(params, p.tokens_BxP, p.positions_BxP, p.key, p.model, p.plan, p.max_new_tokens)


def compile_generate(param_shapes: PyTree, prompt_tokens: Sequence[Sequence[int]], key: Array,
                     sample_cfg: SampleConfig, model_cfg: ModelConfig, *, eos_id: int | None = None,
                     pad_id: int | None = None, kernel_layout: str = "in_out") -> Callable[[PyTree], tuple[Array, Array]]:
    """`generate` compiled ahead of time from the params' shapes (`jax.eval_shape(init_params...)`),
    before any weight is loaded -> run(params) -> (tokens_BxN, lengths_B), what `generate` returns for
    these prompts. XLA's compile holds ~100-200 MiB of host memory at its peak (a 102M llama on CPU);
    compiling first keeps that off the weights' peak instead of on top of it."""
    p = _prepare(prompt_tokens, key, sample_cfg, model_cfg, eos_id, pad_id, kernel_layout)
    compiled = generate_padded.lower(param_shapes, p.tokens_BxP, p.positions_BxP, p.key, p.model, p.plan,
                                     p.max_new_tokens).compile()
    release_host_memory()
    return lambda params: compiled(params, p.tokens_BxP, p.positions_BxP, p.key)


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere): after a compile
    or a host copy of the weights, so the next allocation's peak does not stack on freed memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_device(array) -> Array:
    """A host array -> a device array in a buffer of XLA's own allocator (jnp.array(copy=True)). On CPU,
    jax.device_put put it in the process heap instead, and decoding read weights placed there ~10% slower
    (a 102M llama at batch 1, two interleaved runs: 49.9/54.2 vs 53.5/59.6 tok/s)."""
    return jnp.array(array, copy=True)


def device_put_leafwise(params: dict, kernel_layout: str = "in_out") -> dict:
    """Host params (a nested dict of numpy arrays, emptied as it goes) -> the same tree on the default
    device, one leaf at a time, each host array released once its device copy exists: the peak is one
    copy of the weights plus one leaf, not two copies. kernel_layout="out_in": each Dense kernel
    lands transposed (`transpose_kernels`), written so by the same copy."""
    check_kernel_layout(kernel_layout)
    if not isinstance(params, dict):
        return to_device(params)
    out = {}
    for name in list(params):
        value = params.pop(name)
        if isinstance(value, dict):
            out[name] = device_put_leafwise(value, kernel_layout)
        else:
            out[name] = to_device(laid_out(name, value, kernel_layout))
            jax.block_until_ready(out[name])
        del value
    release_host_memory()
    return out


def stream(params: PyTree, prompt_tokens: Sequence[Sequence[int]], key: Array, sample_cfg: SampleConfig,
           model_cfg: ModelConfig, *, eos_id: int | None = None, pad_id: int | None = None,
           kernel_layout: str = "in_out") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`generate`, one step at a time: yields (tokens_B, active_B) numpy arrays per step.

    active_B[b] says tokens_B[b] is a real token of row b (else pad_id: the row is done). Stops after
    max_new_tokens steps or once every row is done. Same arguments and same tokens as `generate`;
    a prefill jit and a jit of the loop's step, so each step costs one dispatch.
    """
    p = _prepare(prompt_tokens, key, sample_cfg, model_cfg, eos_id, pad_id, kernel_layout)  # errors raise here
    return _stream_steps(params, p)


def _stream_steps(params, p: _Prepared) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    params = jax.device_put(params)  # once, not at every step (host numpy params, an accelerator)
    carry, logits_BxV = _prefill_jit(params, p.tokens_BxP, p.positions_BxP, p.key, p.model, p.plan)
    for step in range(p.max_new_tokens):
        carry, logits_BxV, token_B, active_B = _step_jit(params, carry, logits_BxV, np.int32(step), p.model, p.plan)
        token_np, active_np, done_np = jax.device_get((token_B, active_B, carry.done_B))
        yield token_np, active_np
        if done_np.all():
            return
