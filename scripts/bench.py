"""Benchmarks: figures, never pass/fail (atlas_jax.bench; the same as `python -m atlas_jax.bench`).

    python scripts/bench.py train|decode|scaling|quality [--quick] [--config X.yaml] [section.key=value ...]
"""
from atlas_jax.bench.cli import cli

if __name__ == "__main__":
    cli()
