"""The arithmetic task, the calculator, the pipeline's statistics, and `python -m atlas_jax.eval.pipeline
--quick` end to end (issue #14): every stage runs, the table's figures agree with each other and with
the files the pipeline wrote."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlas_jax.eval import arith
from atlas_jax.eval import metrics as M
from atlas_jax.eval.pipeline import _curves, _vote, answer_of, paired_difference, wilson
from atlas_jax.eval.tasks import score_rows
from tests.unit.cli_checks import one_line_error

REPO = Path(__file__).resolve().parents[2]


def test_split_is_seeded_disjoint_and_correct():
    train, held = arith.make_split(3000, 500, seed=1)
    again, _ = arith.make_split(3000, 500, seed=1)
    assert train == again and len(train) == 3000 and len(held) == 500
    triples = lambda ps: {(p.op, p.a, p.b) for p in ps}  # noqa: E731
    assert not triples(train) & triples(held) and len(triples(train)) == 3000
    assert all(arith.is_heldout(p.op, p.a, p.b) for p in held) and not any(arith.is_heldout(p.op, p.a, p.b) for p in train)
    other_seed, _ = arith.make_split(3000, 500, seed=2)
    assert not triples(other_seed) & triples(held)  # disjoint whatever the seed: the side is the triple's hash
    assert {p.op for p in train} == {"+", "-", "*"}
    for p in train[:200]:
        assert p.answer >= 0 and M.check_working(p.completion) is True and answer_of(p.completion) == p.answer
        assert str(p.a) in p.question and str(p.b) in p.question


def test_calculator_and_answers():
    assert M.check_working("47 + 38 = 85\n#### 85") is True
    assert M.check_working("47 + 38 = 84\n#### 84") is False
    assert M.check_working("12 x 3 = 36, then 36 - 40 = -4") is True
    assert M.check_working("12 * 3 = 36 and 2 * 2 = 5") is False  # one wrong equation fails the text
    assert M.check_working("#### 85") is None and M.check_working("1.5 + 2 = 3.5") is None
    assert answer_of("2 + 2 = 4\n#### 4") == 4 and answer_of("#### four") is None and answer_of("4") is None
    assert answer_of("#### 1576<|im_") == 1576  # a reply cut inside the end-of-turn text still has its answer
    from atlas_jax.finetune.templates import load_template

    assert load_template("chatml").end_of_turn() == "<|im_end|>"  # where the policies' replies are cut
    out, _ = score_rows(["calculator"], [["#### 4"]] * 3, ["2 + 2 = 4\n#### 4", "2 + 2 = 5\n#### 5", "#### 4"], None, 1)
    assert out["calculator"] == pytest.approx(1 / 3)


def test_statistics_by_hand():
    lo, hi = wilson(50, 100)  # p = 0.5, n = 100: 0.5 -+ 1.96 * sqrt(0.25/100 + 1.96^2/40000) / (1 + 1.96^2/100)
    assert lo == pytest.approx(0.40383, abs=1e-5) and hi == pytest.approx(0.59617, abs=1e-5)
    lo, hi = wilson(0, 40)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1.96 ** 2 / (40 + 1.96 ** 2))
    a, b = np.array([1, 0, 0, 1, 0]), np.array([1, 1, 0, 1, 1])
    d, dlo, dhi = paired_difference(a, b)  # differences 0 1 0 0 1: mean 0.4, sd 0.5477
    assert d == pytest.approx(0.4) and dhi - d == pytest.approx(1.96 * 0.547723 / np.sqrt(5), rel=1e-5)
    assert _vote([3, None, 4, 4, 3]) == 3 and _vote([None, 5, 6, 6]) == 6 and _vote([None]) is None
    scores = np.array([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    answers, truth = [[1, 2, 2], [7, 8, 8]], np.array([2, 8])
    ok = np.array([[a == t for a in row] for row, t in zip(answers, truth)])
    c = _curves(scores, answers, truth, ok)
    assert [x["best_of"] for x in c] == [0.0, 0.5, 0.5] and [x["majority"] for x in c] == [0.0, 0.0, 1.0]  # m=2: ties go to the first seen
    assert [x["any_correct"] for x in c] == [0.0, 1.0, 1.0]


def test_pipeline_quick_end_to_end(tmp_path):
    out = tmp_path / "arith"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.eval.pipeline", "--out", str(out), "--quick", "--heldout", "24",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    names = [row["stage"] for row in result["rows"]]
    assert names[:3] == ["base", "sft", "dpo"] and len(names) == 6
    assert any("best-of-4" in n for n in names) and any("self-consistency" in n for n in names)
    for row in result["rows"]:
        assert row["problems"] == 24 and row["accuracy"] == pytest.approx(row["correct"] / 24)
        assert tuple(row["ci95"]) == pytest.approx(wilson(row["correct"], 24))
        assert 0.0 <= row["calculator"] <= 1.0
        if row["builds_on"] is not None:
            prior = next(x for x in result["rows"] if x["stage"] == row["builds_on"])
            assert row["difference"][0] == pytest.approx(row["accuracy"] - prior["accuracy"])
    assert 1.0 <= result["rows"][4]["samples_per_problem"] <= 4.0  # revise-and-retry draws 1..n
    curve = result["curve"]
    assert [c["samples"] for c in curve] == [1, 2, 3, 4]
    assert all(a["any_correct"] <= b["any_correct"] for a, b in zip(curve, curve[1:]))
    assert result["rows"][3]["accuracy"] == pytest.approx(curve[-1]["best_of"])  # best-of-n = the curve at n
    pairs = [json.loads(line) for line in (out / "data" / "dpo.jsonl").read_text().splitlines()]
    assert len(pairs) == result["dpo_pairs"] and all(answer_of(p["rejected"]) != answer_of(p["chosen"]) for p in pairs)
    assert sum(p["chosen_from"] == "sample" for p in pairs) == result["dpo_pairs_sample_chosen"]
    held = [json.loads(line)["prompt"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    trained = {json.loads(line)["prompt"] for line in (out / "data" / "sft.jsonl").read_text().splitlines()}
    assert len(held) == 24 and not set(held) & trained
    assert (out / "verifier" / "verifier.msgpack").stat().st_size > 0
    from PIL import Image

    assert Image.open(out / "accuracy_vs_samples.png").size == (720, 480)
    md = (out / "results.md").read_text()
    assert md.count("\n") == 8 and "95% CI" in md and md in r.stdout
    assert {s["stage"] for s in result["stages"]} >= {"base", "sft", "dpo", "train verifier"}


def test_pipeline_bad_input_is_one_line(tmp_path):
    for args, needle in ((["--heldout", "0"], "--heldout 0"), (["--samples", "1"], "--samples 1")):
        r = subprocess.run([sys.executable, "-m", "atlas_jax.eval.pipeline", "--out", str(tmp_path / "x"), *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        one_line_error(r, needle)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "atlas_jax.eval.pipeline", "--out", str(blocker)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "--out")
