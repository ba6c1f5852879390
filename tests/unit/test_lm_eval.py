"""The `atlas` lm-evaluation-harness model (issue #14, lm-eval part), each request type against an
independent computation: loglikelihood = the sum of a direct forward's log-softmax (<= 1e-4, with
is_greedy = the argmax), loglikelihood_rolling = perplexity's total NLL for a text in one window and
lm-eval's own get_rolling_token_windows over direct forwards for a longer one, generate_until =
atlas_jax.sample's greedy completion (and a sampled request = `generate` alone with its key); then
`python -m atlas_jax.eval lm-eval` on three local YAML tasks (multiple choice, rolling word
perplexity, generate_until exact match), offline, whose accuracy, word perplexity, bits per byte and
exact match equal what the test computes from the adapter's own answers; `atlas-gguf` on the run's
f32 GGUF giving the Atlas model's log-likelihoods (<= 1e-4), rolling totals and greedy completions;
and the one-line refusals.

The model is random (informative logits, checkpoint.save_model) with the session's shakespeare
tokenizer, max_seq_len 64."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance  # the `eval` / `test` extras install lm-eval
from lm_eval.utils import get_rolling_token_windows

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import load_config
from atlas_jax.errors import run_cli
from atlas_jax.eval import perplexity as P
from atlas_jax.eval.__main__ import main
from atlas_jax.eval.perplexity import EvalError
from atlas_jax.model import Transformer, init_params
from cli_checks import one_line_error
from tests.unit.test_lora_export import _randomized  # weights with informative logits

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PASSAGES = ["First Citizen:\nBefore we proceed any further, hear me speak.",
            "All:\nSpeak, speak.",
            "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.",
            "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people."]
MC = [{"question": "Who speaks first?", "choices": ["First Citizen", "All", "Menenius"]},  # labels: the test's
      {"question": "Are they resolved?", "choices": ["no", "Resolved. resolved.", "yes"]},
      {"question": "Caius Marcius is", "choices": ["a friend", "chief enemy to the people", "away"]},
      {"question": "Speak,", "choices": ["speak.", "famish", "die"]}]
GEN_PROMPTS = ["First Citizen:\n", "All:\nSpeak"]
MAX_GEN = 8


@pytest.fixture(scope="module")
def run(shakespeare_tokenizer, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lm_eval") / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.tie_embeddings=false", f"train.run_dir={run}"])
    ckpt.save_model(run, _randomized(jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(0)))), cfg)
    shutil.copy(shakespeare_tokenizer.path, run / "tokenizer.model")
    return run


@pytest.fixture(scope="module")
def lm(run):
    from atlas_jax.eval.harness import AtlasLM

    return AtlasLM.create_from_arg_string(f"checkpoint={run},batch_size=3")


_FORWARD = {}


def _log_softmax(lm, ids: list[int]) -> np.ndarray:
    """Float64 log-softmax of one forward over ids -> [len(ids), V] (right-padded to max_seq_len, one
    compile; causal, so the padding comes after every position read)."""
    cfg = lm.cfg.model
    if "f" not in _FORWARD:
        _FORWARD["f"] = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    padded = np.zeros((1, cfg.max_seq_len), np.int32)
    padded[0, :len(ids)] = ids
    logits = np.asarray(_FORWARD["f"](lm.params, padded), np.float64)[0, :len(ids)]
    return logits - (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                     + logits.max(-1, keepdims=True))


def _req(kind: str, *args) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def test_loglikelihood_is_the_sum_of_a_direct_log_softmax(lm):
    tok = lm.tokenizer
    long_context = " ".join(PASSAGES * 2)  # past max_length: cut on the left to max_length + 1 tokens
    pairs = [("First Citizen:", " Before we proceed"), ("All:\n", "Speak, speak."), ("", "Speak, speak."),
             ("You are all resolved rather", " to die"), (long_context, " than to famish?")]
    assert len(tok.encode(long_context)) > lm.max_length
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        n_spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces to the continuation
        context, continuation = context[:len(context) - n_spaces], context[len(context) - n_spaces:] + continuation
        if context:
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            ids, n = whole, len(whole) - len(ctx)
        else:
            ids = [tok.eos_id] + tok.encode(continuation)
            n = len(ids) - 1
        ids = ids[-(lm.max_length + 1):]
        logp = _log_softmax(lm, ids[:-1])
        rows = np.arange(len(ids) - 1 - n, len(ids) - 1)
        targets = np.asarray(ids[len(ids) - n:])
        assert logprob == pytest.approx(logp[rows, targets].sum(), abs=1e-4), (context[:20], continuation)
        assert greedy == bool((logp[rows].argmax(-1) == targets).all())
    # the model's own argmax continuation (at the token level) is greedy, any other token is not
    ids = tok.encode("First Citizen:")
    logp = _log_softmax(lm, ids)[-1]
    best, other = int(logp.argmax()), int(logp.argmin())
    got = lm._loglikelihood_tokens([(("", ""), ids, [best]), (("", ""), ids, [other])], disable_tqdm=True)
    assert [g for _, g in got] == [True, False]
    assert [lp for lp, _ in got] == pytest.approx([logp[best], logp[other]], abs=1e-4)

def test_loglikelihood_rolling_is_perplexitys_nll_and_lm_evals_windows(lm):
    short, long = PASSAGES[1], "\n\n".join(PASSAGES * 2)
    seqs = P.atlas_sequences(lm.tokenizer, [short, long])
    assert len(seqs[0]) <= lm.max_length + 1 < len(seqs[1]) - lm.max_length  # one window; three or more
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", short), _req("loglikelihood_rolling", long)],
                                   disable_tqdm=True)
    totals = P.Totals(lm.max_length)
    for batch in P.score_atlas(lm.params, lm.cfg.model, seqs[:1], P.plan_windows([len(seqs[0])], 64, 64)):
        totals.add(batch)
    assert got[0] == pytest.approx(-totals.nll, abs=1e-4)
    ids = seqs[1][1:].tolist()
    want = 0.0
    for inputs, preds in get_rolling_token_windows(ids, lm.tokenizer.eos_id, lm.max_length, 1):
        logp = _log_softmax(lm, inputs)
        want += logp[np.arange(len(inputs) - len(preds), len(inputs)), preds].sum()
    assert got[1] == pytest.approx(want, abs=1e-3)


def _greedy(lm, prompt: str, n: int = MAX_GEN, key=None, temperature: float = 0.0) -> str:
    """atlas_jax.sample.generate on the prompt alone, decoded without EOS."""
    import dataclasses

    from atlas_jax.sample import generate

    cfg = dataclasses.replace(lm.cfg.sample, max_new_tokens=n, temperature=temperature, top_k=0, top_p=1.0)
    tokens, lengths = generate(lm.params, [lm.tokenizer.encode(prompt)], jax.random.key(0) if key is None else key,
                               cfg, lm.cfg.model, eos_id=lm.tokenizer.eos_id, pad_id=lm.tokenizer.pad_id)
    ids = [int(t) for t in np.asarray(tokens)[0, :int(lengths[0])] if t != lm.tokenizer.eos_id]
    return lm.tokenizer.decode(ids)


def test_generate_until_is_samples_greedy_completion(lm):
    full = [_greedy(lm, p) for p in GEN_PROMPTS]
    stop = full[0][len(full[0]) // 2]
    kwargs = {"until": [stop, "\x00never"], "max_gen_toks": MAX_GEN, "do_sample": False}
    sampled = {"max_gen_toks": MAX_GEN, "temperature": 0.9}
    reqs = [_req("generate_until", p, kwargs) for p in GEN_PROMPTS] + [_req("generate_until", GEN_PROMPTS[1], sampled)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert got[:2] == [f.split(stop)[0] for f in full] and len(got[0]) < len(full[0])
    key = jax.random.fold_in(jax.random.key(lm.cfg.sample.seed), 2)  # request 2's own key
    assert got[2] == _greedy(lm, GEN_PROMPTS[1], key=key[None], temperature=0.9)


def _task_dir(root: Path, stop: str, answers: list[str], labels: list[int]) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    data = {"mc": [{**d, "label": label} for d, label in zip(MC, labels)], "ppl": [{"text": t} for t in PASSAGES],
            "gen": [{"prompt": p, "answer": a} for p, a in zip(GEN_PROMPTS, answers)]}
    for name, rows in data.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files:\n    train: {}\n"
    (tasks / "mc.yaml").write_text(
        "task: atlas_test_mc\n" + head.format(tasks / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "ppl.yaml").write_text(
        "task: atlas_test_ppl\n" + head.format(tasks / "ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "gen.yaml").write_text(
        "task: atlas_test_gen\n" + head.format(tasks / "gen.jsonl") + "output_type: generate_until\n"
        f"doc_to_text: '{{{{prompt}}}}'\ndoc_to_target: '{{{{answer}}}}'\ntarget_delimiter: ''\n"
        f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


def test_lm_eval_cli_on_local_tasks_matches_the_adapters_answers(lm, run, tmp_path):
    full = [_greedy(lm, p) for p in GEN_PROMPTS]
    stop = full[0][len(full[0]) // 2]
    answers = [full[0].split(stop)[0], "not this"]  # exact match 1/2
    lls = iter(lm.loglikelihood([_req("loglikelihood", d["question"], " " + c) for d in MC for c in d["choices"]],
                                disable_tqdm=True))
    picks = [int(np.argmax([next(lls)[0] for _ in d["choices"]])) for d in MC]  # the adapter's answers
    labels = [picks[0], picks[1], (picks[2] + 1) % 3, (picks[3] + 1) % 3]  # accuracy 1/2
    tasks = _task_dir(tmp_path, stop, answers, labels)
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.eval", "lm-eval", "--checkpoint", str(run), "--tasks",
                        "atlas_test_mc,atlas_test_ppl,atlas_test_gen", "--include-path", str(tasks),
                        "--batch-size", "4", "--bootstrap-iters", "0", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
                       env={**os.environ, **OFFLINE})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|atlas_test_mc" in r.stdout and "acc" in r.stdout, r.stdout
    res = json.loads(out.read_text())["results"]

    assert res["atlas_test_mc"]["acc,none"] == pytest.approx(0.5)

    rolling = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in PASSAGES], disable_tqdm=True)
    words = sum(len(re.split(r"\s+", t)) for t in PASSAGES)
    n_bytes = sum(len(t.encode("utf-8")) for t in PASSAGES)
    assert res["atlas_test_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / words), rel=1e-5)
    assert res["atlas_test_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(rolling) / n_bytes / math.log(2),
                                                                        rel=1e-5)
    assert res["atlas_test_gen"]["exact_match,none"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- one-line errors


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_model_args_and_gen_kwargs_refusals(lm, run):
    from atlas_jax.eval.harness import AtlasLM
    from atlas_jax.eval.perplexity import EvalError

    with pytest.raises(EvalError, match="model_args temperature: unknown to the atlas model; it takes checkpoint"):
        AtlasLM.create_from_arg_string(f"checkpoint={run},temperature=1")
    with pytest.raises(EvalError, match="max_length=65: longer than the model's max_seq_len 64"):
        AtlasLM.create_from_arg_string(f"checkpoint={run},max_length=65")
    with pytest.raises(EvalError, match="batch_size=auto: must be a whole number"):
        AtlasLM.create_from_arg_string(f"checkpoint={run},batch_size=auto")
    with pytest.raises(EvalError, match="model_args checkpoint: missing"):
        AtlasLM.create_from_arg_string("batch_size=2")
    with pytest.raises(EvalError, match="gen_kwargs num_beams: not supported"):
        lm.generate_until([_req("generate_until", "All:", {"num_beams": 4})], disable_tqdm=True)
    with pytest.raises(EvalError, match="max_gen_toks=64: must be between 1 and max_length - 1"):
        lm.generate_until([_req("generate_until", "All:", {"max_gen_toks": 64})], disable_tqdm=True)


def test_cli_refusals_are_one_line(run, tmp_path, capsys):
    base = ["lm-eval", "--checkpoint", str(run), "--tasks", "x"]
    assert "--limit 0: must be at least 1" in _error([*base, "--limit", "0"], capsys)
    assert f"{tmp_path / 'nowhere'}: no such run" in _error(["lm-eval", "--checkpoint", str(tmp_path / "nowhere"),
                                                             "--tasks", "hellaswag"], capsys)
    assert "--include-path" in _error([*base, "--include-path", str(tmp_path / "none")], capsys)
    assert "--gguf x.gguf: no such file" in _error(["lm-eval", "--gguf", "x.gguf", "--tasks", "hellaswag"], capsys)
    tasks = _task_dir(tmp_path, "\n", ["a", "b"], [0, 0, 0, 0])
    r = subprocess.run([sys.executable, "-m", "atlas_jax.eval", "lm-eval", "--checkpoint", str(run), "--tasks",
                        "atlas_test_mc,no_such_task_zz", "--include-path", str(tasks)],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False, env={**os.environ, **OFFLINE})
    one_line_error(r, "--tasks no_such_task_zz: unknown to lm-eval", "hellaswag", "--include-path DIR")


def test_atlas_gguf_gives_the_atlas_models_answers(lm, run, tmp_path):
    pytest.importorskip("llama_cpp")
    from atlas_jax.eval.harness import AtlasGGUFLM
    from atlas_jax.export.gguf import export_gguf
    from atlas_jax.init_from import load_model

    params, cfg, tok_path = load_model(run)
    gguf = AtlasGGUFLM.create_from_arg_string(f"gguf={export_gguf(params, cfg.model, tok_path, tmp_path / 'm.gguf')}")
    assert gguf.max_length == lm.max_length and gguf.prefix_token_id == lm.tokenizer.eos_id
    pairs = [_req("loglikelihood", c, x) for c, x in [("First Citizen:", " Before we proceed"), ("", "All:\nSpeak"),
                                                       ("Are they resolved?", " Resolved. resolved.")]]
    got, want = gguf.loglikelihood(pairs, disable_tqdm=True), lm.loglikelihood(pairs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    texts = [_req("loglikelihood_rolling", t) for t in (PASSAGES[0], "\n\n".join(PASSAGES * 2))]
    assert gguf.loglikelihood_rolling(texts, disable_tqdm=True) == pytest.approx(
        lm.loglikelihood_rolling(texts, disable_tqdm=True), abs=1e-3)
    kwargs = {"until": ["\x00never"], "max_gen_toks": MAX_GEN}
    gen = [_req("generate_until", p, kwargs) for p in GEN_PROMPTS]
    # the same tokens; a random model emits stray byte tokens, whose invalid UTF-8 sentencepiece and
    # Python's decoder replace with different numbers of U+FFFD, so those are left out of the comparison
    got, want = gguf.generate_until(gen, disable_tqdm=True), lm.generate_until(gen, disable_tqdm=True)
    assert [g.replace("\ufffd", "") for g in got] == [w.replace("\ufffd", "") for w in want] and all(want)
    with pytest.raises(EvalError, match="model_args gguf=.*: no such file"):
        AtlasGGUFLM.create_from_arg_string(f"gguf={tmp_path / 'none.gguf'}")
