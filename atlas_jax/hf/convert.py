"""Hugging Face <-> Atlas: model configs and the tensor table, both ways (numpy only, no torch).

Supported architectures (`SUPPORTED`): GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM
(without a sliding window), MixtralForCausalLM (an Atlas llama with every layer MoE: moe_first_layer=0,
moe_every=1; the same routing: softmax over all experts, top k, the k weights renormalised).
Anything a model of these classes can switch on that Atlas's model does not compute (attention or
MLP biases in Llama, RoPE scaling, a head_dim other than hidden_size / num_attention_heads, another
activation) is refused by `atlas_model_config` with one line naming the config key, never approximated.

The tensor table (`tensor_table`), Hugging Face name -> Atlas param path:

    gpt2 (prefix "transformer." optional, as GPT2Model checkpoints omit it)
      wte.weight [V, D]                   embed/embedding
      wpe.weight [P, D]                   pos_embed/embedding
      h.{i}.ln_1.{weight,bias}            layers_{i}/attn_norm/{scale,bias}
      h.{i}.attn.c_attn.{weight,bias}     layers_{i}/attn/w{q,k,v}: Conv1D [D, 3D] is [in, out] like a
                                          Flax kernel, split in three along out
      h.{i}.attn.c_proj                   layers_{i}/attn/wo
      h.{i}.ln_2                          layers_{i}/mlp_norm
      h.{i}.mlp.c_fc / c_proj             layers_{i}/mlp/w_up / w_down
      ln_f                                final_norm
      lm_head.weight [V, D]               lm_head/kernel (transposed), untied heads only
    llama / mistral (prefix "model.")
      embed_tokens.weight                 embed/embedding
      layers.{i}.input_layernorm          layers_{i}/attn_norm/scale
      layers.{i}.self_attn.{q,k}_proj     layers_{i}/attn/w{q,k}/kernel: transposed AND permuted (below)
      layers.{i}.self_attn.{v,o}_proj     layers_{i}/attn/w{v,o}/kernel (transposed: Linear is [out, in])
      layers.{i}.post_attention_layernorm layers_{i}/mlp_norm/scale
      layers.{i}.mlp.{gate,up,down}_proj  layers_{i}/mlp/w_{gate,up,down}/kernel (transposed)
    mixtral: as llama, with the MLP replaced (the classic per-expert names, which transformers 5 fuses
    on load and llama.cpp's converter reads)
      layers.{i}.block_sparse_moe.gate.weight [E, D]           layers_{i}/moe/router/kernel (transposed)
      layers.{i}.block_sparse_moe.experts.{e}.w1/w3 [F, D]     layers_{i}/moe/w_gate/w_up [e] (transposed)
      layers.{i}.block_sparse_moe.experts.{e}.w2 [D, F]        layers_{i}/moe/w_down [e] (transposed)
      norm.weight                         final_norm/scale
      lm_head.weight                      lm_head/kernel (transposed), untied heads only

RoPE: Hugging Face's Llama rotates the two HALVES of a head (x[i], x[i + Dh/2]); Atlas and
llama.cpp rotate ADJACENT pairs (x[2i], x[2i+1]). The same function results when the rows of q_proj
and k_proj are reordered within each head: row (half j, index i) goes to 2i + j. That is
llama.cpp's `permute` in convert_hf_to_gguf.py; `unpermute` is its inverse, for export. Q and K
get the same reordering, so q.k (hence attention) is unchanged: the logits test proves it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from atlas_jax.config import ModelConfig, off_family, resolve_model, sink_options
from atlas_jax.errors import AtlasError, ConfigError

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
ARCH_OF = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
           "MixtralForCausalLM": "llama"}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh GELU Atlas computes
# Buffers some checkpoints carry that are not weights (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class HFError(AtlasError):
    """A Hugging Face model (or export) Atlas cannot take, in one line."""


# --------------------------------------------------------------------------- configs


def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) configs."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kinds = [d.get("rope_type", d.get("type")) or "default" for d in (params, scaling)]
    kind = next((k for k in kinds if k != "default"), "default")
    if kind != "default":
        raise HFError(f"{where}: rope scaling '{kind}' is not supported (Atlas computes plain RoPE); "
                      f"supported: {', '.join(SUPPORTED)} without rope_scaling")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise HFError(f"{where}: missing {', '.join(missing)}; not a complete Hugging Face model config")


def architecture(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise HFError(f"{where}: no 'architectures' entry; supported: {', '.join(SUPPORTED)}")
    if archs[0] not in SUPPORTED:
        raise HFError(f"{where}: architecture {archs[0]} is not supported; supported: {', '.join(SUPPORTED)}")
    return archs[0]


def atlas_model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """A resolved, validated Atlas ModelConfig computing the same function as the Hugging Face config."""
    name = architecture(hf, where)
    if ARCH_OF[name] == "gpt2":
        _require(hf, ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), where)
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise HFError(f"{where}: activation_function '{act}' is not supported (Atlas's GPT-2 computes the "
                          f"tanh GELU: {', '.join(GPT2_ACTIVATIONS)})")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(key):
                raise HFError(f"{where}: {key}=true is not supported by Atlas's GPT-2")
        if hf.get("scale_attn_weights", True) is False:
            raise HFError(f"{where}: scale_attn_weights=false is not supported (Atlas scales by 1/sqrt(head_dim))")
        m = ModelConfig(arch="gpt2", vocab_size=int(hf["vocab_size"]), d_model=int(hf["n_embd"]),
                        n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
                        d_ff=int(hf.get("n_inner") or 4 * hf["n_embd"]), max_seq_len=int(hf["n_positions"]),
                        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    else:
        _require(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
                 where)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise HFError(f"{where}: hidden_act '{act}' is not supported (Atlas's llama computes SwiGLU with silu)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise HFError(f"{where}: {key}=true is not supported (Atlas's llama has no biases)")
        if name in ("MistralForCausalLM", "MixtralForCausalLM") and hf.get("sliding_window") not in (None, 0) \
                and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
            raise HFError(f"{where}: sliding_window={hf['sliding_window']} is not supported (Atlas attends to "
                          f"the whole context); a {name.removesuffix('ForCausalLM')} config with sliding_window "
                          f"null is")
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) * heads != d:
            raise HFError(f"{where}: head_dim={head_dim} with {heads} heads is not hidden_size={d}; Atlas needs "
                          f"head_dim = hidden_size / num_attention_heads")
        m = ModelConfig(arch="llama", vocab_size=int(hf["vocab_size"]), d_model=d,
                        n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
                        n_kv_heads=int(hf.get("num_key_value_heads") or heads), d_ff=int(hf["intermediate_size"]),
                        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf, where),
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if name == "MixtralForCausalLM":
            _require(hf, ("num_local_experts", "num_experts_per_tok"), where)
            m = dataclasses.replace(m, moe_experts=int(hf["num_local_experts"]),
                                    moe_experts_per_token=int(hf["num_experts_per_tok"]), moe_d_ff=m.d_ff,
                                    moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)))
    try:
        m = resolve_model(m)
    except ConfigError as e:
        raise HFError(f"{where}: the model does not fit Atlas ({e})") from None
    return m


def hf_config(m: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
              dtype: str = "float32") -> dict:
    """config.json for `m` that transformers loads with no custom code."""
    off = off_family(m, "Hugging Face export")
    if off:
        raise HFError(off)
    given = sink_options(m)
    if given:
        raise HFError(f"{given}: transformers' {'GPT2' if m.arch == 'gpt2' else 'Llama'}ForCausalLM has no learned "
                      f"attention sinks; export a model trained with model.sink_logits=false and model.sink_tokens=0")
    ids = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id))
           if v is not None and v >= 0}
    if m.moe_experts and (m.moe_first_layer, m.moe_every) != (0, 1):
        raise HFError(f"model.moe_first_layer={m.moe_first_layer}, model.moe_every={m.moe_every}: "
                      f"MixtralForCausalLM has every layer mixture-of-experts; export a model trained with "
                      f"model.moe_first_layer=0 and model.moe_every=1")
    if m.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
                "n_positions": m.max_seq_len, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
                "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "tie_word_embeddings": m.tie_embeddings, "use_cache": True, "torch_dtype": dtype, **ids}
    common = {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
              "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
              "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
              "rope_scaling": None, "hidden_act": "silu"}
    tail = {"tie_word_embeddings": m.tie_embeddings, "use_cache": True, "torch_dtype": dtype, **ids}
    if m.moe_experts:
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                "intermediate_size": m.moe_d_ff, "num_local_experts": m.moe_experts,
                "num_experts_per_tok": m.moe_experts_per_token, "router_aux_loss_coef": m.moe_aux_loss_coef,
                "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None,
                "attention_dropout": 0.0, **tail}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "intermediate_size": m.d_ff,
            "attention_bias": False, "mlp_bias": False, **tail}


# --------------------------------------------------------------------------- RoPE row order


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face half-split rows -> adjacent-pair rows, per head (w: [n_heads * Dh, ...])."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute`: adjacent-pair rows -> Hugging Face half-split rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- the tensor table


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and the Atlas param(s) it holds.

    to_atlas(hf array) -> one array per path; to_hf(arrays in path order) -> the Hugging Face array.
    expert: set for a Mixtral expert's tensor, which holds slice [expert] of a stacked [E, ...] param
    (to_atlas and to_hf then see that slice)."""
    hf_name: str
    paths: tuple[str, ...]
    to_atlas: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    expert: int | None = None


def _same(x):
    return (x,)


def _t(x):
    return (np.ascontiguousarray(x.T),)


def _entries_gpt2(m: ModelConfig) -> Iterator[Entry]:
    d = m.d_model
    yield Entry("wte.weight", ("embed/embedding",), _same, lambda x: x)
    yield Entry("wpe.weight", ("pos_embed/embedding",), _same, lambda x: x)
    for i in range(m.n_layers):
        h, a = f"h.{i}", f"layers_{i}"
        for hf_ln, at_ln in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            yield Entry(f"{h}.{hf_ln}.weight", (f"{a}/{at_ln}/scale",), _same, lambda x: x)
            yield Entry(f"{h}.{hf_ln}.bias", (f"{a}/{at_ln}/bias",), _same, lambda x: x)
        for kind in ("weight", "bias"):
            leaf = "kernel" if kind == "weight" else "bias"
            yield Entry(f"{h}.attn.c_attn.{kind}", tuple(f"{a}/attn/w{c}/{leaf}" for c in "qkv"),
                        lambda x: tuple(np.ascontiguousarray(p) for p in np.split(x, [d, 2 * d], axis=-1)),
                        lambda q, k, v: np.concatenate([q, k, v], axis=-1))
            for hf_l, at_l in (("attn.c_proj", "attn/wo"), ("mlp.c_fc", "mlp/w_up"), ("mlp.c_proj", "mlp/w_down")):
                yield Entry(f"{h}.{hf_l}.{kind}", (f"{a}/{at_l}/{leaf}",), _same, lambda x: x)
    yield Entry("ln_f.weight", ("final_norm/scale",), _same, lambda x: x)
    yield Entry("ln_f.bias", ("final_norm/bias",), _same, lambda x: x)


def _entries_llama(m: ModelConfig) -> Iterator[Entry]:
    yield Entry("model.embed_tokens.weight", ("embed/embedding",), _same, lambda x: x)
    for i in range(m.n_layers):
        h, a = f"model.layers.{i}", f"layers_{i}"
        yield Entry(f"{h}.input_layernorm.weight", (f"{a}/attn_norm/scale",), _same, lambda x: x)
        yield Entry(f"{h}.post_attention_layernorm.weight", (f"{a}/mlp_norm/scale",), _same, lambda x: x)
        for proj, heads in (("q", m.n_heads), ("k", m.n_kv_heads)):
            yield Entry(f"{h}.self_attn.{proj}_proj.weight", (f"{a}/attn/w{proj}/kernel",),
                        lambda x, n=heads: _t(permute(x, n)),
                        lambda x, n=heads: unpermute(np.ascontiguousarray(x.T), n))
        yield Entry(f"{h}.self_attn.v_proj.weight", (f"{a}/attn/wv/kernel",), _t, lambda x: np.ascontiguousarray(x.T))
        yield Entry(f"{h}.self_attn.o_proj.weight", (f"{a}/attn/wo/kernel",), _t, lambda x: np.ascontiguousarray(x.T))
        if m.is_moe_layer(i):
            yield from _entries_moe(m, f"{h}.block_sparse_moe", f"{a}/moe")
            continue
        for proj in ("gate", "up", "down"):
            yield Entry(f"{h}.mlp.{proj}_proj.weight", (f"{a}/mlp/w_{proj}/kernel",), _t,
                        lambda x: np.ascontiguousarray(x.T))
    yield Entry("model.norm.weight", ("final_norm/scale",), _same, lambda x: x)


def _entries_moe(m: ModelConfig, h: str, a: str) -> Iterator[Entry]:
    yield Entry(f"{h}.gate.weight", (f"{a}/router/kernel",), _t, lambda x: np.ascontiguousarray(x.T))
    for e in range(m.moe_experts):
        for w, at in (("w1", "w_gate"), ("w2", "w_down"), ("w3", "w_up")):
            yield Entry(f"{h}.experts.{e}.{w}.weight", (f"{a}/{at}",), _t, lambda x: np.ascontiguousarray(x.T), e)


def tensor_table(m: ModelConfig) -> list[Entry]:
    """Every Hugging Face tensor of a model with config `m`, in Hugging Face's own order."""
    entries = list(_entries_gpt2(m) if m.arch == "gpt2" else _entries_llama(m))
    if not m.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head/kernel",), _t, lambda x: np.ascontiguousarray(x.T)))
    return entries


def canonical_name(name: str, m: ModelConfig) -> str:
    """A checkpoint's tensor name in the table's spelling (GPT2Model checkpoints have no 'transformer.';
    LlamaModel ones no 'model.')."""
    if m.arch == "gpt2":
        return name.removeprefix("transformer.")
    if name != "lm_head.weight" and not name.startswith("model."):
        return "model." + name
    return name


def is_ignored(name: str, m: ModelConfig) -> bool:
    """Buffers, and a tied model's lm_head copy (some checkpoints store it; it equals the embedding)."""
    return name.endswith(IGNORED_SUFFIXES) or (m.tie_embeddings and name == "lm_head.weight")


# --------------------------------------------------------------------------- param trees


def flat_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a/b/c': leaf} of a nested dict."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flat_paths(v, p))
        else:
            out[p] = v
    return out


def nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
