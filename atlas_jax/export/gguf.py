"""Atlas params -> a GGUF file that llama.cpp runs.

    export_gguf(params, model_cfg, tokenizer_path, "model.gguf", ftype="q8_0")

The whole mapping from Atlas param paths to llama.cpp tensors is `TENSOR_TABLE`; the
hyper-parameters llama.cpp reads are `HPARAM_TABLE`; the tokenizer is written for llama.cpp's SPM
tokenizer (sentencepiece) or its BPE tokenizer with GPT-2's pre-tokenizer (a byte-level BPE
tokenizer.json), `tokenizer_metadata`. Names and keys come from gguf-py's constants.

Layout: a Flax kernel is [in, out]; GGUF (via gguf-py) takes row-major [out, in], so kernels are
written transposed. Embeddings [V, D] are already [rows, cols]. gpt2's q|k|v are fused into one
attn_qkv (rows q, then k, then v), as llama.cpp's gpt2 graph expects. RoPE needs no Q/K permutation:
Atlas rotates adjacent pairs, which is llama.cpp's `llama` rope type (NORM). A mixture-of-experts
llama (every layer MoE; `check_exportable` refuses experts in some layers only) is written as
convert_hf_to_gguf.py writes Mixtral: ffn_gate_inp (the router, kept f32) and ffn_{gate,up,down}_exps
stacked [E, out, in], with llama.expert_count, llama.expert_used_count and the experts' width as
llama.feed_forward_length.

Types (`--type`): f32; f16/bf16 (2-D weights; norms and biases stay f32); q8_0/q4_0 quantized here
with gguf.quants for 2-D weights whose rows split into 32-wide blocks (q4_0 by GPTQ, quantize.py,
when given a calibration), FALLBACK_TYPE (f16) for the rest, position embeddings kept f32 (as
convert_hf_to_gguf.py does); q4_k_m/q5_k_m/q6_k by llama.cpp's own quantizer (`llamacpp_quantize`,
llamacpp.py), starting from an f32 export.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import Keys, LlamaFileType, TokenType
from gguf import MODEL_TENSOR as T

from atlas_jax.config import ModelConfig, off_family, sink_options
from atlas_jax.errors import AtlasError
from atlas_jax.export.llamacpp import LLAMACPP_FTYPES, llamacpp_quantize
from atlas_jax.export.quantize import gptq_q4_0


class ExportError(AtlasError):
    pass


class ExportWarning(UserWarning):
    """The file is written, but llama.cpp may not reproduce Atlas exactly (one line; to_gguf prints it)."""


# --------------------------------------------------------------------------- the table

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}
BOTH = ("llama", "gpt2")


@dataclasses.dataclass(frozen=True)
class TensorRow:
    archs: tuple[str, ...]
    tensor: gguf.MODEL_TENSOR
    suffix: str  # "weight" | "bias"
    sources: tuple[str, ...]  # Atlas param paths ({i}: layer); several are concatenated along rows
    optional: bool = False  # absent from tied models (output falls back to token_embd)
    moe: bool | None = None  # per-layer rows: None every layer, True MoE layers only, False dense layers only

    def layers(self, cfg: ModelConfig) -> list[int | None]:
        if "{i}" not in self.sources[0]:
            return [None]
        return [i for i in range(cfg.n_layers) if self.moe is None or cfg.is_moe_layer(i) == self.moe]


TENSOR_TABLE: tuple[TensorRow, ...] = (
    TensorRow(BOTH, T.TOKEN_EMBD, "weight", ("embed/embedding",)),
    TensorRow(("gpt2",), T.POS_EMBD, "weight", ("pos_embed/embedding",)),
    TensorRow(BOTH, T.ATTN_NORM, "weight", ("layers_{i}/attn_norm/scale",)),
    TensorRow(("gpt2",), T.ATTN_NORM, "bias", ("layers_{i}/attn_norm/bias",)),
    TensorRow(("llama",), T.ATTN_Q, "weight", ("layers_{i}/attn/wq/kernel",)),
    TensorRow(("llama",), T.ATTN_K, "weight", ("layers_{i}/attn/wk/kernel",)),
    TensorRow(("llama",), T.ATTN_V, "weight", ("layers_{i}/attn/wv/kernel",)),
    TensorRow(("gpt2",), T.ATTN_QKV, "weight",
              ("layers_{i}/attn/wq/kernel", "layers_{i}/attn/wk/kernel", "layers_{i}/attn/wv/kernel")),
    TensorRow(("gpt2",), T.ATTN_QKV, "bias",
              ("layers_{i}/attn/wq/bias", "layers_{i}/attn/wk/bias", "layers_{i}/attn/wv/bias")),
    TensorRow(BOTH, T.ATTN_OUT, "weight", ("layers_{i}/attn/wo/kernel",)),
    TensorRow(("gpt2",), T.ATTN_OUT, "bias", ("layers_{i}/attn/wo/bias",)),
    TensorRow(BOTH, T.FFN_NORM, "weight", ("layers_{i}/mlp_norm/scale",)),
    TensorRow(("gpt2",), T.FFN_NORM, "bias", ("layers_{i}/mlp_norm/bias",)),
    TensorRow(("llama",), T.FFN_GATE, "weight", ("layers_{i}/mlp/w_gate/kernel",), moe=False),
    TensorRow(BOTH, T.FFN_UP, "weight", ("layers_{i}/mlp/w_up/kernel",), moe=False),
    TensorRow(("gpt2",), T.FFN_UP, "bias", ("layers_{i}/mlp/w_up/bias",)),
    TensorRow(BOTH, T.FFN_DOWN, "weight", ("layers_{i}/mlp/w_down/kernel",), moe=False),
    # Mixture-of-experts layers (llama), as convert_hf_to_gguf.py writes Mixtral: the router, then the
    # experts stacked with the expert on the slowest axis ([E, out, in] rows).
    TensorRow(("llama",), T.FFN_GATE_INP, "weight", ("layers_{i}/moe/router/kernel",), moe=True),
    TensorRow(("llama",), T.FFN_GATE_EXP, "weight", ("layers_{i}/moe/w_gate",), moe=True),
    TensorRow(("llama",), T.FFN_UP_EXP, "weight", ("layers_{i}/moe/w_up",), moe=True),
    TensorRow(("llama",), T.FFN_DOWN_EXP, "weight", ("layers_{i}/moe/w_down",), moe=True),
    TensorRow(("gpt2",), T.FFN_DOWN, "bias", ("layers_{i}/mlp/w_down/bias",)),
    TensorRow(BOTH, T.OUTPUT_NORM, "weight", ("final_norm/scale",)),
    TensorRow(("gpt2",), T.OUTPUT_NORM, "bias", ("final_norm/bias",)),
    TensorRow(BOTH, T.OUTPUT, "weight", ("lm_head/kernel",), optional=True),
)
TIED_OUTPUT_SOURCE = "embed/embedding"  # output.weight when write_output_for_tied

# (GGUF key, ModelConfig attribute, value type); "{arch}" is filled in.
HPARAM_TABLE: dict[str, tuple[tuple[str, str, VT], ...]] = {
    "common": (
        (Keys.LLM.VOCAB_SIZE, "vocab_size", VT.UINT32),
        (Keys.LLM.CONTEXT_LENGTH, "max_seq_len", VT.UINT32),
        (Keys.LLM.EMBEDDING_LENGTH, "d_model", VT.UINT32),
        (Keys.LLM.BLOCK_COUNT, "n_layers", VT.UINT32),
        (Keys.LLM.FEED_FORWARD_LENGTH, "d_ff", VT.UINT32),
        (Keys.Attention.HEAD_COUNT, "n_heads", VT.UINT32),
        (Keys.Attention.HEAD_COUNT_KV, "n_kv_heads", VT.UINT32),
    ),
    "llama": (
        (Keys.Rope.DIMENSION_COUNT, "head_dim", VT.UINT32),  # rotate the whole head
        (Keys.Rope.FREQ_BASE, "rope_theta", VT.FLOAT32),
        (Keys.Attention.LAYERNORM_RMS_EPS, "norm_eps", VT.FLOAT32),
    ),
    "gpt2": (
        (Keys.Attention.LAYERNORM_EPS, "norm_eps", VT.FLOAT32),
    ),
}

# --type -> (general.file_type, type of 2-D weights). Vectors are always f32.
FTYPES: dict[str, tuple[LlamaFileType, QT]] = {
    "f32": (LlamaFileType.ALL_F32, QT.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
}
# q4_k_m/q5_k_m/q6_k: LLAMACPP_FTYPES (llamacpp.py), llama.cpp's quantizer applied to an f32 export.
ALL_FTYPES = (*FTYPES, *LLAMACPP_FTYPES)
FALLBACK_TYPE = QT.F16  # q8_0/q4_0 matrices whose rows do not split into 32-wide blocks
# The router stays f32 too (as convert_hf_to_gguf.py and llama.cpp's quantizer keep ffn_gate_inp):
# a rounded router picks other experts.
KEEP_F32 = (T.POS_EMBD, T.FFN_GATE_INP)
# The output projection (output.weight, or token_embd when it stands in for it) at >= 8 bits, as
# llama.cpp's own quantizer keeps it (q6_k there): 4-bit logits cost the most quality per byte.
OUTPUT_TYPES = {QT.Q4_0: QT.Q8_0}  # looked up by row, not multiplied: kept exact (as convert_hf_to_gguf.py)

# sentencepiece piece type (ModelProto.SentencePiece.Type) -> GGUF token type
SP_TOKEN_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL,
                  4: TokenType.USER_DEFINED, 5: TokenType.UNUSED, 6: TokenType.BYTE}
SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}  # TrainerSpec.model_type
SP_BPE = 2


def tensor_name(tensor: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=layer)}.{suffix}"


# --------------------------------------------------------------------------- params -> tensors


def flatten(params: Mapping) -> dict[str, Any]:
    """{'layers_0': {'attn': {'wq': {'kernel': x}}}} -> {'layers_0/attn/wq/kernel': x}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        else:
            flat[str(key)] = value
    return flat


def check_params(flat: Mapping[str, Any], cfg: ModelConfig) -> None:
    """The params' paths and shapes are exactly what `cfg` builds, or a one-line ExportError."""
    import jax  # the model floor; kept out of the llama.cpp worker's imports

    from atlas_jax.model import init_params

    expected = flatten(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    where = f"a {cfg.arch} model with d_model={cfg.d_model}, n_layers={cfg.n_layers}, vocab {cfg.vocab_size}"
    for path, spec in expected.items():
        if path not in flat:
            raise ExportError(f"params lack '{path}' {tuple(spec.shape)}, which {where} has; "
                              f"the checkpoint and its config do not match")
        if tuple(np.shape(flat[path])) != tuple(spec.shape):
            raise ExportError(f"params '{path}' has shape {tuple(np.shape(flat[path]))} but {where} "
                              f"needs {tuple(spec.shape)}; the checkpoint and its config do not match")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ExportError(f"params hold '{extra[0]}' (and {len(extra) - 1} more) that {where} does not "
                          f"have; the checkpoint and its config do not match")


EXPERT_STACKS = ("/moe/w_gate", "/moe/w_up", "/moe/w_down")  # [E, in, out]


def _as_rows(path: str, array: np.ndarray) -> np.ndarray:
    """An Atlas array as GGUF rows: kernels [in, out] -> [out, in], stacked experts [E, in, out] ->
    [E, out, in]; the rest as they are."""
    if path.endswith(EXPERT_STACKS):
        return array.swapaxes(1, 2)
    return array.T if path.endswith("/kernel") else array


def gguf_tensors(params: Mapping, cfg: ModelConfig, write_output_for_tied: bool = False
                 ) -> list[tuple[gguf.MODEL_TENSOR, str, np.ndarray]]:
    """(tensor kind, GGUF name, float32 array in GGUF row order) for every tensor of the file."""
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    used: set[str] = set()
    out = []
    for row in TENSOR_TABLE:
        if cfg.arch not in row.archs:
            continue
        for i in row.layers(cfg):
            paths = [p.format(i=i) for p in row.sources]
            if row.optional and paths[0] not in flat:
                continue
            missing = [p for p in paths if p not in flat]
            if missing:
                raise ExportError(f"params lack '{missing[0]}', needed for GGUF tensor "
                                  f"'{tensor_name(row.tensor, row.suffix, i)}'")
            data = np.concatenate([_as_rows(p, flat[p]) for p in paths], axis=0)
            out.append((row.tensor, tensor_name(row.tensor, row.suffix, i), np.ascontiguousarray(data)))
            used.update(paths)
    if cfg.tie_embeddings and write_output_for_tied:
        out.append((T.OUTPUT, tensor_name(T.OUTPUT, "weight"), flat[TIED_OUTPUT_SOURCE]))
    left = sorted(set(flat) - used)
    if left:
        raise ExportError(f"params '{left[0]}' has no GGUF tensor in the {cfg.arch} table "
                          f"(and {len(left) - 1} more); the checkpoint and its config do not match")
    return out


def dense_inputs(cfg: ModelConfig) -> dict[str, str]:
    """GGUF weight name -> the Atlas Dense layer whose input multiplies it ("layers_0/attn/wq"), for
    the matrices a calibration (`quantize.input_hessians`) can inform. gpt2's fused attn_qkv takes
    the input of wq, which k and v share."""
    out = {}
    for row in TENSOR_TABLE:
        if cfg.arch in row.archs and row.suffix == "weight" and row.sources[0].endswith("/kernel"):
            for i in row.layers(cfg):
                out[tensor_name(row.tensor, row.suffix, i)] = row.sources[0].format(i=i).rpartition("/")[0]
    return out


def tensor_type(tensor: gguf.MODEL_TENSOR, shape: tuple[int, ...], ftype: str, is_output: bool = False) -> QT:
    """The GGML type one tensor is stored in for a given --type (is_output: it is the output projection)."""
    weight_type = FTYPES[ftype][1]
    if is_output:
        weight_type = OUTPUT_TYPES.get(weight_type, weight_type)
    if len(shape) < 2 or tensor in KEEP_F32:
        return QT.F32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if shape[-1] % block:
        return FALLBACK_TYPE
    return weight_type


def _encode(array: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT | None]:
    """Data and raw_dtype for GGUFWriter.add_tensor."""
    if qtype == QT.F32:
        return array.astype(np.float32), None
    if qtype == QT.F16:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


# --------------------------------------------------------------------------- metadata


def tokenizer_metadata(tokenizer_path: str | Path, vocab_size: int, add_bos: bool = False
                       ) -> dict[str, tuple[Any, VT, VT | None]]:
    """tokenizer.ggml.* for the tokenizer file: llama.cpp's SPM tokenizer for sentencepiece (its dummy
    prefix as tokenizer.ggml.add_space_prefix), its BPE tokenizer with GPT-2's pre-tokenizer for a
    byte-level BPE tokenizer.json, its SPM tokenizer for a sentencepiece-layout BPE tokenizer.json that
    it can follow exactly (`hf.spm_vocab`: scores from the merge ranks); any other is one ExportError
    line saying why."""
    from atlas_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)  # a clear DataError when missing or not a tokenizer
    if tok.kind == "bytelevel":
        return _gpt2_metadata(tok, vocab_size, add_bos)
    if tok.kind != "sentencepiece":
        return _spm_json_metadata(tok, vocab_size, add_bos)
    return _sentencepiece_metadata(tok, tokenizer_path, vocab_size, add_bos)


SPM_KINDS = {"normal": TokenType.NORMAL, "byte": TokenType.BYTE, "control": TokenType.CONTROL,
             "unknown": TokenType.UNKNOWN}


def _spm_json_metadata(tok, vocab_size: int, add_bos: bool) -> dict[str, tuple[Any, VT, VT | None]]:
    """llama.cpp's SPM tokenizer ("llama") for a sentencepiece-layout tokenizer.json (a Llama/Mistral
    one without its tokenizer.model), exact or refused (`hf.spm_vocab`)."""
    from atlas_jax.errors import DataError
    from atlas_jax.tokenizer.hf import spm_vocab

    try:
        pieces, scores, kinds, prefix = spm_vocab(tok)
    except DataError as e:
        raise ExportError(f"{e} (GGUF export)") from None
    n = len(pieces)
    if n > vocab_size:
        raise ExportError(f"{tok.path}: the tokenizer has {n} tokens but the model's vocab_size is "
                          f"{vocab_size}; export with the tokenizer the model was trained with")
    pad = vocab_size - n
    meta: dict[str, tuple[Any, VT, VT | None]] = {
        Keys.Tokenizer.MODEL: ("llama", VT.STRING, None),
        Keys.Tokenizer.LIST: (pieces + [f"[PAD{i}]" for i in range(n, vocab_size)], VT.ARRAY, VT.STRING),
        Keys.Tokenizer.SCORES: (scores + [-1000.0] * pad, VT.ARRAY, VT.FLOAT32),
        Keys.Tokenizer.TOKEN_TYPE: ([int(SPM_KINDS[k]) for k in kinds] + [int(TokenType.UNUSED)] * pad,
                                    VT.ARRAY, VT.INT32),
        Keys.Tokenizer.ADD_BOS: (bool(add_bos), VT.BOOL, None),
        Keys.Tokenizer.ADD_EOS: (False, VT.BOOL, None),
        Keys.Tokenizer.ADD_PREFIX: (bool(prefix), VT.BOOL, None),
        Keys.Tokenizer.REMOVE_EXTRA_WS: (False, VT.BOOL, None),
    }
    return {**meta, **_special_ids(tok)}


def _special_ids(tok) -> dict[str, tuple[Any, VT, VT | None]]:
    meta = {}
    for key, value in ((Keys.Tokenizer.BOS_ID, tok.bos_id), (Keys.Tokenizer.EOS_ID, tok.eos_id),
                       (Keys.Tokenizer.UNK_ID, tok.unk_id), (Keys.Tokenizer.PAD_ID, tok.pad_id)):
        if value >= 0:
            meta[key] = (int(value), VT.UINT32, None)
    return meta


def _gpt2_metadata(tok, vocab_size: int, add_bos: bool) -> dict[str, tuple[Any, VT, VT | None]]:
    """llama.cpp's BPE tokenizer ("gpt2") with the GPT-2 pre-tokenizer regex ("gpt-2"): tokens are the
    byte-level strings, merges "left right" in rank order (as convert_hf_to_gguf.py writes them), added
    special tokens control, other added tokens user-defined, model rows past the tokenizer unused."""
    n = tok.vocab_size
    if n > vocab_size:
        raise ExportError(f"{tok.path}: the tokenizer has {n} tokens but the model's vocab_size is "
                          f"{vocab_size}; export with the tokenizer the model was trained with")
    added = {int(a["id"]): a for a in tok.spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(n):
        piece = tok.piece(i)
        if not piece:
            raise ExportError(f"{tok.path}: token id {i} is missing from the vocabulary; llama.cpp needs ids 0..{n - 1}")
        tokens.append(piece)
        types.append(int(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok.spec["model"].get("merges", [])]
    pad = vocab_size - n
    meta: dict[str, tuple[Any, VT, VT | None]] = {
        Keys.Tokenizer.MODEL: ("gpt2", VT.STRING, None),
        Keys.Tokenizer.PRE: ("gpt-2", VT.STRING, None),
        Keys.Tokenizer.LIST: (tokens + [f"[PAD{i}]" for i in range(n, vocab_size)], VT.ARRAY, VT.STRING),
        Keys.Tokenizer.TOKEN_TYPE: (types + [int(TokenType.UNUSED)] * pad, VT.ARRAY, VT.INT32),
        Keys.Tokenizer.MERGES: (merges, VT.ARRAY, VT.STRING),
        Keys.Tokenizer.ADD_BOS: (bool(add_bos), VT.BOOL, None),
        Keys.Tokenizer.ADD_EOS: (False, VT.BOOL, None),
    }
    return {**meta, **_special_ids(tok)}


def _sentencepiece_metadata(tok, tokenizer_path: str | Path, vocab_size: int, add_bos: bool
                            ) -> dict[str, tuple[Any, VT, VT | None]]:
    """llama.cpp's SPM tokenizer merges pieces by score, which is how a sentencepiece BPE model
    segments: for BPE it splits text exactly as sentencepiece does. For a unigram model (which
    segments by the most probable path) it is not guaranteed to: an ExportWarning says so."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    n = len(proto.pieces)
    if n > vocab_size:
        raise ExportError(f"{tokenizer_path}: the tokenizer has {n} pieces but the model's vocab_size is "
                          f"{vocab_size}; export with the tokenizer the model was trained with")
    pieces = [p.piece for p in proto.pieces]
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in set(pieces)]
    if missing:
        raise ExportError(f"{tokenizer_path}: byte piece {missing[0]} (and {len(missing) - 1} more) missing; "
                          f"llama.cpp needs all 256, train the tokenizer with byte_fallback=True")
    norm = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ExportError(f"{tokenizer_path}: treat_whitespace_as_suffix is not supported by the export")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        warnings.warn(f"{tokenizer_path}: normalization '{norm.name}' is not applied by llama.cpp; "
                      f"non-ASCII text may tokenize differently there", ExportWarning, stacklevel=2)
    if proto.trainer_spec.model_type != SP_BPE:
        kind = SP_MODEL_TYPES.get(proto.trainer_spec.model_type, f"type-{proto.trainer_spec.model_type}")
        warnings.warn(f"{tokenizer_path}: llama.cpp's SPM tokenizer is not guaranteed to match a {kind} model's "
                      f"segmentation exactly; train the tokenizer with data.tokenizer_type=bpe for exact parity",
                      ExportWarning, stacklevel=2)
    pad = vocab_size - n  # model rows past the tokenizer (a padded vocab): unused placeholders
    meta: dict[str, tuple[Any, VT, VT | None]] = {
        Keys.Tokenizer.MODEL: ("llama", VT.STRING, None),
        Keys.Tokenizer.LIST: (pieces + [f"[PAD{i}]" for i in range(n, vocab_size)], VT.ARRAY, VT.STRING),
        Keys.Tokenizer.SCORES: ([float(p.score) for p in proto.pieces] + [-1000.0] * pad, VT.ARRAY, VT.FLOAT32),
        Keys.Tokenizer.TOKEN_TYPE: ([int(SP_TOKEN_TYPES[p.type]) for p in proto.pieces]
                                    + [int(TokenType.UNUSED)] * pad, VT.ARRAY, VT.INT32),
        Keys.Tokenizer.ADD_BOS: (bool(add_bos), VT.BOOL, None),
        Keys.Tokenizer.ADD_EOS: (False, VT.BOOL, None),
        Keys.Tokenizer.ADD_PREFIX: (bool(norm.add_dummy_prefix), VT.BOOL, None),
        Keys.Tokenizer.REMOVE_EXTRA_WS: (bool(norm.remove_extra_whitespaces), VT.BOOL, None),
    }
    return {**meta, **_special_ids(tok)}


def model_metadata(cfg: ModelConfig, ftype: str, name: str) -> dict[str, tuple[Any, VT, VT | None]]:
    """general.* and the hyper-parameters llama.cpp reads for the arch (general.architecture is the writer's)."""
    arch = gguf.MODEL_ARCH_NAMES[ARCHS[cfg.arch]]
    file_type = FTYPES[ftype][0] if ftype in FTYPES else LLAMACPP_FTYPES[ftype]
    meta: dict[str, tuple[Any, VT, VT | None]] = {
        Keys.General.NAME: (name, VT.STRING, None),
        Keys.General.FILE_TYPE: (int(file_type), VT.UINT32, None),
        Keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, VT.UINT32, None),
    }
    for key, attr, vtype in HPARAM_TABLE["common"] + HPARAM_TABLE[cfg.arch]:
        value = getattr(cfg, attr)
        meta[key.format(arch=arch)] = (float(value) if vtype == VT.FLOAT32 else int(value), vtype, None)
    if cfg.moe_experts:  # every layer is MoE (check_exportable): llama.cpp reads the experts' width as n_ff
        for key, attr in ((Keys.LLM.EXPERT_COUNT, "moe_experts"), (Keys.LLM.EXPERT_USED_COUNT, "moe_experts_per_token"),
                          (Keys.LLM.FEED_FORWARD_LENGTH, "moe_d_ff")):
            meta[key.format(arch=arch)] = (int(getattr(cfg, attr)), VT.UINT32, None)
    return meta


def check_exportable(cfg: ModelConfig) -> None:
    """Options llama.cpp's graphs cannot carry, refused in one line naming the nearest that works."""
    off = off_family(cfg, "GGUF export")
    if off:
        raise ExportError(off)
    given = sink_options(cfg)
    if given:
        raise ExportError(
            f"{given}: llama.cpp's llama architecture has no learned attention sinks (no per-head sink logits, no "
            f"vectors before the first token); export a model trained with model.sink_logits=false and "
            f"model.sink_tokens=0, and stream with sinks at generation time (llama.cpp --keep N, Atlas sample.n_sink)")
    if cfg.moe_experts and not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
        raise ExportError(
            f"model.moe_every={cfg.moe_every}, model.moe_first_layer={cfg.moe_first_layer} leave layers {dense} dense, "
            f"but llama.cpp's llama architecture has experts in every layer or in none; export a model trained with "
            f"model.moe_every=1 and model.moe_first_layer=0 (or a dense one)")


# --------------------------------------------------------------------------- export


def export_gguf(params: Mapping, model_cfg: ModelConfig, tokenizer_path: str | Path, out_path: str | Path,
                ftype: str = "f32", name: str | None = None, write_output_for_tied: bool = False,
                add_bos: bool = False, calibration: Mapping[str, np.ndarray] | None = None,
                chat_template: str | None = None) -> Path:
    """Write `params` (an Atlas model built from the resolved `model_cfg`) and its tokenizer as GGUF.

    The file appears at `out_path` only when complete (written under a temporary name, then renamed).
    Tied models omit output.weight (llama.cpp reuses token_embd) unless write_output_for_tied.
    add_bos: llama.cpp prepends BOS to text prompts (tokenizer.ggml.add_bos_token). Off by default:
    Atlas trains on documents that end in EOS and never start with BOS, so prompts carry no BOS.
    calibration: {Dense path: input second moment H} (`quantize.input_hessians` on text the model saw):
    q4_0 matrices are then quantized by GPTQ (`quantize.gptq_q4_0`) instead of rounding each weight
    to its nearest code; the file format is the same.
    chat_template: the Jinja text of a fine-tuned run (tokenizer.chat_template: llama.cpp's chat
    completion and Ollama/LM Studio render prompts with it).
    """
    if ftype not in ALL_FTYPES:
        raise ExportError(f"--type '{ftype}' is not one of {', '.join(ALL_FTYPES)}")
    cfg = model_cfg
    if cfg.n_kv_heads is None or cfg.d_ff is None:
        raise ExportError("model config is not resolved (n_kv_heads/d_ff unset); pass config.resolve_model(cfg)")
    if cfg.arch not in ARCHS:
        raise ExportError(f"model.arch '{cfg.arch}' has no GGUF mapping; export supports {', '.join(ARCHS)}")
    check_exportable(cfg)
    check_params(flatten(params), cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"atlas-{cfg.arch}"

    if ftype in LLAMACPP_FTYPES:  # f32 first, then llama.cpp's own quantizer
        f32 = _temp_path(out_path)
        try:
            export_gguf(params, cfg, tokenizer_path, f32, "f32", name, write_output_for_tied, add_bos,
                        chat_template=chat_template)
            tmp = _temp_path(out_path)
            try:
                llamacpp_quantize(f32, tmp, ftype)
                tmp.replace(out_path)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            f32.unlink(missing_ok=True)
        return out_path

    meta = {**model_metadata(cfg, ftype, name), **tokenizer_metadata(tokenizer_path, cfg.vocab_size, add_bos)}
    if chat_template:
        meta[Keys.Tokenizer.CHAT_TEMPLATE] = (chat_template, VT.STRING, None)
    tensors = gguf_tensors(params, cfg, write_output_for_tied)
    has_output = any(kind == T.OUTPUT for kind, _, _ in tensors)
    inputs = dense_inputs(cfg)

    def encoded():
        for kind, tname, array in tensors:
            is_output = kind == T.OUTPUT or (kind == T.TOKEN_EMBD and not has_output)
            qtype = tensor_type(kind, array.shape, ftype, is_output)
            hessian = (calibration or {}).get(inputs.get(tname))
            if qtype == QT.Q4_0 and hessian is not None:
                yield tname, gptq_q4_0(array, hessian), QT.Q4_0
            else:
                yield (tname, *_encode(array, qtype))

    return write_gguf(out_path, cfg.arch, meta, encoded())


def write_gguf(out_path: Path, arch: str, meta: Mapping[str, tuple[Any, VT, VT | None]], tensors) -> Path:
    """A GGUF file of `meta` ({key: (value, type, array item type)}) and `tensors` ((name, data,
    raw dtype or None), produced one at a time), under a temporary name renamed when complete."""
    tmp = _temp_path(out_path)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
        for key, (value, vtype, sub_type) in meta.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for tname, data, raw_dtype in tensors:
            writer.add_tensor(tname, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _temp_path(out_path: Path) -> Path:
    """A name beside out_path for a file being written (unique per process and call; the writer
    creates it, so it gets the usual permissions)."""
    return out_path.with_name(f"{out_path.name}.{os.getpid()}-{next(_TEMP_IDS)}.tmp")


_TEMP_IDS = itertools.count()
