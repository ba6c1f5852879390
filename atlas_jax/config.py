"""Typed configuration: dataclasses, YAML files, `section.key=value` overrides, validation.

One name per thing: a dataclass field, its YAML key and its CLI override are the same word
(`model.d_model`, `train.lr`). Derived values (n_kv_heads, d_ff) are filled in `resolve`, the only
place that computes them; a resolved config written with `save_config` loads back equal.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atlas_jax.errors import ConfigError

ARCHS = ("llama", "gpt2")
POSITIONS = ("rope", "learned", "none")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
# Each family is a preset over the options (None in ModelConfig -> the family's value); arch also decides biases.
FAMILY_OPTIONS = {"llama": {"positions": "rope", "norm": "rms", "mlp": "swiglu"},
                  "gpt2": {"positions": "learned", "norm": "layer", "mlp": "gelu"}}
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "blocked")
MATMUL_IMPLS = ("auto", "rowmajor", "xla")
MOE_IMPLS = ("auto", "grouped", "ragged", "dense")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZER_TYPES = ("bpe", "unigram", "bytelevel")  # sentencepiece bpe/unigram; GPT-2-style byte-level BPE
TRACKERS = ("tensorboard", "mlflow", "none")
OBJECTIVES = ("lm", "sft", "dpo")
BASE_QUANTS = ("none", "int8", "nf4")
DPO_REFERENCES = ("on_the_fly", "once")


@dataclass
class ModelConfig:
    arch: str = "llama"  # llama | gpt2: the family (a preset of the three options below) and biases (gpt2 only)
    # Architecture options, None -> the family's (llama: rope/rms/swiglu, gpt2: learned/layer/gelu).
    # GGUF and Hugging Face export take only a family's own combination.
    positions: str | None = None  # rope (RoPE in attention) | learned (a position table added to the embedding) | none
    norm: str | None = None  # rms (RMSNorm) | layer (LayerNorm, scale and bias)
    mlp: str | None = None  # swiglu (w_gate, w_up, w_down; d_ff 8/3*d_model) | gelu (w_up, w_down; d_ff 4*d_model)
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (llama); gpt2 always n_heads
    d_ff: int | None = None  # None -> swiglu: 8/3*d_model rounded up to ffn_multiple_of; gelu: 4*d_model
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    compute_dtype: str = "float32"  # float32 | bfloat16
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    # auto (cudnn on a GPU in bf16/f16, xla on a GPU in f32, elsewhere blocked from seq 256, einsum below) | xla
    # (jax.nn.dot_product_attention) | cudnn | einsum (grouped einsums, fastest on CPU at short T) |
    # blocked (kernels.blocked_attention: FlashAttention-2 style, no [T, S] scores, memory linear in T;
    # training/eval forward only, the KV-cache decode path keeps the grouped einsums)
    attention: str = "auto"
    # model.attention=blocked: query/key block size; None -> kernels.auto_block (64, 128 or 256 by the
    # sequence and the score tile's size, the fastest of each measured on CPU: docs/benchmarks.md)
    attention_block: int | None = None
    # auto (rowmajor on CPU without remat, xla elsewhere) | rowmajor (atlas_jax.kernels: weight
    # gradients that keep the output gradient row-major, fastest on CPU) | xla (plain dot_general)
    matmul: str = "auto"
    # Mixture-of-experts FFN (llama only; atlas_jax/moe.py): 0 experts = dense. Layer i is MoE when
    # i >= moe_first_layer and (i - moe_first_layer) % moe_every == 0: all layers (0, 1), every other
    # (moe_every=2), from layer n on (moe_first_layer=n).
    moe_experts: int = 0
    moe_experts_per_token: int = 2
    moe_first_layer: int = 0
    moe_every: int = 1
    moe_d_ff: int | None = None  # each expert's SwiGLU width; None -> d_ff
    moe_aux_loss_coef: float = 0.01  # Switch load-balancing loss (1.0 when balanced), times this
    moe_z_loss_coef: float = 0.0  # ST-MoE router z-loss, times this (0 = off)
    # auto (grouped on CPU, ragged elsewhere) | grouped (block-grouped matmuls, fastest measured on
    # CPU) | ragged (jax.lax.ragged_dot) | dense (every expert over every token)
    moe_impl: str = "auto"
    # Expert parallelism (a train.mesh expert axis P > 1: tokens travel to their experts' devices by
    # all_to_all). 0 = dropless (each device's buffer for each other device holds all its N*K
    # assignments); > 0: that buffer holds ceil(factor * N*K / P) rows and the assignments past it are
    # dropped (counted in the moe_dropped metric), as Switch/GShard's capacity factor.
    moe_capacity_factor: float = 0.0
    # Attention sinks (docs/streaming.md). sink_logits: a learned logit per head (layers_i/attn/sink [H])
    # joins each query row's softmax as an extra column that is then dropped (gpt-oss); einsum
    # attention only. sink_tokens: n learned vectors (sink/embedding [n, D]) prepended to every
    # sequence at positions 0..n-1 (StreamingLLM's pre-trained sink), their logits dropped; 0 = off.
    sink_logits: bool = False
    sink_tokens: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_experts > 0 and i >= self.moe_first_layer and (i - self.moe_first_layer) % self.moe_every == 0


@dataclass
class DataConfig:
    # Known corpus names (tinyshakespeare), files, directories or globs of .txt / .jsonl.
    sources: list[str] = field(default_factory=lambda: ["tinyshakespeare"])
    doc_separator: str | None = None  # .txt: None -> the whole file is one document
    text_field: str = "text"  # .jsonl: the field holding the text
    # a tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face) file; None -> the data dir's own,
    # trained if missing: <data_dir>/tokenizer.json for bytelevel, <data_dir>/tokenizer.model otherwise
    tokenizer: str | None = None
    tokenizer_type: str = "bpe"  # bpe | unigram (sentencepiece) | bytelevel (byte-level BPE, tokenizers)
    data_dir: str | None = None  # prepared shards; None -> <run_dir>/data
    seq_len: int = 256
    val_fraction: float = 0.1
    split_seed: int = 0
    num_workers: int = 2
    # train.objective sft | dpo: a built-in chat template (chatml) or a .jinja file (atlas_jax/finetune/templates.py)
    chat_template: str = "chatml"
    # train.objective sft: pack conversations greedily into rows of seq_len + 1 (attention kept inside
    # each one: the batch gains "segment_ids" and "positions") instead of one padded row each; dpo: padded
    pack: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    batch_size: int = 32  # global batch, in sequences
    microbatches: int = 1  # gradient accumulation inside the step
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20
    checkpoint_interval: int = 500
    keep: int = 3
    seed: int = 0
    # [data, fsdp] or [data, fsdp, expert]; -1 = all remaining devices. The batch is split over every
    # axis; fsdp splits params and optimizer state; expert (MoE only) puts moe_experts/expert experts
    # on each device (expert parallelism). A 2-entry mesh means expert=1.
    mesh: list[int] = field(default_factory=lambda: [-1, 1])
    max_nonfinite_steps: int = 10
    tracking: str = "tensorboard"  # tensorboard | mlflow | none (metrics.jsonl is always written)
    tracking_uri: str | None = None  # mlflow: None -> sqlite:///<run_dir>/../mlflow.db (local); http(s)://server
    # run:PATH (another run's params) | hf:SRC (a Hugging Face model dir or hub id): the first step starts
    # from that model's params, architecture and tokenizer, with a fresh optimizer and schedule.
    init_from: str | None = None
    # lm: next-token loss on text shards | sft: loss on the assistant tokens of chat JSONL | dpo: the DPO
    # loss on preference pairs (JSONL), against the frozen starting model (atlas_jax/finetune/)
    objective: str = "lm"
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0  # conservative DPO: the chance a preference label is flipped
    # RPO (Pang et al. 2024; trl's rpo_alpha): add rpo_alpha x the chosen replies' per-token NLL to the DPO
    # loss, so the chosen answers' likelihood is held up while the pair's margin grows; 0 = plain DPO
    rpo_alpha: float = 0.0
    # on_the_fly: the reference's log-probs computed in every step | once: for all train pairs before step 1
    dpo_reference: str = "on_the_fly"


@dataclass
class SampleConfig:
    temperature: float = 0.8
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    max_new_tokens: int = 200
    seed: int = 0
    # Streaming generation past model.max_seq_len (StreamingLLM, llama only): window > 0 keeps a KV
    # cache of `window` tokens (plus the model's sink_tokens): the first n_sink tokens and a rolling
    # window of the latest window - n_sink, positions assigned within the cache. 0 = off.
    window: int = 0
    n_sink: int = 4


@dataclass
class LoraConfig:
    """LoRA adapters on a frozen base (train.init_from): W + (alpha / rank) * A B (atlas_jax/lora.py)."""
    rank: int = 0  # 0: no adapters (full training)
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # q k v o gate up down head | all
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    base_quant: str = "none"  # none | int8 (per channel) | nf4 (QLoRA's 4-bit blocks): how the frozen base is held


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


SECTIONS = typing.get_type_hints(Config)


# --------------------------------------------------------------------------- typing


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key '{key}'; {hint}")


def _build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(str(key), list(hints), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def from_dict(d: dict | None, source: str = "config") -> Config:
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    sections = {}
    for name, value in d.items():
        if name not in SECTIONS:
            raise _unknown_key(str(name), list(SECTIONS), source)
        sections[name] = _build_section(SECTIONS[name], value or {}, f"{source}: {name}")
    return Config(**sections)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.d_model=128' -> ('model', 'd_model', 128); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. train.lr=3e-4")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. train.lr=3e-4")
    section, key = parts
    if section not in SECTIONS:
        raise _unknown_key(section, list(SECTIONS), f"override '{text}'")
    hints = _field_types(SECTIONS[section])
    if key not in hints:
        raise _unknown_key(key, list(hints), f"override '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # A plain string field keeps what was typed (so train.run_dir=123 stays "123").
    if hints[key] in (str, str | None) and value is not None and not isinstance(value, str):
        value = raw
    return section, key, _coerce(value, hints[key], f"override '{text}'")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        section, key, value = parse_override(text)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})
    return cfg


# --------------------------------------------------------------------------- derive + validate


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


def resolve_model(m: ModelConfig) -> ModelConfig:
    """Fill the model's derived values (the one place they are computed) and validate it."""
    _choice(m.arch, ARCHS, "model.arch")
    m = dataclasses.replace(m, **{k: v for k, v in FAMILY_OPTIONS[m.arch].items() if getattr(m, k) is None})
    n_kv = m.n_heads if (m.n_kv_heads is None or m.arch == "gpt2") else m.n_kv_heads
    if m.d_ff is not None:
        d_ff = m.d_ff
    elif m.mlp == "gelu":
        d_ff = 4 * m.d_model
    else:  # SwiGLU keeps the MLP's parameter count near 2*4*d^2 with 3 matrices.
        d_ff = _round_up(8 * m.d_model / 3, max(m.ffn_multiple_of, 1))
    validate_model(m)
    moe_d_ff = (m.moe_d_ff or d_ff) if m.moe_experts > 0 else m.moe_d_ff
    return dataclasses.replace(m, n_kv_heads=n_kv, d_ff=d_ff, moe_d_ff=moe_d_ff)


def resolve(cfg: Config) -> Config:
    """Fill the derived values, then validate the whole config."""
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    validate(cfg)
    return cfg


def _choice(value: str, options: tuple, where: str) -> None:
    if value not in options:
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(options)}")


def _check_positive(values: dict, strict: bool) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if (value <= 0) if strict else (value < 0):
            raise ConfigError(f"{key} must be {'positive' if strict else '>= 0'}, got {value}")


def validate_model(m: ModelConfig) -> None:
    _choice(m.arch, ARCHS, "model.arch")
    for key, options in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
        if getattr(m, key) is not None:
            _choice(getattr(m, key), options, f"model.{key}")
    _choice(m.compute_dtype, DTYPES, "model.compute_dtype")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    _choice(m.remat, REMAT_POLICIES, "model.remat")
    _choice(m.attention, ATTENTION_IMPLS, "model.attention")
    _choice(m.matmul, MATMUL_IMPLS, "model.matmul")
    _check_positive({
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.max_seq_len": m.max_seq_len,
        "model.ffn_multiple_of": m.ffn_multiple_of, "model.n_kv_heads": m.n_kv_heads,
        "model.d_ff": m.d_ff, "model.rope_theta": m.rope_theta, "model.attention_block": m.attention_block},
        strict=True)
    _check_positive({"model.norm_eps": m.norm_eps}, strict=False)
    validate_moe(m)
    validate_sinks(m)
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
            f"pick n_heads from the divisors of d_model")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
            f"use a divisor of n_heads (1 = multi-query, n_heads = multi-head)")
    if m.positions == "rope" and m.head_dim % 2:
        raise ConfigError(f"model: head_dim = d_model/n_heads = {m.head_dim} must be even for RoPE")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    validate_precision(m)


def off_family(m: ModelConfig, exporter: str) -> str | None:
    """None when a resolved `m` has its family's own options, else the one line an exporter that carries
    only the presets raises: the options that differ and the nearest model that exports (the same arch,
    those options set back to the family's)."""
    preset = FAMILY_OPTIONS[m.arch]
    off = [k for k in preset if getattr(m, k) != preset[k]]
    if not off:
        return None
    return (f"{', '.join(f'model.{k}={getattr(m, k)}' for k in off)} with model.arch={m.arch}: {exporter} carries "
            f"{m.arch} as {'+'.join(preset.values())} only; the nearest model that exports is trained with "
            f"{', '.join(f'model.{k}={preset[k]}' for k in off)} (model.arch={m.arch}'s preset)")


def sink_options(m: ModelConfig) -> str | None:
    """The attention-sink options a model uses ("model.sink_logits=true and model.sink_tokens=2"), or
    None: what exporters that cannot carry them name in their refusal."""
    given = [x for x in ("model.sink_logits=true" if m.sink_logits else "",
                         f"model.sink_tokens={m.sink_tokens}" if m.sink_tokens else "") if x]
    return " and ".join(given) or None


def validate_expert_axis(moe_experts: int, expert: int) -> None:
    """The expert mesh axis (train.mesh[2], -1 = the rest) against model.moe_experts; sharding checks a -1
    once the device count is known."""
    if expert != 1 and moe_experts == 0:
        raise ConfigError(f"train.mesh expert axis {expert} needs a mixture-of-experts model (model.moe_experts=0 "
                          f"is dense); set model.moe_experts, or use a 2-entry train.mesh [data, fsdp]")
    if expert > 1 and moe_experts % expert:
        raise ConfigError(f"train.mesh expert axis {expert} does not divide model.moe_experts={moe_experts}; "
                          f"use an expert axis that divides {moe_experts}")


def validate_moe(m: ModelConfig) -> None:
    _choice(m.moe_impl, MOE_IMPLS, "model.moe_impl")
    _check_positive({"model.moe_experts": m.moe_experts, "model.moe_first_layer": m.moe_first_layer,
                     "model.moe_aux_loss_coef": m.moe_aux_loss_coef,
                     "model.moe_z_loss_coef": m.moe_z_loss_coef,
                     "model.moe_capacity_factor": m.moe_capacity_factor}, strict=False)
    if m.moe_experts == 0:
        return
    _check_positive({"model.moe_experts_per_token": m.moe_experts_per_token, "model.moe_every": m.moe_every,
                     "model.moe_d_ff": m.moe_d_ff}, strict=True)
    if m.arch != "llama":
        raise ConfigError(
            f"model.moe_experts={m.moe_experts} with model.arch={m.arch}: mixture-of-experts is built for "
            f"arch=llama only (SwiGLU experts, as Mixtral and llama.cpp's llama architecture); set model.arch=llama "
            f"or model.moe_experts=0")
    if m.moe_experts_per_token > m.moe_experts:
        raise ConfigError(
            f"model.moe_experts_per_token={m.moe_experts_per_token} is more than model.moe_experts={m.moe_experts}; "
            f"pick 1..{m.moe_experts} experts per token")
    if m.moe_first_layer >= m.n_layers:
        raise ConfigError(
            f"model.moe_first_layer={m.moe_first_layer} leaves no MoE layer in model.n_layers={m.n_layers}; "
            f"use 0..{m.n_layers - 1}, or model.moe_experts=0 for a dense model")


def validate_sinks(m: ModelConfig) -> None:
    _check_positive({"model.sink_tokens": m.sink_tokens}, strict=False)
    if m.sink_logits and m.attention in ("xla", "cudnn"):
        raise ConfigError(
            f"model.sink_logits with model.attention={m.attention}: jax.nn.dot_product_attention has no sink "
            f"column; use model.attention=einsum or blocked (or auto, which picks one of them for sink logits)")


def validate_sample_window(s: SampleConfig, m: ModelConfig) -> None:
    """sample.window / sample.n_sink (streaming generation) against the model they run on."""
    _check_positive({"sample.window": s.window, "sample.n_sink": s.n_sink}, strict=False)
    if s.window == 0:
        return
    if s.n_sink >= s.window:
        raise ConfigError(f"sample.n_sink={s.n_sink} leaves no rolling window in sample.window={s.window}; "
                          f"use n_sink < window, e.g. sample.n_sink=4 sample.window={max(s.window, 8)}")
    if s.window > m.max_seq_len:
        raise ConfigError(f"sample.window={s.window} is longer than model.max_seq_len={m.max_seq_len} (positions "
                          f"in the cache must stay in the trained range); use sample.window<={m.max_seq_len}")
    positions = m.positions or FAMILY_OPTIONS[m.arch]["positions"]
    if positions != "rope":
        raise ConfigError(f"sample.window with model.positions={positions}: a cached key cannot move to a new "
                          f"position without RoPE (learned positions are added to the input); streaming needs "
                          f"model.positions=rope (model.arch=llama), or set sample.window=0")


def validate_precision(m: ModelConfig) -> None:
    """The mixed-precision policy: float32 params (AdamW's master weights), compute in float32 or
    bfloat16. float16 would need loss scaling, which Atlas does not implement."""
    if m.param_dtype != "float32":
        raise ConfigError(
            f"model.param_dtype={m.param_dtype}: AdamW keeps float32 master weights, so params stay float32; "
            f"for bf16 math set model.compute_dtype=bfloat16 (params are cast to it inside each layer)")
    if m.compute_dtype == "float16":
        raise ConfigError(
            "model.compute_dtype=float16 needs dynamic loss scaling, which Atlas does not implement; "
            "use model.compute_dtype=bfloat16 (the same memory, float32's exponent range)")
    if m.attention == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError(
            "model.attention=cudnn: cuDNN's fused attention takes bfloat16/float16 only; set "
            "model.compute_dtype=bfloat16, or model.attention=auto (xla in float32)")
    if m.matmul == "rowmajor" and m.remat != "none":
        raise ConfigError(
            f"model.matmul=rowmajor with model.remat={m.remat}: the remat policy must see plain dot_generals; "
            f"use model.matmul=auto (or xla) with remat")


INIT_KINDS = ("run", "hf")


def validate(cfg: Config) -> None:
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    validate_model(m)
    for key, seed in (("train.seed", t.seed), ("data.split_seed", d.split_seed), ("sample.seed", s.seed)):
        if not 0 <= seed < 2**32:  # numpy's and sentencepiece's seeds are unsigned 32-bit
            raise ConfigError(f"{key} must be in [0, 2**32), got {seed}")
    _choice(t.objective, OBJECTIVES, "train.objective")
    _choice(t.dpo_reference, DPO_REFERENCES, "train.dpo_reference")
    if t.objective != "lm" and t.init_from is None:
        raise ConfigError(f"train.objective={t.objective} fine-tunes a model: set train.init_from=run:PATH or hf:SRC")
    if t.dpo_beta <= 0:
        raise ConfigError(f"train.dpo_beta must be positive, got {t.dpo_beta}")
    if not 0.0 <= t.dpo_label_smoothing < 0.5:
        raise ConfigError(f"train.dpo_label_smoothing must be in [0, 0.5), got {t.dpo_label_smoothing}")
    if t.rpo_alpha < 0:
        raise ConfigError(f"train.rpo_alpha must be >= 0 (0 = plain DPO), got {t.rpo_alpha}")
    if d.pack and t.objective != "sft":
        raise ConfigError(f"data.pack packs SFT conversations; train.objective={t.objective} takes no packing "
                          "(set data.pack: false)")
    lo = cfg.lora
    if lo.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = no adapters), got {lo.rank}")
    if lo.rank > 0:
        if t.init_from is None:
            raise ConfigError("lora.rank > 0 adapts a frozen base model: set train.init_from=run:PATH or hf:SRC")
        if lo.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {lo.alpha}")
        if not 0.0 <= lo.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
        _choice(lo.base_quant, BASE_QUANTS, "lora.base_quant")
        if not lo.targets:
            raise ConfigError("lora.targets is empty; name layers (q k v o gate up down head) or all")
    if t.init_from is not None:
        kind, _, src = t.init_from.partition(":")
        if kind not in INIT_KINDS or not src.strip():
            raise ConfigError(f"train.init_from: '{t.init_from}' is not run:PATH (another Atlas run) or hf:SRC "
                              f"(a Hugging Face model directory or hub id)")
    _choice(t.schedule, SCHEDULES, "train.schedule")
    _choice(t.tracking, TRACKERS, "train.tracking")
    _choice(d.tokenizer_type, TOKENIZER_TYPES, "data.tokenizer_type")
    _check_positive({
        "data.seq_len": d.seq_len, "data.num_workers": d.num_workers,
        "train.batch_size": t.batch_size, "train.microbatches": t.microbatches, "train.steps": t.steps,
        "train.log_interval": t.log_interval, "train.eval_interval": t.eval_interval,
        "train.eval_batches": t.eval_batches, "train.checkpoint_interval": t.checkpoint_interval,
        "train.keep": t.keep, "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "sample.max_new_tokens": s.max_new_tokens}, strict=True)
    _check_positive({
        "train.lr": t.lr, "train.min_lr": t.min_lr, "train.warmup_steps": t.warmup_steps,
        "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip, "train.eps": t.eps,
        "sample.temperature": s.temperature, "sample.top_k": s.top_k}, strict=False)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is larger than model.max_seq_len={m.max_seq_len}; "
            f"lower data.seq_len or raise model.max_seq_len")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if not d.sources:
        raise ConfigError("data.sources is empty; name a corpus (tinyshakespeare) or .txt/.jsonl files")
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise ConfigError(f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    if len(t.mesh) not in (2, 3) or any(v == 0 or v < -1 for v in t.mesh) or t.mesh.count(-1) > 1:
        raise ConfigError(
            f"train.mesh={t.mesh}: expected [data, fsdp] or [data, fsdp, expert] with positive sizes and at "
            f"most one -1, e.g. [-1, 1]")
    validate_expert_axis(m.moe_experts, t.mesh[2] if len(t.mesh) == 3 else 1)
    if m.moe_capacity_factor > 0 and (len(t.mesh) < 3 or t.mesh[2] == 1):
        raise ConfigError(f"model.moe_capacity_factor={m.moe_capacity_factor} applies to expert parallelism only "
                          f"(train.mesh [data, fsdp, expert] with expert > 1); set model.moe_capacity_factor=0 "
                          f"(dropless) or give train.mesh an expert axis")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"sample.top_p must be in (0, 1], got {s.top_p}")
    validate_sample_window(s, m)


# --------------------------------------------------------------------------- files


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                                  f"keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, resolve."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; see configs/ for examples")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if raw is None:
            raise ConfigError(f"{path}: the file is empty; give at least one section ({', '.join(SECTIONS)}), "
                              f"or leave out --config to use the defaults")
        cfg = from_dict(raw, source=str(path))
    return resolve(apply_overrides(cfg, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
