"""Benchmarks: figures, never pass/fail. One module per subcommand (train, decode, scaling,
quality), the shared helpers in common, the JSON/markdown/PNG writers in report, the flags in cli.

    python -m atlas_jax.bench train|decode|scaling|quality [--quick] ...   (or scripts/bench.py)
"""
