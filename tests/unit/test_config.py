"""atlas_jax.config: YAML files, typed `section.key=value` overrides, derived values, one-line errors."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest

from atlas_jax.config import Config, ModelConfig, load_config, resolve, resolve_model, save_config
from atlas_jax.errors import AtlasError, ConfigError

TINY_YAML = """\
model:
  arch: llama
  vocab_size: 300
  d_model: 96
  n_layers: 2
  n_heads: 4
  max_seq_len: 64
data:
  seq_len: 32
train:
  batch_size: 8
  lr: 0.001
"""


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loading and resolving


def test_yaml_values_land_in_their_sections_and_the_rest_are_defaults(tmp_path):
    cfg = load_config(write(tmp_path, TINY_YAML))
    assert (cfg.model.vocab_size, cfg.model.d_model, cfg.data.seq_len, cfg.train.batch_size) == (300, 96, 32, 8)
    assert cfg.train.lr == 0.001 and cfg.train.steps == Config().train.steps


def test_no_file_gives_the_resolved_defaults_and_an_empty_file_is_refused(tmp_path):
    assert load_config(None) == resolve(Config())
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match="the file is empty; give at least one section"):
            load_config(write(tmp_path, text))


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: key 'd_model' appears twice \(lines 2 and 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'model' appears twice \(lines 1 and 3\)"):
        load_config(write(tmp_path, "model:\n  d_model: 64\nmodel:\n  n_layers: 2\n"))


def test_resolve_fills_llama_derived_values(tmp_path):
    m = load_config(write(tmp_path, TINY_YAML)).model
    assert m.n_kv_heads == 4  # None -> n_heads
    assert m.d_ff == 256  # 8/3 * 96 = 256, already a multiple of ffn_multiple_of=64
    m = load_config(write(tmp_path, TINY_YAML), ["model.d_model=64", "model.n_kv_heads=2"]).model
    assert (m.n_kv_heads, m.d_ff) == (2, 192)  # 8/3 * 64 = 170.7 -> rounded up to 192


def test_resolve_fills_gpt2_derived_values(tmp_path):
    m = load_config(write(tmp_path, TINY_YAML), ["model.arch=gpt2", "model.n_kv_heads=2"]).model
    assert (m.n_kv_heads, m.d_ff) == (4, 4 * 96)  # gpt2 has no grouped attention


@pytest.mark.parametrize("arch, want", [("llama", ("rope", "rms", "swiglu")), ("gpt2", ("learned", "layer", "gelu"))])
def test_architecture_options_default_to_the_family(tmp_path, arch, want):
    m = load_config(write(tmp_path, TINY_YAML), [f"model.arch={arch}"]).model
    assert (m.positions, m.norm, m.mlp) == want
    # A config saved before the options existed (no such keys) resolves to the same model.
    old = {k: v for k, v in dataclasses.asdict(m).items() if k not in ("positions", "norm", "mlp")}
    assert resolve_model(ModelConfig(**old)) == m


def test_architecture_options_override_the_family(tmp_path):
    m = load_config(write(tmp_path, TINY_YAML), ["model.positions=none", "model.norm=layer", "model.mlp=gelu"]).model
    assert (m.arch, m.positions, m.norm, m.mlp, m.d_ff) == ("llama", "none", "layer", "gelu", 4 * 96)
    m = load_config(write(tmp_path, TINY_YAML), ["model.arch=gpt2", "model.mlp=swiglu"]).model
    assert (m.positions, m.mlp, m.d_ff) == ("learned", "swiglu", 256)
    # Without RoPE an odd head_dim is fine.
    assert load_config(write(tmp_path, TINY_YAML), ["model.d_model=36", "model.positions=learned"]).model.head_dim == 9


def test_explicit_d_ff_is_kept(tmp_path):
    assert load_config(write(tmp_path, TINY_YAML), ["model.d_ff=100"]).model.d_ff == 100


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("override, section, key, want", [
    ("train.lr=1", "train", "lr", 1.0),  # an int for a float
    ("train.lr=3.0e-4", "train", "lr", 3e-4),
    ("train.lr=3e-4", "train", "lr", 3e-4),
    ("model.tie_embeddings=false", "model", "tie_embeddings", False),
    ("model.n_kv_heads=null", "model", "n_kv_heads", 4),  # null for an optional, then resolved
    ("model.d_ff=null", "model", "d_ff", 256),
    ("data.tokenizer=null", "data", "tokenizer", None),
    ("data.tokenizer=123", "data", "tokenizer", "123"),  # a string field keeps what was typed
    ("train.run_dir=runs/x=1", "train", "run_dir", "runs/x=1"),  # only the first '=' splits
    ("train.mesh=[2, 1]", "train", "mesh", [2, 1]),
    ("train.mesh=[2, 4, 1]", "train", "mesh", [2, 4, 1]),  # [data, fsdp, expert]
    ("data.sources=[a.txt, b.jsonl]", "data", "sources", ["a.txt", "b.jsonl"]),
    ("data.sources=a.txt", "data", "sources", ["a.txt"]),  # one string for a list of strings
])
def test_overrides_are_typed_by_the_dataclass(tmp_path, override, section, key, want):
    got = getattr(getattr(load_config(write(tmp_path, TINY_YAML), [override]), section), key)
    assert got == want and type(got) is type(want), f"{override} -> {got!r}"


@pytest.mark.parametrize("where", ["override", "file"])
def test_float_in_e_notation_without_a_dot_is_a_float(tmp_path, where):
    # PyYAML (YAML 1.1) reads 3e-4 without a dot as a string; float fields must still take it.
    if where == "override":
        cfg = load_config(write(tmp_path, TINY_YAML), ["train.lr=3e-4"])
    else:
        cfg = load_config(write(tmp_path, TINY_YAML.replace("lr: 0.001", "lr: 3e-4")))
    assert cfg.train.lr == 3e-4


def test_later_overrides_win(tmp_path):
    cfg = load_config(write(tmp_path, TINY_YAML), ["train.steps=5", "train.steps=7"])
    assert cfg.train.steps == 7


# --------------------------------------------------------------------------- errors


BAD_OVERRIDES = {  # id: (overrides, words the one-line message must contain)
    "unknown-key": (["model.d_modle=64"], ["d_modle", "did you mean d_model"]),
    "unknown-section": (["modle.d_model=64"], ["modle", "did you mean model"]),
    "no-equals": (["model.d_model"], ["section.key=value"]),
    "no-section": (["d_model=64"], ["section.key=value"]),
    "str-for-int": (["model.d_model=abc"], ["model.d_model=abc", "expected int", "'abc'"]),
    "float-for-int": (["model.n_layers=2.5"], ["expected int"]),
    "int-for-bool": (["model.tie_embeddings=3"], ["expected bool"]),
    "str-for-float": (["train.lr=fast"], ["expected float"]),
    "null-for-required": (["model.d_model=null"], ["expected int"]),
    "n_heads-not-dividing-d_model": (["model.n_heads=5"], ["n_heads=5", "d_model=96", "divide"]),
    "n_kv_heads-not-dividing-n_heads": (["model.n_kv_heads=3"], ["n_kv_heads=3", "n_heads=4", "divide"]),
    "zero-d_model": (["model.d_model=0"], ["model.d_model", "positive"]),
    "negative-n_layers": (["model.n_layers=-2"], ["model.n_layers", "positive"]),
    "zero-vocab": (["model.vocab_size=0"], ["model.vocab_size", "positive"]),
    "zero-n_kv_heads": (["model.n_kv_heads=0"], ["model.n_kv_heads", "positive"]),
    "negative-batch": (["train.batch_size=-1"], ["train.batch_size", "positive"]),
    "negative-lr": (["train.lr=-0.1"], ["train.lr", ">= 0"]),
    "zero-seq_len": (["data.seq_len=0"], ["data.seq_len", "positive"]),
    "seq_len-over-max_seq_len": (["data.seq_len=65"], ["data.seq_len=65", "max_seq_len=64"]),
    "microbatches-not-dividing": (["train.microbatches=3"], ["microbatches=3", "batch_size=8", "divide"]),
    "bad-arch": (["model.arch=mamba"], ["model.arch", "mamba", "llama"]),
    "bad-positions": (["model.positions=alibi"], ["model.positions", "alibi", "rope, learned, none"]),
    "bad-norm": (["model.norm=batch"], ["model.norm", "batch", "rms, layer"]),
    "bad-mlp": (["model.mlp=relu"], ["model.mlp", "relu", "swiglu, gelu"]),
    "odd-head-dim-for-rope": (["model.d_model=36", "model.n_heads=4"], ["head_dim", "even"]),
    "nan-lr": (["train.lr=.nan"], ["train.lr", "finite"]),
    "inf-lr": (["train.lr=inf"], ["train.lr", "finite"]),
    "minus-inf-temperature": (["sample.temperature=-.inf"], ["sample.temperature", "finite"]),
    "nan-as-string": (["train.weight_decay=nan"], ["train.weight_decay", "finite"]),
    "bf16-params": (["model.param_dtype=bfloat16"], ["model.param_dtype=bfloat16", "float32 master weights",
                                                     "compute_dtype=bfloat16"]),
    "f16-compute": (["model.compute_dtype=float16"], ["model.compute_dtype=float16", "loss scaling", "bfloat16"]),
    "cudnn-f32": (["model.attention=cudnn"], ["model.attention=cudnn", "bfloat16", "compute_dtype"]),
    "rowmajor-with-remat": (["model.matmul=rowmajor", "model.remat=dots"], ["model.matmul=rowmajor", "remat"]),
    "bad-tracker": (["train.tracking=wandb"], ["train.tracking", "mlflow"]),
    "moe-k-over-experts": (["model.moe_experts=4", "model.moe_experts_per_token=5"],
                           ["model.moe_experts_per_token=5", "more than model.moe_experts=4", "pick 1..4"]),
    "moe-k-zero": (["model.moe_experts=4", "model.moe_experts_per_token=0"], ["model.moe_experts_per_token", "positive"]),
    "moe-negative-experts": (["model.moe_experts=-1"], ["model.moe_experts", ">= 0"]),
    "moe-on-gpt2": (["model.arch=gpt2", "model.moe_experts=4"], ["model.moe_experts=4", "arch=llama only",
                                                                  "model.moe_experts=0"]),
    "moe-first-layer-past-the-end": (["model.moe_experts=4", "model.moe_first_layer=2"],
                                     ["model.moe_first_layer=2", "model.n_layers=2", "use 0..1"]),
    "moe-every-zero": (["model.moe_experts=4", "model.moe_every=0"], ["model.moe_every", "positive"]),
    "moe-negative-aux": (["model.moe_aux_loss_coef=-0.1"], ["model.moe_aux_loss_coef", ">= 0"]),
    "moe-bad-impl": (["model.moe_impl=sparse"], ["model.moe_impl", "grouped, ragged, dense"]),
    "sink-logits-with-xla": (["model.sink_logits=true", "model.attention=xla"],
                             ["model.sink_logits with model.attention=xla", "model.attention=einsum"]),
    "sink-logits-with-cudnn": (["model.sink_logits=true", "model.attention=cudnn", "model.compute_dtype=bfloat16"],
                               ["model.attention=cudnn", "no sink column", "model.attention=einsum"]),
    "zero-attention-block": (["model.attention=blocked", "model.attention_block=0"],
                             ["model.attention_block", "positive"]),
    "bad-attention": (["model.attention=flash"], ["model.attention", "flash", "einsum, blocked"]),
    "negative-sink-tokens": (["model.sink_tokens=-1"], ["model.sink_tokens", ">= 0"]),
    "n_sink-fills-the-window": (["sample.window=8", "sample.n_sink=8"],
                                ["sample.n_sink=8 leaves no rolling window in sample.window=8", "n_sink < window"]),
    "window-over-max_seq_len": (["sample.window=65"], ["sample.window=65", "model.max_seq_len=64", "window<=64"]),
    "window-on-gpt2": (["model.arch=gpt2", "sample.window=32"], ["sample.window with model.positions=learned",
                                                                  "RoPE", "sample.window=0"]),
    "window-without-rope": (["model.positions=none", "sample.window=32"], ["sample.window with model.positions=none",
                                                                          "model.positions=rope"]),
    "negative-n_sink": (["sample.window=8", "sample.n_sink=-1"], ["sample.n_sink", ">= 0"]),
    "negative-rpo_alpha": (["train.rpo_alpha=-1"], ["train.rpo_alpha must be >= 0", "plain DPO"]),
    "expert-axis-not-dividing-experts": (["model.moe_experts=6", "train.mesh=[1, 1, 4]"],
                                         ["train.mesh expert axis 4", "does not divide model.moe_experts=6",
                                          "divides 6"]),
    "expert-axis-on-a-dense-model": (["train.mesh=[1, 1, 2]"], ["train.mesh expert axis 2", "model.moe_experts=0",
                                                                 "2-entry train.mesh"]),
    "negative-capacity-factor": (["model.moe_experts=4", "model.moe_capacity_factor=-1"],
                                 ["model.moe_capacity_factor", ">= 0"]),
    "capacity-factor-without-expert-axis": (["model.moe_experts=4", "model.moe_capacity_factor=1.25"],
                                            ["model.moe_capacity_factor=1.25 applies to expert parallelism only",
                                             "model.moe_capacity_factor=0"]),
    "mesh-four-entries": (["train.mesh=[1, 1, 1, 1]"], ["train.mesh=[1, 1, 1, 1]", "[data, fsdp, expert]"]),
}


@pytest.mark.parametrize("overrides, words", list(BAD_OVERRIDES.values()), ids=list(BAD_OVERRIDES))
def test_bad_override_is_one_clear_line(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, TINY_YAML), overrides)
    msg = str(e.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    missing = [w for w in words if w not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


BAD_FILES = {  # id: (file text, words the message must contain; parse errors also name the file)
    "unknown-key": ("model:\n  d_modle: 64\n", ["d_modle", "did you mean d_model"]),
    "unknown-section": ("trian:\n  lr: 0.1\n", ["trian", "did you mean train"]),
    "wrong-type": ("model:\n  tie_embeddings: maybe\n", ["model.tie_embeddings", "expected bool"]),
    "section-not-a-mapping": ("model: 5\n", ["model", "mapping"]),
    "top-level-list": ("- model\n- train\n", ["mapping"]),
    "bad-yaml": ("model: {d_model: [64\n", ["not valid YAML"]),
    "tab-indent": ("model:\n\td_model: 64\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("text, words", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_file_is_one_line_naming_the_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    missing = [w for w in words + [str(path)] if w not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


def test_invalid_values_in_a_file_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.n_heads=7 does not divide model.d_model=96; [^\n]+$"):
        load_config(write(tmp_path, "model:\n  d_model: 96\n  n_heads: 7\n"))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml.*not found") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_config_errors_are_atlas_errors():
    assert issubclass(ConfigError, AtlasError)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("overrides", [
    [],
    ["model.arch=gpt2", "model.tie_embeddings=false", "data.tokenizer=tok.model", "train.mesh=[2, 4]",
     "data.sources=[a.txt, b.jsonl]", "train.lr=1", "model.compute_dtype=bfloat16"],
    ["model.positions=none", "model.norm=layer", "model.mlp=gelu"],
])
def test_save_config_then_load_config_is_equal(tmp_path, overrides):
    cfg = load_config(write(tmp_path, TINY_YAML), overrides)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_model_config_head_dim():
    assert ModelConfig(d_model=96, n_heads=4).head_dim == 24


def test_cudnn_in_bf16_is_accepted(tmp_path):
    cfg = load_config(None, ["model.attention=cudnn", "model.compute_dtype=bfloat16"])
    assert cfg.model.attention == "cudnn"


@pytest.mark.parametrize("kind, name, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0), ("NVIDIA H200", "H200", 989.4), ("TPU v5 lite", "TPU v5e", 197.0)])
def test_peak_flops_match_the_exact_device_kind(kind, name, tflops):
    from atlas_jax.devices import peak_for_kind

    peak = peak_for_kind(kind)
    assert peak is not None and peak.name.startswith(name) and peak.flops == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("kind", ["NVIDIA H100 PCIe-like", "H100", "cpu", "NVIDIA GeForce RTX 4090"])
def test_peak_flops_of_an_unknown_kind_is_none_not_a_near_match(kind):
    from atlas_jax.devices import peak_for_kind

    assert peak_for_kind(kind) is None
