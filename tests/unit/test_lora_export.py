"""A LoRA run's adapters exported on their own (issue #13): a GGUF LoRA adapter that llama.cpp applies
to the base's f32 GGUF (llama-cpp-python lora_path), and a PEFT adapter directory that
peft.PeftModel puts on the base exported to Hugging Face, each giving Atlas's base+adapter logits
(max |d| <= 1e-4 on 2 x 17 tokens), for llama (GQA, untied head, every target) and gpt2 (tied,
q|k|v fused in both formats, rsLoRA; in llama.cpp held to its own run of the merged model, as its
fp16 GELU table keeps gpt2 5e-3 from Atlas); and one-line refusals.

The bases are random models with informative logits saved as params-only runs (checkpoint.save_model,
as an import writes them); the LoRA runs are made by the trainer (train.init_from + lora.rank, 2
steps at a high LR, so every B is nonzero)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax import checkpoint as ckpt
from atlas_jax import lora as L
from atlas_jax.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.seq_len=32", "train.batch_size=4", "train.log_interval=1", "train.eval_interval=100",
          "train.eval_batches=1", "train.warmup_steps=0", "train.tracking=none"]
MODEL = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.max_seq_len=64"]
ARCHS = {"llama": ["model.tie_embeddings=false"], "gpt2": []}
LORA = {"llama": ["lora.rank=4", "lora.alpha=8", "lora.targets=[all]"],
        "gpt2": ["lora.rank=3", "lora.alpha=4", "lora.targets=[all]", "lora.rslora=true", "lora.dropout=0.1"]}
TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 17))
MEASURED: dict[str, float] = {}


def _randomized(params, seed: int = 0):
    """Weights with informative logits: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases
    N(0, 0.1^2), embeddings N(0, 0.25^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "embed" in name:
            return (0.25 * rng.standard_normal(x.shape)).astype(np.float32)
        if x.ndim == 2:
            return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(np.float32)
        return ((1.0 if "scale" in name else 0.0) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from atlas_jax.data.prepare import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(load_config(None, COMMON).data, d, vocab_size=512, log=lambda m: None)
    return d


@pytest.fixture(scope="module", params=list(ARCHS))
def runs(request, data_dir, tmp_path_factory) -> dict:
    """{arch, base, lora}: a random base saved as a run, and a LoRA run the trainer made on it."""
    from atlas_jax.model import init_params
    from atlas_jax.train import train

    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = root / "base"
    cfg = load_config(None, [*COMMON, *MODEL, f"model.arch={arch}", *ARCHS[arch], f"train.run_dir={base}",
                             f"data.data_dir={data_dir}"])
    ckpt.save_model(base, _randomized(jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(0)))), cfg)
    shutil.copy(data_dir / "tokenizer.model", base / "tokenizer.model")
    lora = root / "lora"
    train(load_config(None, [*COMMON, f"train.run_dir={lora}", f"data.data_dir={data_dir}", f"train.init_from=run:{base}",
                             *LORA[arch], "train.steps=2", "train.checkpoint_interval=2", "train.lr=0.1"]), progress=False)
    return {"arch": arch, "base": base, "lora": lora}


def _atlas_logits(runs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(base, base + adapters) Atlas logits [2, 17, V], the adapters applied unmerged."""
    from atlas_jax.export.quality import atlas_logits

    base, base_cfg, _ = ckpt.load_for_inference(runs["base"])
    adapters, cfg, _ = ckpt.load_adapters(runs["lora"])
    assert all(np.abs(b).min() > 0 for p, b in jax.tree_util.tree_flatten_with_path(adapters)[0]
               if "lora_b" in jax.tree_util.keystr(p)), "every B moved off zero"
    want = np.asarray(L.apply(cfg.model, base, adapters, cfg.lora, np.asarray(TOKENS, np.int32)))
    return atlas_logits(base, base_cfg.model, TOKENS), want


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_gguf_adapter_in_llamacpp_equals_atlas(runs, tmp_path):
    import gguf

    from atlas_jax.export.gguf import export_gguf
    from atlas_jax.export.gguf_lora import export_lora_gguf
    from atlas_jax.export.llamacpp import llamacpp_logits

    base, cfg, tok = ckpt.load_for_inference(runs["base"])
    base_gguf = export_gguf(base, cfg.model, tok, tmp_path / "base.gguf", "f32")
    adapter = tmp_path / "adapter.gguf"
    r = _cli("atlas_jax.export.to_gguf", str(runs["lora"]), "--out", str(adapter), "--adapter")
    assert r.returncode == 0 and "LoRA adapter" in r.stdout, r.stderr
    reader = gguf.GGUFReader(adapter)
    fields = {k: reader.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                       "adapter.lora.alpha")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora", fields
    assert fields["general.architecture"] == runs["arch"]
    adapters, lcfg, _ = ckpt.load_adapters(runs["lora"])
    assert abs(fields["adapter.lora.alpha"] - L.scale(lcfg.lora) * lcfg.lora.rank) < 1e-5
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_qkv.weight.lora_a" in names) == (runs["arch"] == "gpt2")
    assert ("output.weight.lora_b" in names) == (runs["arch"] == "llama")
    per_layer = 7 if runs["arch"] == "llama" else 4  # gpt2: attn_qkv (q|k|v fused), attn_output, ffn_up, ffn_down
    assert len(names) == 2 * (2 * per_layer + (runs["arch"] == "llama")), sorted(names)
    without, want = _atlas_logits(runs)
    assert np.abs(want - without).max() > 0.1, "the adapters change the logits"
    seqs = [list(map(int, t)) for t in TOKENS]
    got = np.stack(llamacpp_logits(base_gguf, seqs, lora_path=adapter))
    MEASURED[f"gguf {runs['arch']} f32"] = d = float(np.abs(got - want).max())
    if runs["arch"] == "llama":
        assert d <= TOL, f"llama.cpp + adapter vs Atlas: max |dlogit| {d:.2e}"
    else:
        # llama.cpp's CPU GELU reads an fp16 table, so its gpt2 is within 5e-3 of Atlas, not 1e-4, base
        # or not (tests/parity/test_llamacpp_parity.py). The adapter is held to llama.cpp's own run of
        # the merged model (the same table): equal but for GELU inputs that straddle an fp16 rounding
        # boundary (a few logits at ~1e-4; a wrong fusion would be off by the adapters' effect, > 0.1).
        from atlas_jax.init_from import load_model

        merged, mcfg, _ = load_model(runs["lora"])
        same = np.stack(llamacpp_logits(export_gguf(merged, mcfg.model, tok, tmp_path / "merged.gguf"), seqs))
        MEASURED["gguf gpt2 f32 vs llama.cpp merged"] = dm = float(np.abs(got - same).max())
        MEASURED["gguf gpt2 f32 vs llama.cpp merged, mean"] = mean = float(np.abs(got - same).mean())
        assert d <= 5e-3 and dm <= 1e-3 and mean <= 2e-5, (d, dm, mean)
    # f16 adapter tensors: the same file at half the size, within f16 rounding
    half = export_lora_gguf(adapters, base, lcfg.model, lcfg.lora, tmp_path / "adapter16.gguf", "f16")
    got16 = np.stack(llamacpp_logits(base_gguf, seqs, lora_path=half))
    MEASURED[f"gguf {runs['arch']} f16"] = float(np.abs(got16 - want).max())
    MEASURED[f"bytes {runs['arch']} f32/f16"] = f"{adapter.stat().st_size}/{half.stat().st_size}"
    assert MEASURED[f"gguf {runs['arch']} f16"] <= 1e-2


def test_peft_adapter_in_transformers_equals_atlas(runs, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from atlas_jax.hf.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapter
    from atlas_jax.hf.run import export_run

    base_hf = export_run(runs["base"], tmp_path / "base_hf", log=lambda m: None)
    out = export_adapter(runs["lora"], tmp_path / "adapter", log=lambda m: None)
    conf = json.loads((out / ADAPTER_CONFIG).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert conf["fan_in_fan_out"] == (runs["arch"] == "gpt2") and conf["use_rslora"] == (runs["arch"] == "gpt2")
    if runs["arch"] == "gpt2":  # c_attn holds q|k|v's adapters: rank 3 r, alpha for the same scale
        assert conf["target_modules"] == ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], conf
        assert conf["rank_pattern"] == {"c_attn": 3 * conf["r"]} and set(conf["alpha_pattern"]) == {"c_attn"}, conf
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_hf), out).eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    assert n_lora == (2 * 7 + 1 if runs["arch"] == "llama" else 2 * 4), n_lora  # every adapter was put in place
    _, want = _atlas_logits(runs)
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).logits.float().numpy()
    MEASURED[f"peft {runs['arch']}"] = d = float(np.abs(got - want).max())
    MEASURED[f"bytes {runs['arch']} safetensors"] = (out / ADAPTER_WEIGHTS).stat().st_size
    assert d <= TOL, f"PEFT on the exported base vs Atlas: max |dlogit| {d:.2e}"


def _one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("runs", ["llama"], indirect=True)  # one architecture is enough for the refusals
def test_adapter_refusals_are_one_line(runs, tmp_path):
    from atlas_jax.errors import AtlasError
    from atlas_jax.export.to_gguf import main as to_gguf
    from atlas_jax.hf.__main__ import main as hf

    _one_line(_cli("atlas_jax.export.to_gguf", str(runs["base"]), "--out", str(tmp_path / "a.gguf"), "--adapter"),
              "--adapter exports a LoRA run's adapters", "drop --adapter")
    with pytest.raises(AtlasError, match="drop --adapter"):
        hf(["export", str(runs["base"]), "--out", str(tmp_path / "a"), "--adapter"])
    with pytest.raises(AtlasError, match="--type q8_0 with --adapter"):
        to_gguf([str(runs["lora"]), "--out", str(tmp_path / "b.gguf"), "--adapter", "--type", "q8_0"])
    record_path = runs["lora"] / "lora_base.json"
    record = record_path.read_text()
    try:
        record_path.write_text(json.dumps({**json.loads(record), "sha256": "0" * 64}))
        _one_line(_cli("atlas_jax.hf", "export", str(runs["lora"]), "--out", str(tmp_path / "c"), "--adapter"),
                  "trained on another base", "lora_base.json")
        with pytest.raises(AtlasError, match="trained on another base") as e:
            to_gguf([str(runs["lora"]), "--out", str(tmp_path / "d.gguf"), "--adapter"])
        assert "\n" not in str(e.value)
    finally:
        record_path.write_text(record)
    assert not any(tmp_path.iterdir()), "a refused export wrote nothing"


def teardown_module() -> None:
    if MEASURED:
        print("\nLoRA adapter exports (max |dlogit| vs Atlas, bytes):",
              ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in MEASURED.items()))
