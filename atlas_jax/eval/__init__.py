"""Evaluation: perplexity and bits per byte (an Atlas run or a GGUF file), task metrics from JSONL, lm-eval.

`perplexity` (strided windows), `metrics` (pure functions), `tasks` (generation + metrics), `harness`
(the `atlas` lm-evaluation-harness model), `report` (JSON, markdown, PNG), `gguf_job` (llama.cpp
side, in a child process); the CLI is `atlas_jax.eval.__main__`.
Nothing is imported here, so the llama.cpp child that imports gguf_job stays light.
"""
