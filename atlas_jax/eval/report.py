"""What `python -m atlas_jax.eval` writes: the JSON file, the markdown tables, the bits-per-byte curve."""
from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(path: str | Path, result: dict) -> Path:
    """result as indented JSON, written to a temporary beside `path`, then renamed."""
    from atlas_jax.files import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ppl_markdown(result: dict) -> str:
    s = result["summary"]
    head = table(["model", "text", "window / stride", "tokens", "bytes", "nats/token", "perplexity", "bits/byte"],
                 [[result["model"], result["text"], f"{result['window']} / {result['stride']}", s["tokens"],
                   s["bytes"], s["nats_per_token"], s["perplexity"], s["bits_per_byte"]]])
    return head


def tasks_markdown(result: dict) -> str:
    m, lat = result["metrics"], result["latency"]
    rows = [[name, value] for name, value in m.items()]
    rows += [["time to first token (median, s)", lat["ttft_s_median"]],
             ["decode tokens/s (median, greedy)", lat["decode_tokens_per_s_median"]]]
    if "sampled_tokens_per_s" in lat:
        rows.append([f"sampled tokens/s ({result['n']} per prompt)", lat["sampled_tokens_per_s"]])
    return table(["metric", "value"], rows)


def bpb_curve_png(path: str | Path, by_context: list[dict], bytes_per_token: float, title: str) -> Path:
    """Bits per byte (mean NLL per token / bytes per token) against the tokens of context the targets had."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [math.sqrt(b["context_from"] * b["context_to"]) for b in by_context]
    y = [b["nats_per_token"] / (math.log(2) * bytes_per_token) for b in by_context]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(x, y, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of context")
    ax.set_ylabel("bits per byte (at the text's bytes/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
