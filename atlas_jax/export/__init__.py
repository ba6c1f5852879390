"""Shipping trained models: GGUF files for llama.cpp, and llama.cpp's view of them.

gguf.py writes the file; llamacpp.py runs llama.cpp on it (in child processes); quality.py holds
llama.cpp to Atlas per --type; calibrate.py measures the inputs GPTQ q4_0 (quantize.py) uses.
The commands are to_gguf.py and llamacpp_generate.py (`python -m atlas_jax.export.to_gguf`).
"""
from atlas_jax.export.calibrate import run_calibration
from atlas_jax.export.gguf import ALL_FTYPES, ExportError, ExportWarning, export_gguf
from atlas_jax.export.llamacpp import (
    LlamaCppError,
    llamacpp_generate,
    llamacpp_logits,
    llamacpp_perplexity,
    llamacpp_quantize,
    llamacpp_tokenize,
)
from atlas_jax.export.quality import compare_run_with_llamacpp, compare_with_llamacpp

__all__ = ["ALL_FTYPES", "ExportError", "ExportWarning", "LlamaCppError", "compare_run_with_llamacpp",
           "compare_with_llamacpp", "export_gguf", "llamacpp_generate", "llamacpp_logits", "llamacpp_perplexity",
           "llamacpp_quantize", "llamacpp_tokenize", "run_calibration"]
