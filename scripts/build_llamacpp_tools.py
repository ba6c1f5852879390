"""Build llama.cpp's llama-bench and llama-batched-bench for `bench decode` (benchmarks only;
atlas_jax/bench/llamacpp_tools.py), once, into $ATLAS_CACHE/llamacpp-tools/<llama-cpp-python version>/.

    python scripts/build_llamacpp_tools.py [--sdist llama_cpp_python-X.tar.gz] [--force] [--jobs 2]
"""
from atlas_jax.bench.llamacpp_tools import build_cli
from atlas_jax.errors import run_cli

if __name__ == "__main__":
    run_cli(build_cli)
