"""Shipping trained models: GGUF files for llama.cpp, and llama.cpp's view of them."""
from atlas_jax.export.gguf import (
    ALL_FTYPES,
    ExportError,
    LlamaCppError,
    compare_run_with_llamacpp,
    compare_with_llamacpp,
    export_gguf,
    llamacpp_generate,
    llamacpp_logits,
    llamacpp_perplexity,
    llamacpp_quantize,
    llamacpp_tokenize,
)

__all__ = ["ALL_FTYPES", "ExportError", "LlamaCppError", "compare_run_with_llamacpp", "compare_with_llamacpp",
           "export_gguf", "llamacpp_generate", "llamacpp_logits", "llamacpp_perplexity", "llamacpp_quantize",
           "llamacpp_tokenize"]
