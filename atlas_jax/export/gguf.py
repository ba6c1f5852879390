"""Atlas params -> a GGUF file that llama.cpp runs, and the llama.cpp side of the proof.

    export_gguf(params, model_cfg, tokenizer_path, "model.gguf", ftype="q8_0")

The whole mapping from Atlas param paths to llama.cpp tensors is `TENSOR_TABLE`; the
hyper-parameters llama.cpp reads are `HPARAM_TABLE`. Names and keys come from gguf-py's constants.

Layout: a Flax kernel is [in, out]; GGUF (via gguf-py) takes row-major [out, in], so kernels are
written transposed. Embeddings [V, D] are already [rows, cols]. gpt2's q|k|v are fused into one
attn_qkv (rows q, then k, then v), as llama.cpp's gpt2 graph expects. RoPE needs no Q/K permutation:
Atlas rotates adjacent pairs, which is llama.cpp's `llama` rope type (NORM).

Types (`--type`): f32; f16/bf16 (2-D weights; norms and biases stay f32); q8_0/q4_0 quantized here
with gguf.quants for 2-D weights whose rows split into 32-wide blocks, FALLBACK_TYPE (f16) for the
rest, position embeddings kept f32 (as convert_hf_to_gguf.py does); q4_k_m/q5_k_m/q6_k by llama.cpp's
own quantizer (llama-cpp-python), starting from an f32 export.

The llama.cpp helpers below (`llamacpp_logits`, `llamacpp_tokenize`, `llamacpp_generate`,
`llamacpp_perplexity`, `llamacpp_quantize`) run llama-cpp-python in a child process, so a crash in
native code is an error here, not a dead interpreter. Models are loaded with the model param
`use_extra_bufts` off: llama.cpp 0.3.36 segfaults on CPUs with AMX on the first evaluation of
quantized tensors placed in the AMX/repack ("extra") buffer types; plain CPU buffers avoid it.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import Keys, LlamaFileType, TokenType
from gguf import MODEL_TENSOR as T

from atlas_jax.config import ModelConfig
from atlas_jax.errors import AtlasError, DataError
from atlas_jax.export.quantize import gptq_q4_0


class ExportError(AtlasError):
    pass


class LlamaCppError(AtlasError):
    pass


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
    TensorRow(("llama",), T.FFN_GATE, "weight", ("layers_{i}/mlp/w_gate/kernel",)),
    TensorRow(BOTH, T.FFN_UP, "weight", ("layers_{i}/mlp/w_up/kernel",)),
    TensorRow(("gpt2",), T.FFN_UP, "bias", ("layers_{i}/mlp/w_up/bias",)),
    TensorRow(BOTH, T.FFN_DOWN, "weight", ("layers_{i}/mlp/w_down/kernel",)),
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
# --type -> llama.cpp's quantizer target (applied to an f32 export).
LLAMACPP_FTYPES: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
ALL_FTYPES = (*FTYPES, *LLAMACPP_FTYPES)
FALLBACK_TYPE = QT.F16  # q8_0/q4_0 matrices whose rows do not split into 32-wide blocks
KEEP_F32 = (T.POS_EMBD,)
# The output projection (output.weight, or token_embd when it stands in for it) at >= 8 bits, as
# llama.cpp's own quantizer keeps it (q6_k there): 4-bit logits cost the most quality per byte.
OUTPUT_TYPES = {QT.Q4_0: QT.Q8_0}  # looked up by row, not multiplied: kept exact (as convert_hf_to_gguf.py)

# sentencepiece piece type (ModelProto.SentencePiece.Type) -> GGUF token type
SP_TOKEN_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL,
                  4: TokenType.USER_DEFINED, 5: TokenType.UNUSED, 6: TokenType.BYTE}
SP_BPE = 2  # TrainerSpec.model_type


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


def _as_rows(path: str, array: np.ndarray) -> np.ndarray:
    """An Atlas array as GGUF rows: kernels [in, out] -> [out, in]; the rest as they are."""
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
        layers = range(cfg.n_layers) if "{i}" in row.sources[0] else [None]
        for i in layers:
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
            for i in range(cfg.n_layers) if "{i}" in row.sources[0] else [None]:
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
    """tokenizer.ggml.* for llama.cpp's SPM tokenizer, so it splits text exactly as sentencepiece."""
    from sentencepiece import sentencepiece_model_pb2

    from atlas_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)  # a clear DataError when missing or not sentencepiece
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
                      f"non-ASCII text may tokenize differently there", stacklevel=2)
    if proto.trainer_spec.model_type != SP_BPE:
        warnings.warn(f"{tokenizer_path}: llama.cpp merges pieces by score (BPE); a unigram model's ids "
                      f"can differ from sentencepiece's on some strings", stacklevel=2)
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
    for key, value in ((Keys.Tokenizer.BOS_ID, tok.bos_id), (Keys.Tokenizer.EOS_ID, tok.eos_id),
                       (Keys.Tokenizer.UNK_ID, tok.unk_id), (Keys.Tokenizer.PAD_ID, tok.pad_id)):
        if value >= 0:
            meta[key] = (int(value), VT.UINT32, None)
    return meta


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
    return meta


# --------------------------------------------------------------------------- export


def export_gguf(params: Mapping, model_cfg: ModelConfig, tokenizer_path: str | Path, out_path: str | Path,
                ftype: str = "f32", name: str | None = None, write_output_for_tied: bool = False,
                add_bos: bool = False, calibration: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write `params` (an Atlas model built from the resolved `model_cfg`) and its tokenizer as GGUF.

    The file appears at `out_path` only when complete (written under a temporary name, then renamed).
    Tied models omit output.weight (llama.cpp reuses token_embd) unless write_output_for_tied.
    add_bos: llama.cpp prepends BOS to text prompts (tokenizer.ggml.add_bos_token). Off by default:
    Atlas trains on documents that end in EOS and never start with BOS, so prompts carry no BOS.
    calibration: {Dense path: input second moment H} (`quantize.input_hessians` on text the model saw):
    q4_0 matrices are then quantized by GPTQ (`quantize.gptq_q4_0`) instead of rounding each weight
    to its nearest code; the file format is the same.
    """
    if ftype not in ALL_FTYPES:
        raise ExportError(f"--type '{ftype}' is not one of {', '.join(ALL_FTYPES)}")
    cfg = model_cfg
    if cfg.n_kv_heads is None or cfg.d_ff is None:
        raise ExportError("model config is not resolved (n_kv_heads/d_ff unset); pass config.resolve_model(cfg)")
    if cfg.arch not in ARCHS:
        raise ExportError(f"model.arch '{cfg.arch}' has no GGUF mapping; export supports {', '.join(ARCHS)}")
    check_params(flatten(params), cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"atlas-{cfg.arch}"

    if ftype in LLAMACPP_FTYPES:  # f32 first, then llama.cpp's own quantizer
        f32 = _temp_path(out_path)
        try:
            export_gguf(params, cfg, tokenizer_path, f32, "f32", name, write_output_for_tied, add_bos)
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
    tensors = gguf_tensors(params, cfg, write_output_for_tied)
    tmp = _temp_path(out_path)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHS[cfg.arch]])
        for key, (value, vtype, sub_type) in meta.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        has_output = any(kind == T.OUTPUT for kind, _, _ in tensors)
        inputs = dense_inputs(cfg)
        for kind, tname, array in tensors:
            is_output = kind == T.OUTPUT or (kind == T.TOKEN_EMBD and not has_output)
            qtype = tensor_type(kind, array.shape, ftype, is_output)
            hessian = (calibration or {}).get(inputs.get(tname))
            if qtype == QT.Q4_0 and hessian is not None:
                data, raw_dtype = gptq_q4_0(array, hessian), QT.Q4_0
            else:
                data, raw_dtype = _encode(array, qtype)
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


# --------------------------------------------------------------------------- llama.cpp, in a child process

GGML_TYPE_F32 = 0  # llama.cpp KV-cache type for parity checks (the default f16 cache costs ~1e-3)
LLAMA_THREADS = 2


def llamacpp_logits(gguf_path: str | Path, tokens: Sequence[int] | Sequence[Sequence[int]],
                    n_threads: int = LLAMA_THREADS) -> np.ndarray | list[np.ndarray]:
    """llama.cpp's float32 logits [T, V] for one token sequence (or a list of them), f32 KV cache."""
    single = len(tokens) > 0 and np.ndim(tokens[0]) == 0
    seqs = [list(map(int, tokens))] if single else [list(map(int, t)) for t in tokens]
    out = _run_child("logits", path=str(gguf_path), seqs=seqs, n_threads=n_threads)
    return out[0] if single else out


def llamacpp_tokenize(gguf_path: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's ids for each text (no BOS, special tokens not parsed)."""
    return _run_child("tokenize", path=str(gguf_path), texts=list(texts))


def llamacpp_generate(gguf_path: str | Path, prompt: str | Sequence[int], n_tokens: int, greedy: bool = True,
                      temperature: float = 0.8, seed: int = 0, n_threads: int = LLAMA_THREADS) -> list[int]:
    """The ids llama.cpp generates after `prompt` (ids as given, or text tokenized by llama.cpp,
    which prepends BOS when the file's add_bos_token says so).

    greedy: argmax of llama.cpp's logits at every step (compare with Atlas greedy decoding);
    else llama.cpp's own sampler at `temperature`.
    """
    return _run_child("generate", path=str(gguf_path), prompt=prompt if isinstance(prompt, str) else
                      [int(t) for t in prompt], n_tokens=int(n_tokens), greedy=greedy,
                      temperature=float(temperature), seed=int(seed), n_threads=n_threads)


def llamacpp_perplexity(gguf_path: str | Path, tokens: Sequence[int], window: int, max_windows: int | None = None,
                        n_threads: int = LLAMA_THREADS) -> dict[str, float]:
    """Perplexity over non-overlapping `window`-token windows of `tokens`, each evaluated from an empty
    cache and scored on its last window-1 tokens: {'ppl', 'nll' (mean, nats), 'tokens'}."""
    return _run_child("perplexity", path=str(gguf_path), tokens=np.asarray(tokens, np.int32),
                      window=int(window), max_windows=max_windows, n_threads=n_threads)


def llamacpp_quantize(src: str | Path, dst: str | Path, ftype: str, n_threads: int = LLAMA_THREADS) -> Path:
    """Re-quantize an f32/f16 GGUF with llama.cpp's quantizer (llama_model_quantize) to q4_k_m/q5_k_m/q6_k."""
    if ftype not in LLAMACPP_FTYPES:
        raise ExportError(f"llama.cpp quantization '{ftype}' is not one of {', '.join(LLAMACPP_FTYPES)}")
    _run_child("quantize", src=str(src), dst=str(dst), ftype=int(LLAMACPP_FTYPES[ftype]), n_threads=n_threads)
    return Path(dst)


def _run_child(job: str, **kwargs) -> Any:
    """Run `_JOBS[job](**kwargs)` (or "module:function") in a fresh interpreter; a native crash
    becomes a LlamaCppError naming the signal instead of taking the caller down."""
    what = kwargs.get("path") or kwargs.get("src")
    if job in _JOBS and importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppError(f"'{job}' needs llama-cpp-python, which is not installed; "
                            f"pip install -e '.[llama-cpp]' (llama-cpp-python==0.3.36)")
    with tempfile.TemporaryDirectory(prefix="atlas-llamacpp-") as d:
        req, res = Path(d, "request.pkl"), Path(d, "result.pkl")
        req.write_bytes(pickle.dumps((job, kwargs)))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        code = "import sys; from atlas_jax.export.gguf import _child_main; _child_main(sys.argv[1], sys.argv[2])"
        proc = subprocess.run([sys.executable, "-c", code, str(req), str(res)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        lines = proc.stderr.strip().splitlines()
        asserts = [ln.strip() for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower()]
        tail = asserts[-1] if asserts else " | ".join(lines[-3:])
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            raise LlamaCppError(f"llama.cpp crashed ({sig}) in '{job}' on {what}"
                                + (f"; stderr: {tail}" if tail else ""))
        if not res.exists():
            raise LlamaCppError(f"llama.cpp '{job}' on {what} exited with code {proc.returncode} and no result"
                                + (f"; stderr: {tail}" if tail else ""))
        ok, value = pickle.loads(res.read_bytes())
    if not ok:
        raise LlamaCppError(f"llama.cpp '{job}' on {what} failed: {value}")
    return value


def _child_main(request: str, result: str) -> None:
    job, kwargs = pickle.loads(Path(request).read_bytes())
    try:
        if job in _JOBS:
            fn = _JOBS[job]
        else:  # "module:function", for tests of the crash path
            module, _, attr = job.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        out = (True, fn(**kwargs))
    except Exception as e:  # reported to the parent as one line
        out = (False, f"{type(e).__name__}: {' '.join(str(e).split())}")
    Path(result).write_bytes(pickle.dumps(out))


def open_llama(path: str, n_ctx: int, logits_all: bool = True, n_threads: int = LLAMA_THREADS, seed: int = 0):
    """llama_cpp.Llama with an f32 KV cache and `use_extra_bufts` off (see the module docstring).

    The high-level Llama builds its model params from llama_model_default_params() inside
    __init__ and exposes no switch for use_extra_bufts, so that function is swapped for the
    duration of the constructor (call this in a single-threaded process, as the child jobs do).
    """
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_bufts
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=seed,
                              n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    finally:
        lib.llama_model_default_params = defaults
    assert not llm.model_params.use_extra_bufts
    return llm


def _check_context(llm, n_tokens: int) -> None:
    """Positions past the training context: gpt2's position table ends there (llama.cpp aborts)."""
    n_ctx_train = llm._model.n_ctx_train()
    if n_tokens > n_ctx_train:
        raise ValueError(f"{n_tokens} tokens do not fit the model's context_length {n_ctx_train}")


def _job_logits(path: str, seqs: list[list[int]], n_threads: int) -> list[np.ndarray]:
    llm = open_llama(path, n_ctx=max(len(s) for s in seqs), n_threads=n_threads)
    _check_context(llm, max(len(s) for s in seqs))
    out = []
    for seq in seqs:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[:len(seq)], dtype=np.float32))
    return out


def _tokenize(path: str, texts: list[str], add_special: bool) -> list[list[int]]:
    """llama_tokenize on a vocab-only load (special tokens in the text are not parsed)."""
    import ctypes

    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    try:
        out = []
        for text in texts:
            data = text.encode("utf-8")
            n = len(data) + 2
            while True:
                buf = (lib.llama_token * n)()
                got = lib.llama_tokenize(model.vocab, data, len(data), buf, n, add_special, False)
                if got >= 0:
                    break
                n = -got
            out.append([int(t) for t in ctypes.cast(buf, ctypes.POINTER(lib.llama_token))[:got]])
        return out
    finally:
        model.close()


def _job_tokenize(path: str, texts: list[str]) -> list[list[int]]:
    return _tokenize(path, texts, add_special=False)


def _job_generate(path: str, prompt, n_tokens: int, greedy: bool, temperature: float, seed: int,
                  n_threads: int) -> list[int]:
    if isinstance(prompt, str):
        prompt = _tokenize(path, [prompt], add_special=True)[0]  # BOS per the file's add_bos_token
    n_ctx = len(prompt) + n_tokens
    llm = open_llama(path, n_ctx=n_ctx, logits_all=greedy, n_threads=n_threads, seed=seed)
    _check_context(llm, n_ctx)
    if not greedy:
        out = []
        for tok in llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, reset=True):
            out.append(int(tok))
            if len(out) == n_tokens or tok == llm.token_eos():
                break
        return out
    out, seq = [], list(prompt)
    llm.eval(seq)
    for _ in range(n_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if len(out) < n_tokens:
            llm.eval([nxt])
    return out


def _job_perplexity(path: str, tokens: np.ndarray, window: int, max_windows: int | None,
                    n_threads: int) -> dict[str, float]:
    n = len(tokens) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens hold no {window}-token window")
    llm = open_llama(path, n_ctx=window, n_threads=n_threads)
    _check_context(llm, window)
    total, count = 0.0, 0
    for w in range(n):
        seq = tokens[w * window:(w + 1) * window].tolist()
        llm.reset()
        llm.eval(seq)
        logits = np.asarray(llm.scores[:window - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float(np.sum(logz - logits[np.arange(window - 1), seq[1:]]))
        count += window - 1
    return {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count}


def _job_quantize(src: str, dst: str, ftype: int, n_threads: int) -> None:
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    if lib.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed")


_JOBS = {"logits": _job_logits, "tokenize": _job_tokenize, "generate": _job_generate,
         "perplexity": _job_perplexity, "quantize": _job_quantize}


# --------------------------------------------------------------------------- Atlas vs llama.cpp


def atlas_logits(params: Mapping, cfg: ModelConfig, tokens_NxT: np.ndarray) -> np.ndarray:
    """Atlas' float32 logits [N, T, V] for full sequences (the reference llama.cpp is held to)."""
    import jax
    import jax.numpy as jnp

    from atlas_jax.model import Transformer

    key = repr(cfg)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    return np.asarray(_FORWARDS[key](params, jnp.asarray(tokens_NxT, jnp.int32)))


_FORWARDS: dict[str, Any] = {}  # jitted forward per model config


def _nll(logits_NxTxV: np.ndarray, tokens_NxT: np.ndarray) -> tuple[float, int]:
    """Summed NLL (nats) of tokens[:, 1:] under logits[:, :-1], and how many tokens that is."""
    x = logits_NxTxV[:, :-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    target = np.take_along_axis(x, tokens_NxT[:, 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.sum(logz - target)), int(target.size)


def compare_with_llamacpp(params: Mapping, cfg: ModelConfig, tokenizer_path: str | Path, windows_NxT: np.ndarray,
                          out_dir: str | Path, ftypes: Sequence[str] = ("f32", "q8_0", "q4_0"),
                          greedy_prompt: Sequence[int] | None = None, greedy_tokens: int = 32,
                          calibration: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Export `params` as each type in `ftypes` and hold llama.cpp to Atlas on the token windows.

    Per type: bytes (file size), max_abs (largest |logit difference|), top1 (fraction of positions
    whose argmax agrees), ppl_atlas / ppl_llamacpp (perplexity of windows[:, 1:]) and, with
    greedy_prompt, greedy_match (llama.cpp's greedy continuation equals Atlas' sample.generate at
    temperature 0). The files are left in out_dir as <ftype>.gguf. With `calibration` (see
    export_gguf) the type "q4_0" is GPTQ-quantized and "q4_0-rtn" is the plain round-to-nearest one.
    """
    import jax

    from atlas_jax.config import SampleConfig
    from atlas_jax.sample import generate

    windows_NxT = np.asarray(windows_NxT, dtype=np.int32)
    ref = atlas_logits(params, cfg, windows_NxT)
    nll_ref, count = _nll(ref, windows_NxT)
    atlas_greedy = None
    if greedy_prompt is not None:
        toks, lengths = generate(params, [list(greedy_prompt)], jax.random.key(0),
                                 SampleConfig(temperature=0.0, max_new_tokens=greedy_tokens), cfg)
        atlas_greedy = np.asarray(toks)[0, :int(lengths[0])].tolist()
    report = {}
    for ftype in ftypes:
        path = export_gguf(params, cfg, tokenizer_path, Path(out_dir) / f"{ftype}.gguf", ftype.removesuffix("-rtn"),
                           calibration=None if ftype.endswith("-rtn") else calibration)
        got = np.stack(llamacpp_logits(path, [w.tolist() for w in windows_NxT]))
        nll, _ = _nll(got, windows_NxT)
        row = {"bytes": path.stat().st_size, "max_abs": float(np.abs(got - ref).max()),
               "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
               "ppl_atlas": float(np.exp(nll_ref / count)), "ppl_llamacpp": float(np.exp(nll / count))}
        if atlas_greedy is not None:
            ours = llamacpp_generate(path, list(greedy_prompt), greedy_tokens, greedy=True)
            row["greedy_match"] = ours == atlas_greedy
        report[ftype] = row
    return report


def run_calibration(params: Mapping, cfg, data_dir: str | Path, n_windows: int = 32) -> dict[str, np.ndarray]:
    """`quantize.input_hessians` over n_windows data.seq_len-token windows spread evenly over the
    run's train split (never the validation split the quality is measured on)."""
    from atlas_jax.data.prepare import load_split
    from atlas_jax.export.quantize import input_hessians

    try:
        train = np.asarray(load_split(data_dir, "train"))
    except (DataError, OSError) as e:
        raise ExportError(f"{data_dir}: no train split to calibrate q4_0 on ({' '.join(str(e).split())[:200]}); "
                          f"pass --no-calibrate") from None
    window = cfg.data.seq_len
    if len(train) < window + 1:
        raise ExportError(f"{data_dir}: the train split ({len(train)} tokens) holds no {window}-token window "
                          f"to calibrate on; pass --no-calibrate")
    starts = np.linspace(0, len(train) - window, num=min(n_windows, len(train) // window)).astype(np.int64)
    return input_hessians(params, cfg.model, np.stack([train[s:s + window] for s in starts]))


def compare_run_with_llamacpp(run_dir: str | Path, out_dir: str | Path,
                              ftypes: Sequence[str] = ("f32", "f16", "q8_0", "q4_0", "q4_0-rtn", "q4_k_m",
                                                       "q5_k_m", "q6_k"),
                              window: int | None = None, n_windows: int = 16, greedy_tokens: int = 32
                              ) -> dict[str, dict]:
    """`compare_with_llamacpp` for a trained run: windows from the head of its validation split
    (<data_dir>/val.bin; `window` defaults to data.seq_len), greedy continuation of the first window's
    first 16 tokens; q4_0 calibrated on the train split (`run_calibration`)."""
    from atlas_jax.checkpoint import find_checkpoint, load_for_inference
    from atlas_jax.data.prepare import load_split, run_data_dir

    params, cfg, tokenizer_path = load_for_inference(run_dir)
    data_dir = run_data_dir(cfg.data, find_checkpoint(run_dir)[0])
    calibration = run_calibration(params, cfg, data_dir) if "q4_0" in ftypes else None
    val = np.asarray(load_split(data_dir, "val"))
    window = window or cfg.data.seq_len
    n = min(n_windows, len(val) // window)
    if n == 0:
        raise ExportError(f"{data_dir}: the val split ({len(val)} tokens) holds no {window}-token window")
    windows = val[:n * window].reshape(n, window)
    return compare_with_llamacpp(params, cfg.model, tokenizer_path, windows, out_dir, ftypes,
                                 greedy_prompt=windows[0, :16].tolist(), greedy_tokens=greedy_tokens,
                                 calibration=calibration)
