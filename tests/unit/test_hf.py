"""Hugging Face checkpoints in and out, proven with real transformers and llama.cpp (issue #12).

Small random-weight models are built with transformers from configs (GPT-2, Llama MHA/GQA, tied and
untied, Mistral), saved with save_pretrained (safetensors) beside a byte-level BPE tokenizer trained
with `tokenizers`, imported with `python -m atlas_jax.hf import`, and compared in float32:
Atlas logits vs transformers' (max |d| <= 1e-4 on 2 x 17 tokens), the export read back by
transformers, and the imported run exported to GGUF and run in llama.cpp. No downloads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # part of the test install: a missing torch fails below
import transformers  # noqa: E402

from atlas_jax.hf.convert import permute, unpermute  # noqa: E402
from cli_checks import one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 384
TOL = 1e-4


def _hf_configs() -> dict:
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0),
        "gpt2-untied": transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                               n_inner=96, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
        "llama-mha-untied": transformers.LlamaConfig(**small, rope_theta=5000.0, tie_word_embeddings=False),
        "llama-gqa-tied": transformers.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral-mqa": transformers.MistralConfig(**small, num_key_value_heads=1, sliding_window=None,
                                                  tie_word_embeddings=False),
    }


def _randomize(model) -> None:
    """Weights with informative logits (transformers' 0.02 init gives near-uniform ones): matrices
    N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), embeddings N(0, 0.25^2), as
    tests/parity/test_llamacpp_parity.py draws them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif "wte" in name or "wpe" in name or "embed" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[0] if "c_" in name else p.shape[1]  # GPT-2's Conv1D is [in, out]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE (tokenizers), saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")[:200_000]], trainer)
    assert tok.get_vocab_size() == VOCAB
    out = tmp_path_factory.mktemp("bpe")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token=None)
    fast.save_pretrained(out)
    return out


def _save_model(name: str, root: Path, tokenizer_dir: Path) -> tuple[Path, object]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_configs()[name]).eval()
    _randomize(model)
    model.tie_weights()
    out = root / name
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out, model


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 17))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def _atlas_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_jax.hf", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe_tokenizer_dir):
    """name -> (HF dir, transformers model, imported Atlas run dir)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in _hf_configs():
        src, model = _save_model(name, root / "src", bpe_tokenizer_dir)
        run = root / "runs" / name
        r = _atlas_cli("import", str(src), "--out", str(run))
        assert r.returncode == 0, r.stderr
        out[name] = (src, model, run)
    return out


def test_rope_permutation_is_inverted_by_unpermute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(unpermute(permute(w, 4), 4), w)
    # head 0, HF half-split row i (first half) and i + Dh/2 (second half) become rows 2i and 2i + 1
    p = permute(w, 4)
    assert np.array_equal(p[0], w[0]) and np.array_equal(p[1], w[4]) and np.array_equal(p[2], w[1])


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_imported_logits_equal_transformers(models, name):
    from atlas_jax.checkpoint import load_for_inference
    from atlas_jax.export.quality import atlas_logits

    src, model, run = models[name]
    params, cfg, _ = load_for_inference(run)
    tokens = _tokens()
    ref = _hf_logits(model, tokens)
    got = atlas_logits(params, cfg.model, tokens)
    assert np.abs(ref).std() > 0.5  # informative logits, not a near-uniform row
    assert np.abs(got - ref).max() <= TOL, f"{name}: max |d| {np.abs(got - ref).max():.2e}"


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_export_loads_in_transformers_with_the_same_logits(models, name, tmp_path):
    src, model, run = models[name]
    out = tmp_path / "hf"
    r = _atlas_cli("export", str(run), "--out", str(out), "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").is_file()  # 100KB shards: the sharded layout
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    tokens = _tokens()
    assert np.abs(_hf_logits(back, tokens) - _hf_logits(model, tokens)).max() <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(src)
    text = "ROMEO:\nWhat,  ho!\tAre you 12345 there?\n\n"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_export_dtypes_and_one_file(models, tmp_path):
    src, model, run = models["llama-gqa-tied"]
    for dtype, tol in (("bfloat16", 0.15), ("float16", 3e-2)):  # weight rounding, logits of std ~3
        out = tmp_path / dtype
        r = _atlas_cli("export", str(run), "--out", str(out), "--dtype", dtype)
        assert r.returncode == 0, r.stderr
        assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        d = np.abs(_hf_logits(back, _tokens()) - _hf_logits(model, _tokens())).max()
        assert 0 < d <= tol, (dtype, d)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied", "mistral-mqa"])
def test_imported_gguf_in_llamacpp_equals_transformers(models, name, tmp_path):
    from atlas_jax.export.llamacpp import llamacpp_logits

    src, model, run = models[name]
    gguf_path = tmp_path / f"{name}.gguf"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.export.to_gguf", str(run), "--out", str(gguf_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    tokens = _tokens()
    ref = _hf_logits(model, tokens)
    got = np.stack(llamacpp_logits(gguf_path, [list(map(int, t)) for t in tokens]))
    tol = 5e-3 if name.startswith("gpt2") else TOL
    assert np.abs(got - ref).max() <= tol, f"{name}: max |d| {np.abs(got - ref).max():.2e}"


# --------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_sources_are_one_line_and_write_nothing(models, tmp_path):
    src = models["llama-gqa-tied"][0]
    out = tmp_path / "out"

    def refused(d: Path, *needles: str, env: dict | None = None) -> None:
        one_line_error(_atlas_cli("import", str(d), "--out", str(out), env=env), *needles)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]

    bad = _copy(src, tmp_path / "qwen")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2ForCausalLM"]}))
    refused(bad, "Qwen2ForCausalLM is not supported", "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM")
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    refused(bad, "rope scaling 'llama3' is not supported")
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96, "head_dim": None}))
    refused(bad, "has shape", "the weights and config.json disagree")
    (bad / "config.json").write_text("{not json")
    refused(bad, "config.json: not a readable JSON config")
    (bad / "config.json").unlink()
    refused(bad, "no config.json")

    nowts = _copy(src, tmp_path / "noweights")
    (nowts / "model.safetensors").unlink()
    refused(nowts, "no model.safetensors")
    trunc = _copy(src, tmp_path / "truncated")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(trunc, "model.safetensors: corrupt or truncated safetensors file")
    notok = _copy(src, tmp_path / "notokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (notok / f).unlink(missing_ok=True)
    refused(notok, "tokenizer")
    refused(tmp_path / "does-not-exist", "no such directory")
    refused(Path("someone/some-model"), "offline", "local model directory",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hfhome")})


def test_export_refuses_options_off_the_family_preset():
    from atlas_jax.config import ModelConfig, resolve_model
    from atlas_jax.hf.convert import HFError, hf_config

    m = resolve_model(ModelConfig(arch="llama", positions="none", mlp="gelu"))
    with pytest.raises(HFError) as e:
        hf_config(m, 1, 2)
    assert str(e.value) == ("model.positions=none, model.mlp=gelu with model.arch=llama: Hugging Face export carries "
                            "llama as rope+rms+swiglu only; the nearest model that exports is trained with "
                            "model.positions=rope, model.mlp=swiglu (model.arch=llama's preset)")


def test_import_and_export_refuse_an_existing_out(models, tmp_path):
    src, _, run = models["gpt2"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(_atlas_cli("import", str(src), "--out", str(out)), "exists", "--force")
    one_line_error(_atlas_cli("export", str(run), "--out", str(out)), "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    one_line_error(_atlas_cli("export", str(run), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"),
                    "--max-shard-size lots")
    r = _atlas_cli("export", str(run), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_training_in_an_imported_run_points_to_init_from(models):
    run = models["gpt2"][2]
    from atlas_jax.files import LOCK_NAME

    def files():  # the run's files; the trainer's lock file is not one of them
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    before = files()
    r = subprocess.run([sys.executable, "-m", "atlas_jax.train", "--config", str(run / "config.yaml"),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
    one_line_error(r, "without optimizer state", f"train.init_from=run:{run}")
    assert files() == before


# --------------------------------------------------------------------------- train.init_from


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_jax.train", "--no-progress", "--no-samples",
                           "train.batch_size=4", "data.seq_len=32", "train.log_interval=1", "train.eval_interval=100",
                           "train.eval_batches=2", "train.warmup_steps=0", "train.lr=3e-3", "train.tracking=none",
                           *overrides], capture_output=True, text=True, cwd=REPO, timeout=600)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("kind", ["hf", "run"])
def test_init_from_starts_at_the_models_loss_and_lowers_it(models, kind, tmp_path):
    from atlas_jax.data.loader import make_train_iterator

    src, model, imported = models["gpt2"]
    run = tmp_path / "ft"
    spec = f"hf:{src}" if kind == "hf" else f"run:{imported}"
    r = _train(f"train.run_dir={run}", f"train.init_from={spec}", "train.steps=8", "train.checkpoint_interval=4")
    assert r.returncode == 0, r.stderr
    assert f"initialized from {spec}" in r.stderr
    # step 1's loss is the imported model's loss on the first batch: transformers computes the same
    it = make_train_iterator(run / "data", 32, 4, 0, 0, 1)
    batch = next(it)
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(batch["inputs"], np.int64))).logits
        ref = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                torch.tensor(np.asarray(batch["targets"], np.int64)).reshape(-1)).item()
    losses = _losses(run)
    assert abs(losses[1] - ref) <= 1e-4 * max(1.0, abs(ref)), (losses[1], ref)
    assert np.mean([losses[7], losses[8]]) < losses[1] - 0.5, losses  # fine-tuning lowers it
    assert (run / "tokenizer.json").read_bytes() == (imported / "tokenizer.json").read_bytes()
    # auto-resume from the run's own checkpoints, not the source
    r = _train(f"train.run_dir={run}", f"train.init_from={spec}", "train.steps=10", "train.checkpoint_interval=4")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "initialized from" not in r.stderr
    assert _losses(run)[9] < losses[1] - 0.5


def test_init_from_refuses_another_architecture_or_tokenizer(models, tmp_path):
    src, _, imported = models["llama-gqa-tied"]
    r = _train(f"train.run_dir={tmp_path / 'a'}", f"train.init_from=run:{imported}", "model.d_model=128")
    one_line_error(r, "model.d_model=128", "leave model.d_model out")
    other = tmp_path / "other.model"
    other.write_bytes(b"not the model's tokenizer")
    r = _train(f"train.run_dir={tmp_path / 'b'}", f"train.init_from=hf:{src}", f"data.tokenizer={other}")
    one_line_error(r, f"data.tokenizer={other}", "leave data.tokenizer out")
    r = _train(f"train.run_dir={tmp_path / 'c'}", f"train.init_from=run:{tmp_path / 'nothing'}")
    one_line_error(r, "no such run directory")
    # a data dir prepared with another tokenizer (Atlas's own sentencepiece) is not re-made silently
    data = tmp_path / "spm-data"
    r = subprocess.run([sys.executable, "-m", "atlas_jax.data", "prepare", "--input", "tinyshakespeare", "--out", str(data),
                        "--vocab-size", "512"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    r = _train(f"train.run_dir={tmp_path / 'd'}", f"train.init_from=run:{imported}", f"data.data_dir={data}")
    one_line_error(r, "made with another tokenizer")
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.bin"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_atlas_run_exports_to_transformers(arch, tmp_path):
    """An Atlas run (its own sentencepiece tokenizer) -> Hugging Face: transformers' logits and ids are Atlas's."""
    from atlas_jax.checkpoint import load_for_inference
    from atlas_jax.export.quality import atlas_logits
    from atlas_jax.tokenizer import Tokenizer

    run = tmp_path / "run"
    r = _train(f"train.run_dir={run}", f"model.arch={arch}", "model.vocab_size=512", "model.d_model=64",
               "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "train.steps=2",
               "train.checkpoint_interval=2", "model.tie_embeddings=false")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    r = _atlas_cli("export", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    params, cfg, tok_path = load_for_inference(run)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, 512, (2, 17))
    assert np.abs(_hf_logits(back, tokens) - atlas_logits(params, cfg.model, tokens)).max() <= TOL
    tok, hf_tok = Tokenizer.load(tok_path), transformers.AutoTokenizer.from_pretrained(out)
    for text in ("ROMEO:\nWhat,  ho!", "  two leading spaces\tand a tab\n\n\n", "digits 12345 and 3.14"):
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert len(tok.encode("ROMEO:")) == len(hf_tok("ROMEO:")["input_ids"])


def test_export_refuses_attention_sinks_in_one_line():
    from atlas_jax.config import ModelConfig, resolve_model
    from atlas_jax.hf.convert import HFError, hf_config

    for sinks, given in [(dict(sink_logits=True), "model.sink_logits=true"), (dict(sink_tokens=1), "model.sink_tokens=1")]:
        with pytest.raises(HFError, match=f"^{given}: transformers' LlamaForCausalLM has no learned attention sinks; "
                                          f"export a model trained with model.sink_logits=false and model.sink_tokens=0$"):
            hf_config(resolve_model(ModelConfig(**sinks)), 1, 2)
