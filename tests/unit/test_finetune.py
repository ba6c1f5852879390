"""SFT and DPO through the trainer on data made from tinyshakespeare (issue #13): the mask, the prompt
tokens generate --chat uses, held-out loss / reward accuracy after a short CPU run, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.seq_len=96", "train.batch_size=8", "train.log_interval=1", "train.warmup_steps=0",
          "train.tracking=none", "train.eval_batches=2"]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    extra = ["--no-progress", "--no-samples", *COMMON] if module == "atlas_jax.train" else []
    return subprocess.run([sys.executable, "-m", module, *extra, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = root / "base"
    r = _cli("atlas_jax.train", f"train.run_dir={base}", "model.vocab_size=512", "model.d_model=64",
             "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
             "train.steps=30", "train.checkpoint_interval=30", "train.eval_interval=30", "train.lr=3e-3")
    assert r.returncode == 0, r.stderr
    r = _cli("atlas_jax.finetune", "make-data", "--out", str(root / "data"), "--examples", "400")
    assert r.returncode == 0, r.stderr
    return base, root / "data"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_conversation_mask_and_chat_prompt_tokens(setup):
    from atlas_jax.finetune.data import encode_conversation
    from atlas_jax.finetune.templates import load_template
    from atlas_jax.tokenizer import Tokenizer

    base, _ = setup
    tok = Tokenizer.load(base / "tokenizer.model")
    template = load_template("chatml")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who goes there?"},
            {"role": "assistant", "content": "A friend."}, {"role": "user", "content": "Speak on."},
            {"role": "assistant", "content": "No more."}]
    tokens, weights = encode_conversation(msgs, template, tok.encode, tok.eos_id)
    # the first prompt is tokenized exactly as generate --chat tokenizes it
    prompt = tok.encode(template.render(msgs[:2], add_generation_prompt=True))
    assert tokens[:len(prompt)] == prompt and set(weights[:len(prompt)]) == {0.0}
    reply = tok.encode("A friend.<|im_end|>\n") + [tok.eos_id]
    assert tokens[len(prompt):len(prompt) + len(reply)] == reply
    assert weights[len(prompt):len(prompt) + len(reply)] == [1.0] * len(reply)
    assert sum(weights) == len(reply) + len(tok.encode("No more.<|im_end|>\n")) + 1  # two replies, each + EOS
    assert tok.decode([t for t, w in zip(tokens, weights) if w]) == "A friend.<|im_end|>\nNo more.<|im_end|>\n"


def test_sft_lowers_held_out_completion_loss_and_chats(setup, tmp_path):
    from atlas_jax import checkpoint as ckpt
    from atlas_jax.config import load_config
    from atlas_jax.finetune.data import sft_rows, split
    from atlas_jax.finetune.templates import load_template
    from atlas_jax.tokenizer import Tokenizer
    from atlas_jax.train_step import _terms

    base, data = setup
    run = tmp_path / "sft"
    r = _cli("atlas_jax.train", f"train.run_dir={run}", f"train.init_from=run:{base}", "train.objective=sft",
             f"data.sources={data / 'sft.jsonl'}", "train.steps=30", "train.eval_interval=30",
             "train.checkpoint_interval=30", "train.lr=3e-3")
    assert r.returncode == 0, r.stderr
    assert "(assistant tokens)" in r.stderr and (run / "chat_template.jinja").is_file()
    # the base's loss on the same held-out assistant tokens, computed here
    params, base_cfg, tok_path = ckpt.load_for_inference(base)
    tok = Tokenizer.load(tok_path)
    rows = sft_rows([data / "sft.jsonl"], load_template("chatml"), tok, 96)
    _, val_idx = split(len(rows), 0.1, 0)
    val = rows.take(val_idx)
    cfg = load_config(None, ["train.objective=sft", f"train.init_from=run:{base}", *COMMON])
    cfg.model = base_cfg.model
    mb = {"inputs": val.tokens[:, :-1], "targets": val.tokens[:, 1:], "weights": val.weights}
    before = float(_terms(cfg, params, None, mb, None, jnp.sum(val.weights))["loss"])
    after = [m for m in _metrics(run) if "val_loss" in m][-1]["val_loss"]
    assert after < before - 0.1, (before, after)
    r = _cli("atlas_jax.generate", "--checkpoint", str(run), "--chat", "--prompt", "Continue ROMEO's speech: O",
             "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and "<|im_start|>" not in r.stdout, r.stderr
    _check_chat_template_travels(run, tmp_path)


CHAT_PROMPT = "Continue JULIET's speech: Romeo,  where art thou?"
LLAMACPP_CHAT = """
import json, sys
from llama_cpp import Llama, llama_chat_format
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
template = llm.metadata["tokenizer.chat_template"]
fmt = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
result = fmt(messages=[{"role": "user", "content": sys.argv[2]}])
ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
print(json.dumps({"chat_format": llm.chat_format, "ids": ids}))
"""


def _check_chat_template_travels(run: Path, tmp_path: Path) -> None:
    """The run's template reaches GGUF (llama.cpp's chat completion renders it into the same prompt
    tokens generate --chat uses) and the Hugging Face export (apply_chat_template: the same text)."""

    import transformers

    from atlas_jax.generate import Session, parse_args

    gguf_path = tmp_path / "sft.gguf"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.export.to_gguf", str(run), "--out", str(gguf_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    args = parse_args(["--checkpoint", str(run), "--chat"])  # generate's own defaults
    atlas_ids = Session(args).encode(CHAT_PROMPT)
    r = subprocess.run([sys.executable, "-c", LLAMACPP_CHAT, str(gguf_path), CHAT_PROMPT], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["chat_format"] == "chat_template.default"  # llama.cpp took the file's template
    assert got["ids"] == atlas_ids
    hf_dir = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.hf", "export", str(run), "--out", str(hf_dir)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = hf_tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                      add_generation_prompt=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == atlas_ids


def test_dpo_raises_held_out_reward_accuracy(setup, tmp_path):
    base, data = setup
    # a preference a 30-step base can learn and carry over to held-out prompts: the speech's true
    # continuation over the same text in capitals (make-data's harder pairs are for the README run)
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()]
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["chosen"].upper()})
                             + "\n" for r in rows))
    run = tmp_path / "dpo"
    r = _cli("atlas_jax.train", f"train.run_dir={run}", f"train.init_from=run:{base}", "train.objective=dpo",
             f"data.sources={pairs}", "train.steps=30", "train.eval_interval=15",
             "train.checkpoint_interval=30", "train.lr=3e-3", "train.dpo_beta=0.1", "train.schedule=constant")
    assert r.returncode == 0, r.stderr
    m = _metrics(run)
    # the reference's log-probs computed once before step 1 give the same steps as computing them live
    once = tmp_path / "dpo-once"
    r = _cli("atlas_jax.train", f"train.run_dir={once}", f"train.init_from=run:{base}", "train.objective=dpo",
             f"data.sources={pairs}", "train.steps=4", "train.eval_interval=100", "train.checkpoint_interval=4",
             "train.lr=3e-3", "train.dpo_beta=0.1", "train.schedule=constant", "train.dpo_reference=once")
    assert r.returncode == 0 and "train.dpo_reference=once: the reference's log-probs of" in r.stderr, r.stderr
    live = {x["step"]: x["loss"] for x in m if "loss" in x and "val_loss" not in x}
    for x in _metrics(once):
        if "loss" in x:
            assert abs(x["loss"] - live[x["step"]]) <= 1e-5, (x, live[x["step"]])
    first = next(x for x in m if x.get("step") == 1)
    assert first["rewards/accuracies"] == 0.5 and first["rewards/margins"] == 0.0  # policy == reference
    val = [x for x in m if "val_rewards/accuracies" in x]
    assert val[-1]["val_rewards/accuracies"] >= 0.6 and val[-1]["val_rewards/margins"] > 0, val
    assert val[-1]["val_loss"] < np.log(2)  # below the untrained policy's -log sigmoid(0)


def test_finetune_bad_input_is_one_line(setup, tmp_path):
    base, data = setup
    args = [f"train.init_from=run:{base}", "train.objective=sft", "train.steps=2"]

    def refused(rows: list, *needles: str, objective: str = "sft") -> None:
        if objective == "dpo":
            rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, *rows[1:]]
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = tmp_path / "run"
        r = _cli("atlas_jax.train", f"train.run_dir={run}", *args[:1], f"train.objective={objective}",
                 "train.steps=2", f"data.sources={path}")
        one_line_error(r, *needles)
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())

    good = {"prompt": "a", "completion": "b"}
    refused([good, {"prompt": "no completion"}], "bad.jsonl:2", "missing string field(s) completion")
    refused([good, {"messages": [{"role": "wizard", "content": "x"}]}], "bad.jsonl:2", "role 'wizard'")
    refused([good, {"prompt": "word " * 200, "completion": "b"}], "bad.jsonl:2", "the prompt alone is",
            "data.seq_len=96")
    refused([good, {"prompt": "p", "chosen": "c"}], "bad.jsonl:2", "missing field(s) rejected", objective="dpo")
    r = _cli("atlas_jax.train", f"train.run_dir={tmp_path / 'txt'}", *args, "data.sources=tinyshakespeare")
    one_line_error(r, "reads JSONL examples")
    one_line_error(_cli("atlas_jax.train", f"train.run_dir={tmp_path / 'x'}", "train.objective=sft"), "set train.init_from")
    r = _cli("atlas_jax.generate", "--checkpoint", str(base), "--chat", "--prompt", "hi")
    one_line_error(r, "no chat template", "--chat-template chatml")


def test_packed_sft_trains_with_attention_inside_each_conversation(setup, tmp_path):
    """data.pack: conversations share rows (segment ids and restarting positions reach the model);
    the packed row's loss equals the sum over its conversations run alone (the parity suite proves
    the attention mask; this proves the trainer passes it)."""
    from atlas_jax import checkpoint as ckpt
    from atlas_jax.config import load_config
    from atlas_jax.finetune.data import sft_rows
    from atlas_jax.finetune.templates import load_template
    from atlas_jax.tokenizer import Tokenizer
    from atlas_jax.train_step import _terms

    base, data = setup
    # short examples (a word -> the next words), so that several share a row
    words = [w for line in (data / "sft.jsonl").read_text().splitlines()[:200]
             for w in json.loads(line)["messages"][1]["content"].split()]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"prompt": words[i], "completion": " ".join(words[i + 1:i + 3])}) + "\n"
                             for i in range(0, 600, 3)))
    run = tmp_path / "packed"
    r = _cli("atlas_jax.train", f"train.run_dir={run}", f"train.init_from=run:{base}", "train.objective=sft",
             f"data.sources={short}", "data.pack=true", "data.seq_len=128", "train.steps=3",
             "train.eval_interval=3", "train.checkpoint_interval=3")
    assert r.returncode == 0 and "conversations packed into" in r.stderr, r.stderr
    params, base_cfg, tok_path = ckpt.load_for_inference(base)
    tok = Tokenizer.load(tok_path)
    packed = sft_rows([short], load_template("chatml"), tok, 128, pack=True).take(np.arange(4))
    alone = sft_rows([short], load_template("chatml"), tok, 128)
    cfg = load_config(None, ["train.objective=sft", f"train.init_from=run:{base}", *COMMON])
    cfg.model = base_cfg.model
    mb = {"inputs": packed.tokens[:, :-1], "targets": packed.tokens[:, 1:], "weights": packed.weights,
          "segment_ids": packed.segments[:, :-1], "positions": packed.positions[:, :-1]}
    total = float(_terms(cfg, params, None, mb, None, 1.0)["loss"])
    n = int(packed.segments.max(axis=1).sum())
    assert n > 4  # conversations share rows
    one = alone.take(np.arange(n))
    sep = {"inputs": one.tokens[:, :-1], "targets": one.tokens[:, 1:], "weights": one.weights}
    assert abs(total - float(_terms(cfg, params, None, sep, None, 1.0)["loss"])) <= 1e-3 * abs(total)
