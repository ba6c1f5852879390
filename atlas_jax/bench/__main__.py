"""python -m atlas_jax.bench: the benchmarks' command line (atlas_jax.bench.cli)."""
from atlas_jax.bench.cli import cli

if __name__ == "__main__":  # not when a spawned child re-imports the main module
    cli()
