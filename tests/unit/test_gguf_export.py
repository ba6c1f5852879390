"""GGUF export without llama.cpp: what gguf-py's reader sees in our files, types, errors, the CLI
(atlas_jax/export/gguf.py, atlas_jax/export/to_gguf.py).

The llama.cpp side (logits, tokenizer, generation) is tests/parity/test_llamacpp_parity.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, Keys, TokenType

from atlas_jax.config import ModelConfig, resolve_model
from atlas_jax.errors import AtlasError
from atlas_jax.export.gguf import (
    ARCHS,
    TENSOR_TABLE,
    ExportError,
    ExportWarning,
    export_gguf,
    flatten,
    model_metadata,
    tokenizer_metadata,
)
from atlas_jax.model import init_params

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    "llama-gqa-untied": dict(arch="llama", n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "llama-mha-tied": dict(arch="llama", n_heads=4, tie_embeddings=True),
    "gpt2-tied": dict(arch="gpt2", n_heads=4, tie_embeddings=True),
    "gpt2-untied": dict(arch="gpt2", n_heads=4, tie_embeddings=False),
    "llama-d80": dict(arch="llama", d_model=80, n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "llama-moe-e4-k2": dict(arch="llama", n_heads=4, n_kv_heads=2, moe_experts=4, moe_experts_per_token=2, moe_d_ff=96),
}


def make(tokenizer, name: str, seed: int = 0):
    fields = {"d_model": 64, "n_layers": 2, "max_seq_len": 64, **MODELS[name]}
    cfg = resolve_model(ModelConfig(vocab_size=tokenizer.vocab_size, **fields))
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)
    return cfg, params


def field_value(reader: GGUFReader, key: str):
    """A metadata value as Python (str, number, bool or list)."""
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def gguf_shape(reader_tensor) -> tuple[int, ...]:
    """Row-major numpy shape of a tensor ([out, in]); GGUF stores ne reversed."""
    return tuple(int(n) for n in reversed(reader_tensor.shape))


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-untied"])
def test_table_maps_every_param_to_a_tensor_the_arch_knows(shakespeare_tokenizer, name):
    cfg, params = make(shakespeare_tokenizer, name)
    arch = ARCHS[cfg.arch]
    sources = {src.format(i=i) for row in TENSOR_TABLE if cfg.arch in row.archs
               for src in row.sources for i in range(cfg.n_layers)}
    assert set(flatten(params)) <= sources
    for row in TENSOR_TABLE:
        if cfg.arch in row.archs:
            assert row.tensor in gguf.MODEL_TENSORS[arch], f"{row.tensor.name} is not a {arch.name} tensor in gguf-py"


# --------------------------------------------------------------------------- read back


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mha-tied", "gpt2-tied", "gpt2-untied", "llama-moe-e4-k2"])
def test_reader_reads_back_every_key_and_tensor(shakespeare_tokenizer, tmp_path, name):
    cfg, params = make(shakespeare_tokenizer, name)
    path = export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "m.gguf", name="tiny")
    reader = GGUFReader(path)

    expected = {**model_metadata(cfg, "f32", "tiny"), **tokenizer_metadata(shakespeare_tokenizer.path, cfg.vocab_size)}
    expected[Keys.General.ARCHITECTURE] = (cfg.arch, None, None)
    for key, (value, _, _) in expected.items():
        got = field_value(reader, key)
        if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=key)
        else:
            assert got == value, key
    assert set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(expected)

    a = cfg.arch
    assert field_value(reader, Keys.LLM.CONTEXT_LENGTH.format(arch=a)) == 64
    assert field_value(reader, Keys.Attention.HEAD_COUNT_KV.format(arch=a)) == cfg.n_kv_heads
    if a == "llama":
        assert field_value(reader, Keys.Rope.DIMENSION_COUNT.format(arch=a)) == cfg.head_dim
    if cfg.moe_experts:
        assert field_value(reader, Keys.LLM.EXPERT_COUNT.format(arch=a)) == cfg.moe_experts
        assert field_value(reader, Keys.LLM.EXPERT_USED_COUNT.format(arch=a)) == cfg.moe_experts_per_token
        assert field_value(reader, Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a)) == cfg.moe_d_ff

    # every tensor, f32, equal to the params once transposition and fusion are undone
    flat = flatten(params)
    tensors = {t.name: np.asarray(t.data).reshape(gguf_shape(t)) for t in reader.tensors}
    assert all(t.tensor_type == QT.F32 for t in reader.tensors)
    seen = set()
    for row in TENSOR_TABLE:
        if cfg.arch not in row.archs:
            continue
        for i in row.layers(cfg):  # every layer, or its MoE / dense layers only
            name_ = f"{gguf.TENSOR_NAMES[row.tensor].format(bid=i)}.{row.suffix}"
            if row.sources[0].endswith(("/moe/w_gate", "/moe/w_up", "/moe/w_down")):
                # stacked experts [E, in, out] are written [E, out, in]: expert on the slowest axis
                np.testing.assert_array_equal(tensors[name_], flat[row.sources[0].format(i=i)].swapaxes(1, 2))
                seen.add(name_)
                continue
            paths = [s.format(i=i) for s in row.sources]
            if paths[0] not in flat:
                assert row.optional and name_ not in tensors
                continue
            rows = np.concatenate([flat[p].T if p.endswith("kernel") else flat[p] for p in paths], axis=0)
            np.testing.assert_array_equal(tensors[name_], rows, err_msg=name_)
            offset = 0
            for p in paths:  # the fused gpt2 qkv splits back into wq | wk | wv
                n = flat[p].shape[-1] if p.endswith("kernel") else flat[p].shape[0]
                part = tensors[name_][offset:offset + n]
                np.testing.assert_array_equal(part.T if p.endswith("kernel") else part, flat[p], err_msg=p)
                offset += n
            seen.add(name_)
    assert seen == set(tensors)


@pytest.mark.parametrize("name", ["llama-mha-tied", "gpt2-tied"])
def test_tied_head_is_omitted_or_written_on_request(shakespeare_tokenizer, tmp_path, name):
    cfg, params = make(shakespeare_tokenizer, name)
    out_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    omitted = GGUFReader(export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "a.gguf"))
    assert out_name not in {t.name for t in omitted.tensors}
    written = GGUFReader(export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "b.gguf",
                                     write_output_for_tied=True))
    out = {t.name: t for t in written.tensors}[out_name]
    np.testing.assert_array_equal(np.asarray(out.data).reshape(gguf_shape(out)), params["embed"]["embedding"])


def test_tokenizer_metadata_describes_the_sentencepiece_model(shakespeare_tokenizer):
    sp = shakespeare_tokenizer.sp
    meta = tokenizer_metadata(shakespeare_tokenizer.path, sp.get_piece_size() + 3)  # a padded vocab
    tokens, scores, types = (meta[k][0] for k in
                             (Keys.Tokenizer.LIST, Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE))
    n = sp.get_piece_size()
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)] and types[n:] == [TokenType.UNUSED] * 3
    np.testing.assert_allclose(scores[:n], [sp.get_score(i) for i in range(n)])
    assert [tokens[i] for i in range(n) if types[i] == TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert types[sp.unk_id()] == TokenType.UNKNOWN
    assert {types[i] for i in (sp.bos_id(), sp.eos_id(), sp.pad_id())} == {TokenType.CONTROL}
    assert meta[Keys.Tokenizer.MODEL][0] == "llama"
    assert (meta[Keys.Tokenizer.BOS_ID][0], meta[Keys.Tokenizer.EOS_ID][0], meta[Keys.Tokenizer.UNK_ID][0],
            meta[Keys.Tokenizer.PAD_ID][0]) == (1, 2, 0, 3)
    assert meta[Keys.Tokenizer.ADD_BOS][0] is False and meta[Keys.Tokenizer.ADD_EOS][0] is False
    assert meta[Keys.Tokenizer.ADD_PREFIX][0] is False and meta[Keys.Tokenizer.REMOVE_EXTRA_WS][0] is False


@pytest.fixture(scope="module")
def unigram_tokenizer(shakespeare_path, tmp_path_factory):
    """A unigram sentencepiece model (data.tokenizer_type=unigram), 400 pieces on 30 KB of tinyshakespeare."""
    from atlas_jax.tokenizer import train_tokenizer

    text = shakespeare_path.read_text(encoding="utf-8")[:30_000]
    return train_tokenizer([text], tmp_path_factory.mktemp("unigram"), 400, model_type="unigram")


def export_warnings(fn, *args, **kwargs) -> list[str]:
    """The ExportWarning messages `fn(*args, **kwargs)` emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]


def test_unigram_tokenizer_warns_that_llamacpp_may_segment_differently(unigram_tokenizer, shakespeare_tokenizer,
                                                                      tmp_path):
    # llama.cpp's SPM tokenizer merges by score: sentencepiece BPE's rule, not unigram's best path.
    got = export_warnings(tokenizer_metadata, unigram_tokenizer.path, unigram_tokenizer.vocab_size)
    assert len(got) == 1 and "\n" not in got[0], got
    assert "not guaranteed to match a unigram model's segmentation exactly" in got[0], got
    assert "data.tokenizer_type=bpe" in got[0] and str(unigram_tokenizer.path) in got[0], got
    cfg, params = make(unigram_tokenizer, "llama-gqa-untied")
    with pytest.warns(ExportWarning, match="unigram model's segmentation"):
        path = export_gguf(params, cfg, unigram_tokenizer.path, tmp_path / "u.gguf")
    assert path.is_file()  # a warning, not a refusal
    # a BPE model: no warning at all, from the metadata or the whole export
    assert export_warnings(tokenizer_metadata, shakespeare_tokenizer.path, shakespeare_tokenizer.vocab_size) == []
    cfg, params = make(shakespeare_tokenizer, "llama-gqa-untied")
    assert export_warnings(export_gguf, params, cfg, shakespeare_tokenizer.path, tmp_path / "b.gguf") == []


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["gpt2-untied", "llama-d80"])
def test_types_per_tensor_and_values_within_format_error(shakespeare_tokenizer, tmp_path, name, ftype):
    cfg, params = make(shakespeare_tokenizer, name)
    reader = GGUFReader(export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "m.gguf", ftype))
    reference = {t.name: np.asarray(t.data).reshape(gguf_shape(t))
                 for t in GGUFReader(export_gguf(params, cfg, shakespeare_tokenizer.path, tmp_path / "f.gguf")).tensors}
    weight = {"f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[ftype]
    # relative RMS error of each format on N(0, 1) data
    rel_rms = {QT.F32: 0, QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 1e-2, QT.Q4_0: 0.15}
    for t in reader.tensors:
        want = reference[t.name]
        qtype = QT(t.tensor_type)
        if want.ndim == 1 or t.name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
            expected = QT.F32
        elif weight in (QT.Q8_0, QT.Q4_0) and want.shape[-1] % 32:
            expected = QT.F16  # the documented fallback
        elif weight == QT.Q4_0 and t.name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]):
            expected = QT.Q8_0  # the output projection stays at 8 bits
        else:
            expected = weight
        assert qtype == expected, f"{t.name}: {qtype.name}, expected {expected.name}"
        got = gguf.quants.dequantize(t.data, qtype).reshape(want.shape)
        err = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
        assert err <= rel_rms[qtype], f"{t.name} ({qtype.name}): relative RMS error {err:.3g}"
    assert field_value(reader, Keys.General.FILE_TYPE) == {
        "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[ftype]


# --------------------------------------------------------------------------- errors and atomicity


def test_params_that_do_not_fit_the_config_are_one_line_errors(shakespeare_tokenizer, tmp_path):
    cfg, params = make(shakespeare_tokenizer, "llama-gqa-untied")
    out = tmp_path / "m.gguf"
    missing = {**params, "layers_1": {k: v for k, v in params["layers_1"].items() if k != "mlp"}}
    with pytest.raises(ExportError, match=r"lack 'layers_1/mlp/w_down/kernel'"):
        export_gguf(missing, cfg, shakespeare_tokenizer.path, out)
    wrong = {**params, "embed": {"embedding": np.zeros((7, cfg.d_model), np.float32)}}
    with pytest.raises(ExportError, match=r"'embed/embedding' has shape \(7, 64\)"):
        export_gguf(wrong, cfg, shakespeare_tokenizer.path, out)
    foreign = {**params, "extra": {"kernel": np.zeros(3, np.float32)}}
    with pytest.raises(ExportError, match=r"hold 'extra/kernel'"):
        export_gguf(foreign, cfg, shakespeare_tokenizer.path, out)
    with pytest.raises(ExportError, match="is not one of"):
        export_gguf(params, cfg, shakespeare_tokenizer.path, out, "q3_z")
    with pytest.raises(AtlasError, match="tokenizer file not found"):
        export_gguf(params, cfg, tmp_path / "nope.model", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tokenizer_without_byte_pieces_is_refused(tmp_path):
    import sentencepiece as spm

    text = "\n".join(["the quick brown fox jumps over the lazy dog"] * 200)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "nb"),
                                   vocab_size=30, byte_fallback=False, minloglevel=2)
    with pytest.raises(ExportError, match=r"byte piece <0x00> .* missing"):
        tokenizer_metadata(tmp_path / "nb.model", 64)


def test_file_appears_only_when_complete(shakespeare_tokenizer, tmp_path, monkeypatch):
    cfg, params = make(shakespeare_tokenizer, "gpt2-tied")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous file")

    def fail(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(params, cfg, shakespeare_tokenizer.path, out)
    assert out.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left behind


# --------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "to_gguf.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_missing_or_foreign_checkpoint_exits_2_with_one_line(tmp_path):
    proc = run_cli(str(tmp_path / "no_such_run"), "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "no_such_run" in proc.stderr
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "100").mkdir(parents=True)
    (foreign / "checkpoints" / "100" / "weights.bin").write_bytes(b"\x00" * 16)
    proc = run_cli(str(foreign), "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_cli_prints_the_unigram_warning_as_one_line(unigram_tokenizer, tmp_path, capsys):
    from atlas_jax import checkpoint
    from atlas_jax.config import Config, DataConfig, resolve
    from atlas_jax.export.to_gguf import main
    from atlas_jax.optim import make_optimizer

    model_cfg, params = make(unigram_tokenizer, "llama-gqa-untied")
    cfg = resolve(Config(model=model_cfg, data=DataConfig(seq_len=32)))
    state = {"params": params, "opt_state": make_optimizer(cfg.train).init(params), "step": np.int32(1),
             "rng": jax.random.key_data(jax.random.key(0)), "bad_steps": np.int32(0)}
    run_dir = tmp_path / "run"
    checkpoint.save(checkpoint.make_manager(run_dir, keep=1), state, {}, cfg)
    shutil.copy(unigram_tokenizer.path, run_dir / "tokenizer.model")
    capsys.readouterr()
    assert main([str(run_dir), "--out", str(tmp_path / "m.gguf")]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "m.gguf").is_file() and out.startswith("wrote ")
    lines = [ln for ln in err.splitlines() if "unigram" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "data.tokenizer_type=bpe" in lines[0], err
    assert "ExportWarning" not in err and "warnings.warn" not in err, err


@pytest.mark.parametrize("arch, options, words", [
    ("llama", dict(positions="learned"), ["model.positions=learned with model.arch=llama", "rope+rms+swiglu",
                                          "model.positions=rope"]),
    ("gpt2", dict(norm="rms", mlp="swiglu"), ["model.norm=rms, model.mlp=swiglu with model.arch=gpt2",
                                              "learned+layer+gelu", "model.norm=layer, model.mlp=gelu"]),
])
def test_options_off_the_family_preset_are_refused_naming_the_nearest(shakespeare_tokenizer, tmp_path, arch,
                                                                       options, words):
    cfg = resolve_model(ModelConfig(arch=arch, vocab_size=shakespeare_tokenizer.vocab_size, d_model=32, n_layers=1,
                                    n_heads=2, max_seq_len=16, **options))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError) as e:
        export_gguf(init_params(cfg, jax.random.key(0)), cfg, shakespeare_tokenizer.path, out)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert "GGUF export" in msg and not out.exists()


@pytest.mark.parametrize("sinks, given", [(dict(sink_logits=True), "model.sink_logits=true: "),
                                          (dict(sink_tokens=2), "model.sink_tokens=2: "),
                                          (dict(sink_logits=True, sink_tokens=1),
                                           "model.sink_logits=true and model.sink_tokens=1: ")])
def test_attention_sinks_are_refused_in_one_line_naming_what_works(sinks, given, shakespeare_tokenizer, tmp_path):
    cfg = resolve_model(ModelConfig(vocab_size=shakespeare_tokenizer.vocab_size, d_model=64, n_layers=1, n_heads=4,
                                    max_seq_len=16, **sinks))
    with pytest.raises(ExportError) as info:
        export_gguf(init_params(cfg, jax.random.key(0)), cfg, shakespeare_tokenizer.path, tmp_path / "m.gguf")
    message = str(info.value)
    assert message.startswith(given) and "\n" not in message, message
    assert "model.sink_logits=false and model.sink_tokens=0" in message and "--keep" in message
    assert not (tmp_path / "m.gguf").exists()
