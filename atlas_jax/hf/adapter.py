"""A LoRA run's adapters as a PEFT adapter directory, for the base exported to Hugging Face.

    export_adapter(run, out)    adapter_config.json + adapter_model.safetensors
    python -m atlas_jax.hf export LORA_RUN --out DIR --adapter

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_DIR), DIR)

BASE_HF_DIR is the base in Hugging Face form: the model train.init_from=hf:... named (written as
base_model_name_or_path), or `python -m atlas_jax.hf export BASE_RUN` of an Atlas base (then
base_model_name_or_path is a note saying so). PEFT computes W x + s B (A x) with s = lora_alpha / r
(use_rslora: / sqrt(r)), Atlas's own scale, so r, lora_alpha and use_rslora are the run's.

Tensors, `base_model.model.<module>.lora_{A,B}.weight`, lora_A [r, in] and lora_B [out, r] (Atlas's
lora_a [in, r] and lora_b [r, out] transposed; the modules from the tensor table of convert.py):

    llama   model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj, lm_head
            q/k lora_B rows unpermuted to Hugging Face's half-split RoPE order (convert.unpermute), as
            the base's q_proj/k_proj are: unpermute(B^T) A^T = unpermute((A B)^T)
    gpt2    transformer.h.{i}.attn.c_attn (q|k|v fused), attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head;
            Conv1D modules (fan_in_fan_out true). c_attn's adapter is the fused equivalent of the k
            adapted parts: lora_A stacked [k r, D], lora_B block-diagonal [3 D, k r], its rank and
            alpha given as rank_pattern / alpha_pattern so that its scale is the run's.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import Config, ModelConfig
from atlas_jax.hf.convert import HFError, flat_paths, unpermute
from atlas_jax.hf.io import WEIGHTS, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Atlas Dense path (under layers_{i}) -> (Hugging Face module under the layer, target_modules name)
LLAMA_MODULES = {"attn/wq": ("self_attn.q_proj", "q_proj"), "attn/wk": ("self_attn.k_proj", "k_proj"),
                 "attn/wv": ("self_attn.v_proj", "v_proj"), "attn/wo": ("self_attn.o_proj", "o_proj"),
                 "mlp/w_gate": ("mlp.gate_proj", "gate_proj"), "mlp/w_up": ("mlp.up_proj", "up_proj"),
                 "mlp/w_down": ("mlp.down_proj", "down_proj")}
GPT2_MODULES = {"attn/wo": ("attn.c_proj", "attn.c_proj"), "mlp/w_up": ("mlp.c_fc", "mlp.c_fc"),
                "mlp/w_down": ("mlp.c_proj", "mlp.c_proj")}
GPT2_QKV = ("attn/wq", "attn/wk", "attn/wv")  # -> attn.c_attn


def peft_tensors(adapters: dict, m: ModelConfig, rank: int
                 ) -> tuple[list[tuple[str, Callable[[], np.ndarray]]], list[str], dict[str, int]]:
    """(name, make the array) for adapter_model.safetensors, target_modules, and {module: fused parts}
    for modules whose rank is a multiple of the run's (gpt2's c_attn)."""
    if m.moe_experts:
        raise HFError("a mixture-of-experts model has no Hugging Face export (LlamaForCausalLM is dense), "
                      "so its adapters have no PEFT form; export the adapters as GGUF (to_gguf.py --adapter)")
    flat = {k: np.asarray(v, np.float32) for k, v in flat_paths(adapters).items()}
    ads = {k.removesuffix("/lora_a"): (flat[k], flat[k.removesuffix("/lora_a") + "/lora_b"])
           for k in flat if k.endswith("/lora_a")}
    out, targets, fused, used = [], [], {}, set()

    def add(module: str, target: str, a_rxin: np.ndarray, b_outxr: np.ndarray) -> None:
        out.append((f"{PREFIX}{module}.lora_A.weight", lambda: np.ascontiguousarray(a_rxin)))
        out.append((f"{PREFIX}{module}.lora_B.weight", lambda: np.ascontiguousarray(b_outxr)))
        if target not in targets:
            targets.append(target)

    for i in range(m.n_layers):
        layer = f"layers_{i}"
        if m.arch == "gpt2":
            have = [p for p in GPT2_QKV if f"{layer}/{p}" in ads]
            if have:
                k = len(have)
                a_f = np.concatenate([ads[f"{layer}/{p}"][0].T for p in have], axis=0)  # [k r, D]
                b_f = np.zeros((3 * m.d_model, k * rank), np.float32)
                for j, p in enumerate(have):
                    n = GPT2_QKV.index(p)
                    b_f[n * m.d_model:(n + 1) * m.d_model, j * rank:(j + 1) * rank] = ads[f"{layer}/{p}"][1].T
                add(f"transformer.h.{i}.attn.c_attn", "c_attn", a_f, b_f)
                used.update(f"{layer}/{p}" for p in have)
                if k > 1:
                    fused["c_attn"] = max(fused.get("c_attn", 1), k)
        for sub, (module, target) in (GPT2_MODULES if m.arch == "gpt2" else LLAMA_MODULES).items():
            path = f"{layer}/{sub}"
            if path not in ads:
                continue
            a, b = ads[path]
            b_hf = b.T
            if sub in ("attn/wq", "attn/wk"):  # llama: Hugging Face's half-split RoPE rows
                b_hf = unpermute(b_hf, m.n_heads if sub == "attn/wq" else m.n_kv_heads)
            where = f"transformer.h.{i}" if m.arch == "gpt2" else f"model.layers.{i}"
            add(f"{where}.{module}", target, a.T, b_hf)
            used.add(path)
    if "lm_head" in ads:
        add("lm_head", "lm_head", ads["lm_head"][0].T, ads["lm_head"][1].T)
        used.add("lm_head")
    left = sorted(set(ads) - used)
    if left:
        raise HFError(f"adapter '{left[0]}' (and {len(left) - 1} more) has no Hugging Face module in the "
                      f"{m.arch} table; the run's adapters and its config do not match")
    return out, targets, fused


def _base_name(cfg: Config) -> str:
    """base_model_name_or_path: the hf: model the run started from, or a note for an Atlas base."""
    kind, _, src = cfg.train.init_from.partition(":")
    if kind == "hf":
        return str(Path(src).resolve()) if Path(src).is_dir() else src
    return (f"(an Atlas base, train.init_from={cfg.train.init_from}: load the directory `python -m atlas_jax.hf "
            f"export {src} --out DIR` writes as the base model)")


def adapter_config(cfg: Config, targets: list[str], fused: dict[str, int]) -> dict:
    """adapter_config.json for PEFT's LoraConfig."""
    from atlas_jax.lora import scale as lora_scale

    lora, r = cfg.lora, cfg.lora.rank
    scale = lora_scale(lora)
    ranks = {mod: k * r for mod, k in fused.items()}
    alphas = {mod: scale * (rk ** 0.5 if lora.rslora else rk) for mod, rk in ranks.items()}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": _base_name(cfg),
            "r": r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": cfg.model.arch == "gpt2",
            "rank_pattern": ranks, "alpha_pattern": alphas, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}


def export_adapter(run: str | Path, out: str | Path, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """A PEFT adapter directory from a LoRA run (its base checked against lora_base.json first)."""
    from atlas_jax.hf.run import _Staging
    from atlas_jax.init_from import base_params

    run_dir, step_dir = ckpt.find_checkpoint(run)
    if ckpt.checkpoint_config(step_dir).lora.rank == 0:
        raise HFError(f"{run}: --adapter exports a LoRA run's adapters, but this run has none (lora.rank is 0); "
                      f"drop --adapter to export its model")
    adapters, cfg, _ = ckpt.load_adapters(step_dir)
    base_params(cfg, run_dir)  # the base is still the one the adapters were trained on (or one line)
    tensors, targets, fused = peft_tensors(adapters, cfg.model, cfg.lora.rank)
    out = Path(out)
    staging = _Staging(out, force)
    with staging as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, targets, fused), indent=2) + "\n",
                                          encoding="utf-8")
        (file,) = write_safetensors(tensors, tmp, max_shard_bytes=2**62, dtype=dtype)
        assert file.name == WEIGHTS
        file.rename(tmp / ADAPTER_WEIGHTS)
        staging.commit()
    log(f"exported the adapters of {run} (rank {cfg.lora.rank}, {', '.join(targets)}) as a PEFT adapter to {out} "
        f"({(out / ADAPTER_WEIGHTS).stat().st_size / 2**20:.2f} MiB, {dtype})")
    return out
