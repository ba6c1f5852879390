"""A LoRA run's adapters as a GGUF LoRA adapter that llama.cpp applies to the base GGUF at load time.

    export_lora_gguf(adapters, base, model_cfg, lora_cfg, "adapter.gguf")
    llama-cli -m base.gguf --lora adapter.gguf        Llama(model_path=..., lora_path=...)

The file is what llama.cpp's own convert_lora_to_gguf.py writes: general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha (float32), general.architecture the base's, and for each
adapted base tensor `<name>.lora_a` [r, in] and `<name>.lora_b` [out, r] (numpy row-major shapes;
Atlas's lora_a [in, r] and lora_b [r, out] transposed), the names from gguf.py's TENSOR_TABLE.
llama.cpp computes W x + (alpha / r) B (A x), r = lora_b's column count (llama-adapter.h), so the
alpha written is scale * rank: lora.alpha for plain LoRA, lora.alpha * sqrt(rank) for rsLoRA.

Q/K need no row permutation: Atlas's wq/wk are already in llama.cpp's adjacent-pair RoPE order (the
same kernels gguf.py writes unpermuted), so their lora_b goes as it is.

gpt2's q|k|v are one GGUF tensor (attn_qkv, rows q, then k, then v): its adapter is the fused
equivalent, lora_a the k adapted parts' A stacked ([k r, in]) and lora_b block-diagonal ([3 D, k r],
zero rows for a part without an adapter), so B A = [B_q A_q; B_k A_k; B_v A_v]. One alpha covers the
file and llama.cpp divides it by the fused rank k r, so the fused lora_b is multiplied by k.

Types: f32 (exact), f16 (the adapter tensors rounded; halves the file).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType as VT
from gguf import Keys

from atlas_jax.config import LoraConfig, ModelConfig
from atlas_jax.export.gguf import (
    ARCHS,
    TENSOR_TABLE,
    ExportError,
    check_exportable,
    flatten,
    tensor_name,
    write_gguf,
)

ADAPTER_FTYPES = {"f32": np.float32, "f16": np.float16}


def gguf_lora_alpha(lora: LoraConfig) -> float:
    """adapter.lora.alpha for which llama.cpp's alpha / rank is Atlas's scale (alpha / rank, or
    alpha / sqrt(rank) with rsLoRA)."""
    from atlas_jax.lora import scale

    return scale(lora) * lora.rank


def gguf_lora_tensors(adapters: Mapping, base: Mapping, cfg: ModelConfig, lora: LoraConfig
                      ) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every .lora_a / .lora_b tensor, in TENSOR_TABLE's order."""
    flat = flatten(adapters)
    ads = {k.removesuffix("/lora_a"): (np.asarray(v, np.float32), np.asarray(flat[f"{k[:-7]}/lora_b"], np.float32))
           for k, v in flat.items() if k.endswith("/lora_a")}  # Dense path -> (A [in, r], B [r, out])
    kernels = {k.removesuffix("/kernel"): np.shape(v) for k, v in flatten(base).items() if k.endswith("/kernel")}
    used: set[str] = set()
    out = []
    for row in TENSOR_TABLE:
        if cfg.arch not in row.archs or row.suffix != "weight" or not row.sources[0].endswith("/kernel"):
            continue
        for i in row.layers(cfg):
            parts = [p.format(i=i).removesuffix("/kernel") for p in row.sources]
            have = [p for p in parts if p in ads]
            if not have:
                continue
            name = tensor_name(row.tensor, row.suffix, i)
            if len(parts) == 1:
                a, b = ads[parts[0]]
                out += [(f"{name}.lora_a", np.ascontiguousarray(a.T)), (f"{name}.lora_b", np.ascontiguousarray(b.T))]
            else:  # fused (gpt2's attn_qkv): stacked A, block-diagonal B, scaled for the fused rank
                r, k = lora.rank, len(have)
                a_f = np.concatenate([ads[p][0].T for p in have], axis=0)  # [k r, in]
                rows = [kernels[p][1] for p in parts]
                b_f = np.zeros((sum(rows), k * r), np.float32)
                start = np.cumsum([0, *rows])
                for j, p in enumerate(have):
                    n = parts.index(p)
                    b_f[start[n]:start[n + 1], j * r:(j + 1) * r] = ads[p][1].T * k
                out += [(f"{name}.lora_a", a_f), (f"{name}.lora_b", b_f)]
            used.update(have)
    left = sorted(set(ads) - used)
    if left:
        raise ExportError(f"adapter '{left[0]}' (and {len(left) - 1} more) has no GGUF tensor in the {cfg.arch} "
                          f"table; the run's adapters and its config do not match")
    return out


def export_lora_gguf(adapters: Mapping, base: Mapping, model_cfg: ModelConfig, lora: LoraConfig,
                     out_path: str | Path, ftype: str = "f32", name: str | None = None) -> Path:
    """Write the adapters as a GGUF LoRA adapter for the base model's GGUF (written under a temporary
    name beside out_path, renamed when complete)."""
    if ftype not in ADAPTER_FTYPES:
        raise ExportError(f"--type {ftype} with --adapter: adapter tensors are written as "
                          f"{' or '.join(ADAPTER_FTYPES)}; pass --type f32 or --type f16")
    if model_cfg.arch not in ARCHS:
        raise ExportError(f"model.arch '{model_cfg.arch}' has no GGUF mapping; export supports {', '.join(ARCHS)}")
    check_exportable(model_cfg)
    tensors = gguf_lora_tensors(adapters, base, model_cfg, lora)
    out_path = Path(out_path)
    meta: dict[str, tuple[Any, VT, VT | None]] = {
        Keys.General.TYPE: (gguf.GGUFType.ADAPTER, VT.STRING, None),
        Keys.General.NAME: (name or f"atlas-{model_cfg.arch}-lora", VT.STRING, None),
        Keys.Adapter.TYPE: ("lora", VT.STRING, None),
        Keys.Adapter.LORA_ALPHA: (float(gguf_lora_alpha(lora)), VT.FLOAT32, None),
    }
    return write_gguf(out_path, model_cfg.arch, meta,
                      ((tname, array.astype(ADAPTER_FTYPES[ftype]), None) for tname, array in tensors))
