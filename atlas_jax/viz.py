"""Pictures of a trained model: the attention weights it computes on a prompt.

    python -m atlas_jax.viz attention --checkpoint runs/shakespeare --prompt "ROMEO: But soft" [--layer L]
        [--head H] [--out attention.png]

The weights are the model's own: `model.Transformer` run with the `attention_weights` collection
mutable sows, in every layer, the softmax its attention kernel mixes the values with
(`kernels.einsum_attention_with_probs`, the CPU default path; `model.ATTENTION_WEIGHTS`). The PNG is
a grid of layers (rows) x heads (columns), or the one layer / head --layer / --head pick, each cell a
query x key heat map with the prompt's token pieces on its axes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.errors import AtlasError, run_cli
from atlas_jax.model import ATTENTION_WEIGHTS, Transformer

DPI = 100


def attention_weights(params, cfg: ModelConfig, tokens: list[int]) -> np.ndarray:
    """probs_LxNxTxT: layer l, query head n, query t, key s, for one prompt (rows sum to 1, causal)."""
    _, sown = Transformer(cfg).apply({"params": params}, jnp.asarray([tokens], jnp.int32),
                                     mutable=[ATTENTION_WEIGHTS])
    layers = sown[ATTENTION_WEIGHTS]
    return np.stack([np.asarray(layers[f"layers_{i}"]["attn"]["probs"][0][0]) for i in range(cfg.n_layers)])


def cell_inches(t: int) -> float:
    """One heat map's side: room for t token labels."""
    return max(2.5, 0.18 * t + 1.0)


def figure_pixels(rows: int, cols: int, t: int) -> tuple[int, int]:
    """(width, height) of the PNG `plot_attention` writes."""
    side = cell_inches(t)
    return round(cols * side * DPI), round(rows * side * DPI)


def plot_attention(probs_LxNxTxT: np.ndarray, labels: list[str], layers: list[int], heads: list[int],
                   out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = probs_LxNxTxT.shape[-1]
    side = cell_inches(t)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(len(heads) * side, len(layers) * side), dpi=DPI,
                             squeeze=False)
    size = max(4, min(8, 200 / max(t, 1)))
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(probs_LxNxTxT[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(t), labels, rotation=90, fontsize=size)
            ax.set_yticks(range(t), labels, fontsize=size)
            if r == len(layers) - 1:
                ax.set_xlabel("key", fontsize=8)
            if c == 0:
                ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _pick(value: int | None, n: int, flag: str, what: str) -> list[int]:
    if value is None:
        return list(range(n))
    if not 0 <= value < n:
        raise AtlasError(f"{flag} {value}: the model has {n} {what} (0..{n - 1})")
    return [value]


def attention_main(args: argparse.Namespace) -> int:
    from atlas_jax.init_from import load_model
    from atlas_jax.tokenizer import Tokenizer

    if not args.prompt:
        raise AtlasError("--prompt is empty; give the text whose attention to draw")
    params, cfg, tok_path = load_model(args.checkpoint)
    m = cfg.model
    layers = _pick(args.layer, m.n_layers, "--layer", "layers")
    heads = _pick(args.head, m.n_heads, "--head", "heads")
    tok = Tokenizer.load(tok_path)
    tokens = tok.encode(args.prompt)
    if len(tokens) > m.max_seq_len:
        raise AtlasError(f"--prompt is {len(tokens)} tokens, longer than the model's context "
                         f"(model.max_seq_len={m.max_seq_len}); shorten it")
    probs = attention_weights(params, m, tokens)
    labels = [tok.piece(i) for i in tokens]
    out = plot_attention(probs, labels, layers, heads, args.out,
                         f"{args.checkpoint}: {len(tokens)} tokens of {args.prompt[:60]!r}")
    print(f"wrote {out} ({len(layers)} layer(s) x {len(heads)} head(s), {len(tokens)} tokens)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_jax.viz", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="a PNG of the attention weights on a prompt")
    a.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a step directory")
    a.add_argument("--prompt", required=True, help="the text")
    a.add_argument("--layer", type=int, help="one layer (default: all)")
    a.add_argument("--head", type=int, help="one query head (default: all)")
    a.add_argument("--out", type=Path, default=Path("attention.png"), help="the PNG to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return attention_main(args)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
