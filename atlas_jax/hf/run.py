"""Hugging Face model directory <-> Atlas run directory.

    import_model(src, out)     an Atlas run dir: config.yaml, the tokenizer, checkpoints/0 (params only)
    export_run(run, out)       config.json, generation_config.json, safetensors shards, tokenizer files

Both write into a temporary directory beside `out` and rename it when complete: a failure leaves
nothing half-written, and an existing `out` is replaced only with force=True.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import Config, DataConfig, ModelConfig, TrainConfig, resolve, save_config
from atlas_jax.files import writable_dir
from atlas_jax.hf.convert import HFError, flat_paths, hf_config, tensor_table
from atlas_jax.hf.io import CONFIG, weight_files, write_safetensors
from atlas_jax.hf.load import load_hf_model

SOURCE_FILE = "hf_source.json"  # where an imported run came from


def _special_ids(hf: dict) -> dict:
    def first(v):
        return v[0] if isinstance(v, list) and v else v
    return {k: first(hf.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}


@dataclasses.dataclass
class _Staging:
    """A temporary directory beside `out`, renamed to `out` by commit() (replacing it when force)."""
    out: Path
    force: bool

    def __enter__(self) -> Path:
        parent = writable_dir(self.out.parent, "--out (its directory)")
        if self.out.exists() and not self.force:
            kind = "directory" if self.out.is_dir() else "file"
            raise HFError(f"--out {self.out}: the {kind} exists; choose a new --out, or --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise HFError(f"--out {self.out}: a file is there; --out names a directory to create")
        self.tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.out.name}.tmp-"))
        return self.tmp

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, *exc) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def import_model(src: str | Path, out: str | Path, force: bool = False, log=print) -> Path:
    """Write an Atlas run dir for a Hugging Face model: config.yaml, the tokenizer, checkpoints/0."""
    from atlas_jax.tokenizer import Tokenizer, import_hf_tokenizer

    out = Path(out)
    staging = _Staging(out, force)
    with staging as tmp:
        model = load_hf_model(src, on_device=True)  # orbax would copy numpy params whole
        tok = Tokenizer.load(import_hf_tokenizer(model.model_dir, tmp))
        m = model.model
        if tok.vocab_size > m.vocab_size:
            raise HFError(f"{model.model_dir}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                          f"is {m.vocab_size}; the tokenizer files do not belong to this model")
        seq_len = min(DataConfig.seq_len, m.max_seq_len)
        cfg = resolve(Config(model=m, data=DataConfig(seq_len=seq_len), train=TrainConfig(run_dir=str(out))))
        save_config(cfg, tmp / "config.yaml")
        ckpt.save_model(tmp, model.params, cfg)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "source": str(src), "model_dir": str(model.model_dir), "architecture": model.hf_config["architectures"][0],
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in weight_files(model.model_dir)],
        }, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    log(f"imported {model.hf_config['architectures'][0]} from {model.model_dir} into {out} "
        f"({m.arch}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads / {m.n_kv_heads} kv, "
        f"vocab {m.vocab_size}, tied head {m.tie_embeddings})")
    return out


def hf_tensors(params: dict, m: ModelConfig) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(Hugging Face name, make the array) for every tensor of an Atlas model, in Hugging Face's order."""
    flat = flat_paths(params)

    def maker(e):
        def part(p):  # a Mixtral expert's tensor is one slice of the stacked param
            return np.asarray(flat[p] if e.expert is None else flat[p][e.expert], dtype=np.float32)
        return lambda: e.to_hf(*(part(p) for p in e.paths))

    return [(f"transformer.{e.hf_name}" if m.arch == "gpt2" and e.hf_name != "lm_head.weight" else e.hf_name, maker(e))
            for e in tensor_table(m)]


def export_run(run: str | Path, out: str | Path, dtype: str = "float32", max_shard_bytes: int = 5 * 10**9,
               force: bool = False, log=print) -> Path:
    """A Hugging Face model directory (transformers loads it with no custom code) from an Atlas run."""
    from atlas_jax.tokenizer import Tokenizer, write_hf_tokenizer

    from atlas_jax.init_from import load_model

    params, cfg, tok_path = load_model(run)  # a LoRA run: merged into its base
    tok = Tokenizer.load(tok_path)
    m = cfg.model
    out = Path(out)
    staging = _Staging(out, force)
    with staging as tmp:
        ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
        hf = hf_config(m, ids["bos"], ids["eos"], ids["pad"], dtype)
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
               "do_sample": True, "temperature": cfg.sample.temperature, "top_k": cfg.sample.top_k,
               "top_p": cfg.sample.top_p, "max_new_tokens": cfg.sample.max_new_tokens}
        gen = {k: v for k, v in gen.items() if not (k.endswith("_id") and (v is None or v < 0))}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        files = write_safetensors(hf_tensors(params, m), tmp, max_shard_bytes, dtype)
        write_hf_tokenizer(tok, tmp, model_max_length=m.max_seq_len)
        _write_chat_template(ckpt.find_checkpoint(run)[0], tmp)
        staging.commit()
    log(f"exported {run} as {hf['architectures'][0]} to {out} ({len(files)} safetensors file"
        f"{'s' if len(files) > 1 else ''}, {dtype})")
    return out


def _write_chat_template(run_dir: Path, out: Path) -> None:
    """A fine-tuned run's chat template, where transformers looks for it: chat_template.jinja and the
    tokenizer_config.json's chat_template (tokenizer.apply_chat_template renders it)."""
    from atlas_jax.finetune.templates import RUN_FILE, run_template

    template = run_template(run_dir)
    if template is None:
        return
    (out / RUN_FILE).write_text(template.source, encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template.source
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
