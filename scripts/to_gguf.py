"""Export a trained Atlas checkpoint as a GGUF file for llama.cpp (atlas_jax/export/to_gguf.py).

    python scripts/to_gguf.py runs/shakespeare --out shakespeare.gguf [--type q8_0] [--name NAME]

Needs the package installed (pip install -e .); the same as `python -m atlas_jax.export.to_gguf`.
"""
from atlas_jax.export.to_gguf import cli

if __name__ == "__main__":
    cli()
