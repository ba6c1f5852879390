"""Parity: atlas_jax.sample (KV cache, jitted loop, filters, sampler) against plain PyTorch references.

- Greedy: `generate` with its cache emits the same 64 tokens as atlas_torch_ref with NO cache, which
  recomputes the whole forward over the growing sequence and takes the argmax each step. Two prompts
  of different lengths share one left-padded batch on the jax side; torch runs each alone.
- Filters: the kept sets of `top_k_filter` / `top_p_filter` equal those of the torch filters below,
  written from the rule documented in atlas_jax/sample.py (ties with the cut-off are kept).
- Sampling: 20000 draws of `sample_token` follow softmax(logits / T) restricted to the kept set, by
  a chi-square test at a fixed seed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from atlas_jax import sample
from atlas_jax.config import ModelConfig, SampleConfig, resolve_model
from atlas_jax.model import init_params, loss_fn
from atlas_torch_ref import RefConfig, Transformer as TorchTransformer, load_params

from .test_model_parity import parity_params

NEW_TOKENS = 64
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
ARCHS = {  # llama with grouped-query attention (4 query heads over 2 kv heads), and gpt2
    "llama-gqa": dict(arch="llama", n_heads=4, n_kv_heads=2),
    "gpt2": dict(arch="gpt2", n_heads=4),
}


def model_config(name: str, vocab_size: int, tie_embeddings: bool = True) -> ModelConfig:
    return resolve_model(ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, max_seq_len=128,
                                     tie_embeddings=tie_embeddings, **ARCHS[name]))


def torch_greedy(ref: TorchTransformer, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n argmax tokens, each from a full forward over prompt + tokens so far; and each step's top-2 gap."""
    seq, gaps = list(prompt), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny forwards run ~50x slower (CPU time) on 2 contended threads
    try:
        with torch.inference_mode():
            for _ in range(n):
                logits_V = ref(torch.tensor([seq]))[0, -1]
                top2 = torch.topk(logits_V, 2).values
                gaps.append(float(top2[0] - top2[1]))
                seq.append(int(logits_V.argmax()))
    finally:
        torch.set_num_threads(threads)
    return seq[len(prompt):], gaps


def assert_greedy_matches_torch(cfg: ModelConfig, params, prompts: list[list[int]]) -> list[list[int]]:
    tokens, lengths = sample.generate(params, prompts, jax.random.key(0), GREEDY, cfg)
    tokens = np.asarray(tokens)
    assert (np.asarray(lengths) == NEW_TOKENS).all()
    ref = load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), params)
    for b, prompt in enumerate(prompts):
        expected, gaps = torch_greedy(ref, prompt, NEW_TOKENS)
        bad = np.flatnonzero(tokens[b] != np.asarray(expected))
        assert not bad.size, (
            f"prompt {b} (length {len(prompt)}): cached jax greedy diverges from torch full recompute at new "
            f"token {bad[0]}: jax {tokens[b, bad[0]]}, torch {expected[bad[0]]} (torch top-2 logit gap there "
            f"{gaps[bad[0]]:.3g}); jax {tokens[b, :bad[0] + 1].tolist()}")
    return tokens.tolist()


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_cached_generation_matches_torch_full_recompute_random_init(name):
    # Random init: flax's std-0.02 init gives logits ~1e-2 apart, where float rounding can flip an
    # argmax; parity_params draws O(1) activations and logits, so top-1 is clear of rounding noise
    # (a failure prints torch's top-2 gap where it diverged). The head is untied: a random tied model
    # scores the current token by e.e, which dominates, and greedy repeats one token; an untied head
    # wanders over the vocabulary, so the 64 steps read varied cache contents.
    cfg = model_config(name, vocab_size=128, tie_embeddings=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 128, 5).tolist(), rng.integers(0, 128, 19).tolist()]
    for row in assert_greedy_matches_torch(cfg, parity_params(cfg, seed=3), prompts):
        assert len(set(row)) > 3, f"a near-constant continuation reads little of the cache: {row}"


def std_init_params(cfg: ModelConfig, seed: int) -> dict:
    """A training start like init_params' (N(0, 0.02) weights, unit scales, zero biases), drawn with numpy:
    no init to compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, s):
        leaf = path[-1].key
        if leaf in ("scale", "bias"):
            return np.full(s.shape, 1.0 if leaf == "scale" else 0.0, np.float32)
        return rng.normal(0, 0.02, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def train_briefly(cfg: ModelConfig, tokens: np.ndarray, steps: int = 60, batch: int = 16, seq: int = 64,
                  lr: float = 1e-2) -> dict:
    """A few dozen adam steps on random windows of `tokens`, all in one jitted scan."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(tokens) - seq - 1, size=(steps, batch))
    windows = tokens[starts[..., None] + np.arange(seq + 1)]  # [steps, batch, seq + 1]
    opt = optax.adam(lr)

    @jax.jit
    def train(params, windows):
        def step(carry, w):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, cfg, w[:, :-1], w[:, 1:])
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), windows)
        return params, losses

    params, losses = train(std_init_params(cfg, seed=0), jnp.asarray(windows, jnp.int32))
    losses = np.asarray(losses)
    assert losses[-5:].mean() < losses[0] - 1.0, f"training did not take: loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    return jax.tree_util.tree_map(np.array, params)  # writable copies, as torch.from_numpy wants


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_cached_generation_matches_torch_full_recompute_trained(name, shakespeare_tokenizer, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:60_000]
    tok = shakespeare_tokenizer
    cfg = model_config(name, vocab_size=tok.vocab_size)
    params = train_briefly(cfg, np.asarray(tok.encode(text), np.int64))
    # A few seconds of training gives a model that loops ("\n\n\n", "IIII"): still trained weights.
    prompts = [tok.encode("ROMEO:\n"), tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n")]
    assert_greedy_matches_torch(cfg, params, prompts)


# --------------------------------------------------------------------------- filters


def torch_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every token whose logit >= the k-th largest (ties with it kept); k <= 0 or >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def torch_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the shortest most-probable prefix reaching mass p, widened to every logit tied with its last."""
    if p >= 1.0:
        return logits
    sorted_desc = torch.sort(logits, dim=-1, descending=True).values
    probs = torch.softmax(sorted_desc, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    n_kept = (mass_before < p).sum(-1, keepdim=True)
    cutoff = torch.gather(sorted_desc, -1, n_kept - 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _logit_rows(seed: int) -> np.ndarray:
    """2000 rows x 24 tokens: half continuous, half on a 0.5 grid (exact ties at every cut-off)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 2, size=(2000, 24))
    rows[1000:] = np.round(rows[1000:] * 2) / 2
    return rows.astype(np.float32)


def _ambiguous_rows(logits: np.ndarray, p: float, tol: float = 1e-5) -> np.ndarray:
    """Rows where a cumulative mass lies within tol of p: float32 rounding may decide those either way."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mass = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    return (np.abs(mass - p) < tol).any(-1)


@pytest.mark.parametrize("k, p", [(1, 1.0), (3, 1.0), (10, 1.0), (0, 0.37), (0, 0.83), (0, 0.95), (5, 0.61), (12, 0.9)])
def test_top_k_top_p_keep_the_same_sets_as_torch(k, p):
    logits = _logit_rows(seed=k * 100 + int(p * 100))
    jax_filter = jax.jit(lambda x: sample.top_p_filter(sample.top_k_filter(x, k), p))
    kept_jax = np.isfinite(np.asarray(jax_filter(logits)))
    kept_torch = torch.isfinite(torch_top_p(torch_top_k(torch.from_numpy(logits), k), p)).numpy()
    ambiguous = _ambiguous_rows(logits, p) if p < 1 else np.zeros(len(logits), bool)
    assert ambiguous.mean() < 0.01
    diff = np.flatnonzero((kept_jax != kept_torch).any(-1) & ~ambiguous)
    assert not diff.size, (f"top_k={k} top_p={p}: {diff.size} rows keep different sets, first row {diff[0]}: "
                           f"logits {logits[diff[0]].tolist()}, jax {kept_jax[diff[0]].astype(int).tolist()}, "
                           f"torch {kept_torch[diff[0]].astype(int).tolist()}")
    tied = (logits[1000:] == np.where(kept_jax[1000:], logits[1000:], np.inf).min(-1, keepdims=True)).sum(-1)
    assert (tied > 1).any(), "no row has a tie at its cut-off: the test does not exercise ties"


# --------------------------------------------------------------------------- sampling distribution

DRAWS = 20_000
# chi2.ppf(0.999, df) for df = 1..11 (scipy.stats.chi2.ppf; scipy is not a test dependency). A
# correct sampler fails this test at a given seed with probability 0.001.
CHI2_CRITICAL_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588, 31.264]


@pytest.mark.parametrize("temperature, k, p", [(0.6, 0, 1.0), (1.7, 0, 1.0), (0.8, 5, 1.0), (1.0, 0, 0.8),
                                                (1.2, 7, 0.9)])
def test_sampled_frequencies_match_softmax_over_temperature(temperature, k, p):
    logits_V = np.random.default_rng(5).normal(0, 1.0, 12).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), DRAWS)
    draw = jax.jit(sample.sample_token, static_argnums=(2, 3, 4))
    tokens = np.asarray(draw(jnp.broadcast_to(logits_V, (DRAWS, 12)), keys, temperature, k, p))
    counts = np.bincount(tokens, minlength=12)
    scaled = torch.from_numpy(logits_V).double() / temperature
    kept = torch.isfinite(torch_top_p(torch_top_k(scaled, k), p)).numpy()
    probs = torch.softmax(scaled, -1).numpy() * kept
    expected = DRAWS * probs / probs.sum()
    assert counts[~kept].sum() == 0, f"drew filtered-out tokens {np.flatnonzero(counts * ~kept).tolist()}"
    assert expected[kept].min() >= 5, "a cell too small for the chi-square approximation"
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    df = int(kept.sum()) - 1
    if df == 0:
        return  # a single kept token: the check above is the whole test
    assert chi2 < CHI2_CRITICAL_999[df - 1], (
        f"T={temperature} top_k={k} top_p={p}: chi-square {chi2:.1f} >= {CHI2_CRITICAL_999[df - 1]} (df {df}, "
        f"alpha 0.001); counts {counts.tolist()} vs expected {np.round(expected).astype(int).tolist()}")
