"""Helpers shared by tests that read a training run's files."""
from __future__ import annotations

import json
from pathlib import Path


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step train loss from metrics.jsonl; a resumed run re-logs steps and the last record wins."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out
