"""Hugging Face checkpoints in and out (transformers' GPT-2, Llama and Mistral classes).

    python -m atlas_jax.hf import SRC --out RUN_DIR     SRC: a model directory or a hub id
    python -m atlas_jax.hf export RUN_DIR --out HF_DIR

`convert`: config and tensor tables (RoPE row permutation included); `io`: model directories, the
hub, streamed safetensors; `run`: import into / export from Atlas run directories.
"""
