#!/usr/bin/env bash
# The main job on the default corpus: train a small model on tinyshakespeare (configs/shakespeare.yaml),
# sample from it with atlas_jax, export GGUF files, and generate from them with llama.cpp.
# Extra arguments go to the trainer as overrides, e.g.  bash scripts/main.sh train.steps=200
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/shakespeare
for arg in "$@"; do case "$arg" in train.run_dir=*) RUN="${arg#train.run_dir=}";; esac; done

# Use ../shared/data's copy of the corpus when it is there; otherwise it is downloaded (sha256 checked).
if [ -f ../shared/data/tinyshakespeare.txt ]; then
  python -m atlas_jax.data seed tinyshakespeare ../shared/data/tinyshakespeare.txt
fi

echo "== train"; python -m atlas_jax.train --config configs/shakespeare.yaml "$@"
echo "== sample (atlas_jax)"
python -m atlas_jax.generate --checkpoint "$RUN" --prompt "ROMEO:" --max-new-tokens 120 --seed 1
echo "== export GGUF"
python scripts/to_gguf.py "$RUN" --out "$RUN/shakespeare-f32.gguf" --force  # a re-run replaces its own exports
python scripts/to_gguf.py "$RUN" --out "$RUN/shakespeare-q8_0.gguf" --type q8_0 --force
echo "== generate (llama.cpp, q8_0)"
python scripts/llamacpp_generate.py "$RUN/shakespeare-q8_0.gguf" --prompt "ROMEO:" --max-tokens 120 --seed 1
