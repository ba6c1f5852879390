"""`python -m atlas_jax.eval` (issue #14, first part): every task metric against hand-computed values,
the strided window plan (every target once, enough context), strided perplexity equal to a direct
forward, an Atlas run and its f32 GGUF giving the same bits per byte, and the CLI's one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax.config import ModelConfig, resolve_model
from atlas_jax.errors import run_cli
from atlas_jax.eval import metrics as M
from atlas_jax.eval import perplexity as P
from atlas_jax.eval.__main__ import main
from atlas_jax.eval.tasks import cut_at_stop, parse_metrics, read_tasks, score_rows
from atlas_jax.model import Transformer, init_params

REPO = Path(__file__).resolve().parents[2]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
        "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n")


# --------------------------------------------------------------------------- metrics, by hand


def test_normalizer_is_squads():
    assert M.normalize_answer("  The Cat,  sat!\n on an apple. ") == "cat sat on apple"
    assert M.normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_by_hand():
    assert M.exact_match("The cat.", ["a dog", "cat"]) == 1.0
    assert M.exact_match("cats", ["cat"]) == 0.0
    # pred tokens [cat, sat, on, mat] (the dropped), ref [cat, sat]: P = 2/4, R = 2/2, F1 = 2/3
    assert M.token_f1("the cat sat on mat", ["cat sat"]) == pytest.approx(2 / 3)
    assert M.token_f1("x", ["y", "x y"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best reference
    assert M.token_f1("", [""]) == 1.0 and M.token_f1("", ["x"]) == 0.0
    assert M.token_f1("a a b", ["a b b"]) == pytest.approx(2 / 3)  # multisets: [b] vs [b, b]: P 1, R 1/2


def test_rouge_l_bleu_chrf_by_hand():
    # LCS("the cat sat on the mat", "the cat on mat") = 4 tokens: P = 4/4, R = 4/6, F = 0.8
    assert M.rouge_l("the cat on mat", ["no", "the cat sat on the mat"]) == pytest.approx(0.8)
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1): BLEU = (0.2)^(1/4)
    assert M.bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    assert M.bleu(["x y z w", "a b c d e"], [["x y z w"], ["q", "a b c d e"]]) == pytest.approx(100.0)
    # chrF (beta 2): char 1-grams P = R = 2/3, 2-grams 1/2, 3-grams 0; 3 orders present -> (2/3 + 1/2 + 0) / 3
    assert M.chrf(["abc"], [["abd"]]) == pytest.approx(100 * (2 / 3 + 1 / 2) / 3, abs=1e-6)


def test_pass_at_k_is_the_unbiased_estimator():
    assert M.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert M.pass_at_k(5, 0, 3) == 0.0 and M.pass_at_k(5, 4, 2) == 1.0
    for n, c, k in [(10, 3, 4), (7, 1, 7), (20, 5, 1)]:
        assert M.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_final_answer_and_majority_vote():
    assert M.final_answer("4 + 81 = 85\n#### 85\n") == "85"
    assert M.final_answer("#### 1\nno, wait\n####  1,234 \nthen more") == "1,234"
    assert M.final_answer("  just text \n") == "just text"
    assert M.majority_vote(["85", "84", " 85.", "84"]) == "85"  # a tie goes to the first seen
    assert M.majority_vote(["b", "a", "a"]) == "a"
    assert cut_at_stop("yes\nQ: next", ["\nQ:", "zzz"]) == ("yes", True)


def test_score_rows_on_hand_written_completions():
    refs = [["Work: 2 + 2\n#### 4"], ["Paris", "paris, france"], ["#### 7"]]
    greedy = ["so\n#### 4", "The Paris", "#### 8"]
    samples = [["#### 4", "#### 5", "#### 4"], ["Rome", "rome", "Paris"], ["#### 8", "#### 8", "#### 7"]]
    out, rows = score_rows(["exact_match", "f1", "pass_at_k", "self_consistency"], refs, greedy, samples, k=2)
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    # c per row 2, 1, 1 of n = 3, k = 2: pass@2 = 1, 1 - C(2,2)/C(3,2) = 2/3, 2/3
    assert out["pass_at_k"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert [r["vote"] for r in rows] == ["4", "Rome", "8"] and out["self_consistency"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- the window plan


@pytest.mark.parametrize("n,window,stride", [(2, 4, 1), (5, 4, 4), (13, 4, 4), (13, 4, 1), (40, 8, 3), (9, 8, 8)])
def test_plan_scores_every_target_once_with_context(n, window, stride):
    plan = P.plan_windows([n, 1, n + 3], window, stride)
    for doc, length in [(0, n), (2, n + 3)]:
        targets = []
        for w in (w for w in plan if w.doc == doc):
            assert w.length == min(window, length - 1) and w.begin >= 0 and w.begin + w.length <= length - 1
            for j in range(w.score_from, w.length):
                targets.append(w.begin + j + 1)
                context = j + 1
                assert context >= min(window - stride + 1, w.begin + j + 1), (w, j)
        assert sorted(targets) == list(range(1, length)), f"doc {doc}: targets {targets}"
    assert not [w for w in plan if w.doc == 1]  # one token: nothing to score


# --------------------------------------------------------------------------- strided perplexity


def _random_model(max_seq_len=16):
    cfg = resolve_model(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=max_seq_len))
    params = jax.tree_util.tree_map_with_path(  # x4: logits of order 1, so a wrong index shows
        lambda p, x: x * 4.0 if p[-1].key in ("kernel", "embedding") else x, init_params(cfg, jax.random.key(0)))
    return cfg, jax.tree.map(np.asarray, params)


_FORWARD = {}


def _direct_nll(cfg, params, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """NLLs of labels after each prefix of inputs: one forward, right-padded to max_seq_len (causal:
    the padding comes after every position read), float64 log-softmax in numpy."""
    if repr(cfg) not in _FORWARD:
        _FORWARD[repr(cfg)] = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    padded = np.zeros((1, cfg.max_seq_len), np.int32)
    padded[0, :len(inputs)] = inputs
    logits = np.asarray(_FORWARD[repr(cfg)](params, padded), np.float64)[0, :len(inputs)]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - logits[np.arange(len(labels)), labels]


def _strided(cfg, params, seqs, window, stride, batch_size=3) -> P.Totals:
    totals = P.Totals(window)
    for batch in P.score_atlas(params, cfg, seqs, P.plan_windows([len(s) for s in seqs], window, stride),
                               batch_size=batch_size):
        totals.add(batch)
    return totals


def test_strided_perplexity_with_stride_equal_window_is_a_direct_computation():
    cfg, params = _random_model()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 61, 3 * 16 + 1).astype(np.int32), rng.integers(0, 61, 9).astype(np.int32)]
    want = sum(_direct_nll(cfg, params, s[i:i + len(s[i + 1:i + 17])], s[i + 1:i + 17]).sum() for s in seqs
               for i in range(0, len(s) - 1, 16))
    got = _strided(cfg, params, seqs, 16, 16)
    assert got.tokens == 48 + 8 and got.windows == 4
    assert got.nll == pytest.approx(want, rel=1e-5)
    s = got.summary(n_bytes=100)
    assert s["bits_per_byte"] == pytest.approx(want / (math.log(2) * 100), rel=1e-5)
    assert s["perplexity"] == pytest.approx(math.exp(want / 56), rel=1e-5)


def test_strided_perplexity_scores_each_target_on_its_own_context():
    cfg, params = _random_model()
    seq = np.random.default_rng(1).integers(0, 61, 40).astype(np.int32)
    window, stride = 16, 5
    plan = P.plan_windows([len(seq)], window, stride)
    per_target = {}
    for batch in P.score_atlas(params, cfg, [seq], plan, batch_size=4):
        for s in batch:
            for j, v in zip(range(s.window.score_from, s.window.length), s.nll):
                per_target[s.window.begin + j + 1] = (v, s.window.begin)
    assert sorted(per_target) == list(range(1, 40))
    for t in (1, 16, 17, 23, 39):  # each against a forward over exactly the context it was given
        v, begin = per_target[t]
        assert t - begin >= min(t, window - stride + 1)
        want = _direct_nll(cfg, params, seq[begin:t], seq[begin + 1:t + 1])[-1]
        assert v == pytest.approx(want, rel=1e-5), f"target {t}"
    # a window as long as the sequence: any stride is the single full forward
    short = seq[:16]
    full = _direct_nll(cfg, params, short[:-1], short[1:]).sum()
    for st in (1, 7, 15):
        assert _strided(cfg, params, [short], 15, st).nll == pytest.approx(full, rel=1e-5)


# --------------------------------------------------------------------------- an Atlas run and its GGUF


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A small llama trained for a few steps (as test_lora's base_run)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.train", "--no-progress", "--no-samples",
                        "--config", "configs/tiny.yaml", f"train.run_dir={run}", "model.tie_embeddings=false",
                        "data.seq_len=32", "train.batch_size=4", "train.steps=8", "train.checkpoint_interval=8",
                        "train.eval_interval=100", "train.warmup_steps=0", "train.tracking=none"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    return run


def test_atlas_run_and_its_f32_gguf_give_the_same_bits_per_byte(run, tmp_path):
    pytest.importorskip("llama_cpp")
    from atlas_jax.export.gguf import export_gguf
    from atlas_jax.init_from import load_model
    from atlas_jax.tokenizer import Tokenizer

    params, cfg, tok_path = load_model(run)
    gguf = export_gguf(params, cfg.model, tok_path, tmp_path / "run.gguf", "f32")
    docs = [TEXT, TEXT[:97]]
    n_bytes = sum(len(d.encode()) for d in docs)
    window, stride = 48, 20

    seqs = P.atlas_sequences(Tokenizer.load(tok_path), docs)
    atlas = P.Totals(window)
    for b in P.score_atlas(params, cfg.model, seqs, P.plan_windows([len(s) for s in seqs], window, stride)):
        atlas.add(b)
    info = P.gguf_info(gguf)
    assert info["n_ctx_train"] == cfg.model.max_seq_len and not info["add_bos"]
    gseqs = P.gguf_sequences(gguf, docs, info)
    assert [s.tolist() for s in gseqs] == [s.tolist() for s in seqs], "llama.cpp tokenizes the text differently"
    llama = P.Totals(window)
    for b in P.score_gguf(gguf, gseqs, P.plan_windows([len(s) for s in gseqs], window, stride)):
        llama.add(b)
    a, g = atlas.summary(n_bytes), llama.summary(n_bytes)
    assert a["tokens"] == g["tokens"] == sum(len(s) - 1 for s in seqs) and a["windows"] == g["windows"]
    assert abs(a["bits_per_byte"] - g["bits_per_byte"]) < 1e-4, (a, g)

    # the CLI on the same run: the markdown table and the JSON file
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "ppl.json"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.eval", "ppl", "--checkpoint", str(run), "--text",
                        str(tmp_path / "t.txt"), "--window", "48", "--stride", "20", "--out", str(out),
                        "--plot", str(tmp_path / "bpb.png"), "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "| bits/byte |" in r.stdout.splitlines()[0]
    res = json.loads(out.read_text())
    assert res["summary"]["bytes"] == len(TEXT.encode()) and res["window"] == 48 and res["stride"] == 20
    assert (tmp_path / "bpb.png").stat().st_size > 0


# --------------------------------------------------------------------------- one-line errors


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    ppl = ["ppl", "--checkpoint", str(tmp_path / "nowhere"), "--text", str(text)]
    assert "--stride 9: must be between 1 and the window (8)" in _error([*ppl, "--window", "8", "--stride", "9"], capsys)
    assert "--stride 0" in _error([*ppl, "--window", "8", "--stride", "0"], capsys)

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    if __import__("importlib").util.find_spec("llama_cpp") is not None:
        assert str(bad) in _error(["ppl", "--gguf", str(bad), "--text", str(text)], capsys)

    err = _error(["tasks", "--checkpoint", "x", "--data", "d.jsonl", "--metrics", "exact_match,bleurt"], capsys)
    assert "bleurt" in err and all(m in err for m in M.METRICS)

    data = tmp_path / "tasks.jsonl"
    data.write_text('{"prompt": "Q: 1+1?", "answer": "2"}\n\n{"prompt": "Q: 2+2?", "reply": "4"}\n')
    err = _error(["tasks", "--checkpoint", str(tmp_path / "nowhere"), "--data", str(data)], capsys)
    assert f"{data}:3" in err and "'answer'" in err and "reply" in err
    data.write_text('{"answer": "2"}\n')
    assert f"{data}:1: no 'prompt'" in _error(["tasks", "--checkpoint", "x", "--data", str(data)], capsys)
    data.write_text('{"prompt": "p", "references": []}\n')
    assert "non-empty list" in _error(["tasks", "--checkpoint", "x", "--data", str(data)], capsys)
    assert "--k 6" in _error(["tasks", "--checkpoint", "x", "--data", str(data), "--n", "5", "--k", "6"], capsys)


def test_read_tasks_and_parse_metrics(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "references": ["d", "e"]}\n')
    rows = read_tasks(data)
    assert [(r.prompt, r.references, r.where) for r in rows] == [("a", ["b"], f"{data}:1"), ("c", ["d", "e"], f"{data}:2")]
    assert parse_metrics("f1, exact_match,f1") == ["f1", "exact_match"]
