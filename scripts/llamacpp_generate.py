"""Generate text with llama.cpp from a GGUF file, streaming it (atlas_jax/export/llamacpp_generate.py).

    python scripts/llamacpp_generate.py runs/shakespeare/shakespeare-q8_0.gguf --prompt "ROMEO:" --max-tokens 120

Needs the package installed (pip install -e .); the same as `python -m atlas_jax.export.llamacpp_generate`.
"""
from atlas_jax.export.llamacpp_generate import cli

if __name__ == "__main__":
    cli()
