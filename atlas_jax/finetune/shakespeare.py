"""Chat and preference data made from tinyshakespeare, so SFT and DPO run with nothing downloaded.

A speech of the play is a block "NAME:\\nline\\nline...". Each example asks for the rest of a speech:
    user:      "Continue ROMEO's speech: <its first line>"
    assistant: the speech's next lines (at most `max_lines`)
SFT rows hold that conversation; DPO rows hold the same prompt with the true continuation as chosen
and, as rejected, the continuation of another character's speech (fluent, but not what was asked).
The split into rows is seeded, so the same corpus and seed give the same files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from atlas_jax.errors import DataError


def speeches(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.strip("\n").split("\n") if ln.strip()]
        if len(lines) >= 3 and lines[0].endswith(":") and lines[0][:-1].replace(" ", "").isalpha():
            out.append((lines[0][:-1], lines[1:]))
    return out


def make_rows(text: str, n: int, seed: int = 0, max_lines: int = 2) -> tuple[list[dict], list[dict]]:
    """(sft rows, dpo rows), n of each."""
    pool = speeches(text)
    if len(pool) < 2:
        raise DataError("the corpus holds fewer than 2 speeches (NAME: then lines); use tinyshakespeare")
    rng = random.Random(seed)
    picked = [pool[i] for i in rng.sample(range(len(pool)), min(n, len(pool)))]
    sft, dpo = [], []
    for name, lines in picked:
        prompt = f"Continue {name}'s speech: {lines[0]}"
        reply = "\n".join(lines[1:1 + max_lines])
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
        while True:
            other_name, other = pool[rng.randrange(len(pool))]
            if other_name != name:
                break
        dpo.append({"prompt": prompt, "chosen": reply, "rejected": "\n".join(other[1:1 + max_lines])})
    return sft, dpo


def write_jsonl(rows: list[dict], path: Path) -> Path:
    from atlas_jax.files import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
