"""`bench decode`: greedy prefill and decode tokens/s at each batch size, atlas_jax's
`sample.generate` against llama.cpp on GGUF files exported from the same params: driven from Python
through llama-cpp-python's batch API (`decode_llamacpp`, rows "llama.cpp <ftype>"), and through
llama.cpp's own `llama-bench` (batch 1) and `llama-batched-bench` (every batch) on the same file and
thread count (bench.llamacpp_tools; rows "llama-bench <ftype>", "llama-batched-bench <ftype>"; built
once by `python scripts/build_llamacpp_tools.py`, a one-line "skipped" row each when not built)."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas_jax.bench.common import (BenchError, bench_config, cores, flat_params, in_child, load_avg, log,
                                    model_summary, nested_params, record_memory, rss_mib)
from atlas_jax.bench.llamacpp_tools import tool_rows


def decode_atlas_jax(params_in: str, model_cfg: dict, prompts: list[list[int]], batches: list[int],
                     new_tokens: int, reps: int, kernel_layout: str = "auto") -> dict:
    """Greedy `sample.generate` per batch size, and its prefill alone (the same shapes, jitted). As a
    user's process should: every program compiled from the params' shapes before any weight is
    loaded (`sample.compile_generate`), then the weights read one tensor at a time onto the device,
    their Dense kernels in `kernel_layout` (auto: `sample.preferred_kernel_layout` of the one batch
    size, or of the first when several share the weights)."""
    import jax

    from atlas_jax.config import ModelConfig, SampleConfig
    from atlas_jax.model import Transformer, init_cache, init_params
    from atlas_jax.sample import (apply_with_layout, cache_length, compile_generate, laid_out,
                                  preferred_kernel_layout, prompt_bucket, release_host_memory, to_device,
                                  transpose_kernels)

    rss0 = rss_mib()
    cfg = ModelConfig(**model_cfg)
    layout = preferred_kernel_layout(batches[0]) if kernel_layout == "auto" else kernel_layout
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    if layout == "out_in":
        shapes = transpose_kernels(shapes)
    sample_cfg = SampleConfig(temperature=0.0, max_new_tokens=new_tokens)
    p = len(prompts[0])
    bucket = prompt_bucket(p, cfg.max_seq_len)
    cache_len = cache_length(bucket, new_tokens)

    def prefill(params, tokens_BxP, positions_BxP):
        cache = init_cache(cfg, tokens_BxP.shape[0], cache_len)
        logits, _ = apply_with_layout(params, cfg, layout, tokens_BxP, positions_BxP, cache,
                                      method=Transformer.decode)
        return logits[:, -1]

    programs = {}
    for b in batches:
        rows = prompts[:b]
        tokens = np.zeros((b, bucket), np.int32)  # left-padded as sample.generate pads them
        positions = np.full((b, bucket), -1, np.int32)
        tokens[:, bucket - p:] = rows
        positions[:, bucket - p:] = np.arange(p)
        run = compile_generate(shapes, rows, jax.random.key(0), sample_cfg, cfg, kernel_layout=layout)
        pre = jax.jit(prefill).lower(shapes, tokens, positions).compile()
        programs[b] = (run, lambda params, pre=pre, tokens=tokens, positions=positions: pre(params, tokens, positions))
    release_host_memory()
    rss_compiled = rss_mib()

    def put(name, array):  # onto the device (sample.to_device); malloc_trim hands back the previous tensor's freed host copy
        out = jax.block_until_ready(to_device(laid_out(name.rsplit("/", 1)[-1], array, layout)))
        release_host_memory()
        return out

    params = nested_params(params_in, put)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))  # warm-up (compiled already)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)), out

    out = {}
    for b in batches:
        run, pre = programs[b]
        t_gen, (toks, _) = timed(run, params)
        t_pre, _ = timed(pre, params)
        t_dec = max(t_gen - t_pre, 1e-9)
        out[f"batch_{b}"] = {"prefill_tokens_per_s": b * p / t_pre, "decode_tokens_per_s": b * new_tokens / t_dec,
                             "generate_s": t_gen, "prefill_s": t_pre,
                             "kernel_layout": layout, "greedy_row0": np.asarray(toks)[0].tolist()}
    stats = jax.devices()[0].memory_stats() or {}
    return record_memory({"results": out, "device": jax.devices()[0].device_kind,
                          "rss_compiled_mib": round(rss_compiled, 1)}, rss0, stats.get("peak_bytes_in_use"))


def decode_llamacpp(path: str, prompts: list[list[int]], batches: list[int], new_tokens: int, reps: int,
                    n_threads: int) -> dict:
    """Greedy decoding in llama.cpp through the low-level batch API: B sequences in one llama_batch
    (seq ids 0..B-1, a context with n_seq_max=B); argmax of each row's logits on the host."""
    import ctypes

    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    from atlas_jax.export.llamacpp import GGML_TYPE_F32, open_llama

    rss0 = rss_mib()
    llama_log = tempfile.TemporaryFile()  # llama.cpp's own messages, shown only on failure
    saved_stderr = os.dup(2)
    os.dup2(llama_log.fileno(), 2)
    try:
        p = len(prompts[0])
        # open_llama: the model with use_extra_bufts off (llama.cpp's AMX bug); its own small context stays unused.
        llm = open_llama(path, n_ctx=p + new_tokens, logits_all=False, n_threads=n_threads)
        vocab = llm.n_vocab()
        out = {}
        for b in batches:
            cp = lib.llama_context_default_params()
            cp.n_ctx, cp.n_seq_max = b * (p + new_tokens), b
            cp.n_batch = cp.n_ubatch = b * p
            cp.n_threads = cp.n_threads_batch = n_threads
            cp.type_k = cp.type_v = GGML_TYPE_F32  # as Atlas' f32 cache (and open_llama)
            ctx = _internals.LlamaContext(model=llm._model, params=cp, verbose=False)
            batch = lib.llama_batch_init(b * p, 0, 1)

            def fill(rows: list[list[int]], pos0: int) -> None:
                n = 0
                for seq, toks in enumerate(rows):
                    for i, tok in enumerate(toks):
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, pos0 + i, 1
                        batch.seq_id[n][0] = seq
                        batch.logits[n] = i == len(toks) - 1
                        n += 1
                batch.n_tokens = n

            def decode() -> None:
                rc = lib.llama_decode(ctx.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")

            def argmax(indices) -> list[int]:
                return [int(np.argmax(np.ctypeslib.as_array(
                    ctypes.cast(lib.llama_get_logits_ith(ctx.ctx, i), ctypes.POINTER(ctypes.c_float)),
                    shape=(vocab,)))) for i in indices]

            pre, dec = [], []
            for _ in range(reps + 1):  # the first run warms up
                lib.llama_memory_clear(lib.llama_get_memory(ctx.ctx), True)
                fill(prompts[:b], 0)
                t = time.perf_counter()
                decode()
                nxt = argmax([(i + 1) * p - 1 for i in range(b)])
                pre.append(time.perf_counter() - t)
                row0 = [nxt[0]]
                t = time.perf_counter()
                for s in range(new_tokens):  # as sample.generate: one model call per new token
                    fill([[x] for x in nxt], p + s)
                    decode()
                    nxt = argmax(range(b))
                    row0.append(nxt[0])
                dec.append(time.perf_counter() - t)
            lib.llama_batch_free(batch)
            ctx.close()
            t_pre, t_dec = float(np.median(pre[1:])), float(np.median(dec[1:]))
            out[f"batch_{b}"] = {"prefill_tokens_per_s": b * p / t_pre, "decode_tokens_per_s": b * new_tokens / t_dec,
                                 "prefill_s": t_pre, "decode_s": t_dec, "greedy_row0": row0[:new_tokens]}
    except Exception as e:
        llama_log.seek(0)
        tail = " | ".join(llama_log.read().decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{e}; llama.cpp said: {tail}") from None
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    return record_memory({"results": out, "device": f"CPU, {n_threads} threads"}, rss0, None)


def _tokenizer_and_params(args, cfg, tmp: Path):
    """(params as numpy, resolved Config, tokenizer path): a trained run, or random params and a
    tokenizer trained here on the corpus (speed does not depend on the weights)."""
    if args.checkpoint:
        from atlas_jax.init_from import load_model

        params, run_cfg, tok_path = load_model(args.checkpoint)
        return params, run_cfg, tok_path
    import jax

    from atlas_jax.config import DataConfig
    from atlas_jax.data.prepare import iter_texts
    from atlas_jax.model import init_params
    from atlas_jax.tokenizer import train_tokenizer

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise BenchError(f"{corpus}: corpus not found; pass --corpus FILE.txt (or --checkpoint RUN_DIR)")
    tok = train_tokenizer(iter_texts([corpus], DataConfig()), tmp / "tokenizer", cfg.model.vocab_size)
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg.model, jax.random.key(cfg.train.seed)))
    return params, cfg, tok.path


def _prompts(tok_path: Path, corpus: Path | None, n: int, length: int) -> list[list[int]]:
    """n windows of `length` real tokens from the corpus (evenly spaced), or random ids without one."""
    from atlas_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    if corpus is not None and corpus.is_file():
        ids = np.asarray(tok.encode(corpus.read_text(encoding="utf-8")[:400_000]), np.int64)
        if len(ids) >= n * length:
            starts = np.linspace(0, len(ids) - length, n).astype(int)
            return [ids[s:s + length].tolist() for s in starts]
    rng = np.random.default_rng(0)
    return rng.integers(4, tok.vocab_size, (n, length)).tolist()


def cmd_decode(args) -> dict:
    from atlas_jax.export.gguf import export_gguf

    batches = args.batches  # checked by the parser, as --ftypes
    reps = args.reps or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        tmp = Path(tmp)
        cfg, source = bench_config(args) if not args.checkpoint else (None, None)
        params, cfg, tok_path = _tokenizer_and_params(args, cfg, tmp)
        source = args.checkpoint or source
        m = cfg.model
        new = args.new_tokens or (16 if args.quick else 128)
        p = args.prompt_len or (16 if args.quick else 128)
        if p + new > m.max_seq_len:
            p = max(1, min(p, m.max_seq_len // 2))
            new = m.max_seq_len - p
        prompts = _prompts(tok_path, Path(args.corpus), max(batches), p)
        np.savez(tmp / "params.npz", **flat_params(params))
        threads = args.threads or cores()
        section = {"config": source, "model": model_summary(cfg), "prompt_len": p, "new_tokens": new,
                   "batches": batches, "reps": reps, "llamacpp_threads": threads,
                   "load_avg_start": load_avg(), "frameworks": {}}
        log(f"decode: {source or 'flags'}, prompt {p} + {new} new tokens, batches {batches}, greedy")
        res = _per_batch_children(decode_atlas_jax, batches, params_in=str(tmp / "params.npz"),
                                  model_cfg=dataclasses.asdict(m), prompts=prompts, new_tokens=new, reps=reps,
                                  kernel_layout=args.kernel_layout)
        section["frameworks"]["atlas_jax"] = res
        log("  atlas_jax: " + _decode_line(res))
        for ftype in args.ftypes:
            path = export_gguf(params, m, tok_path, tmp / f"{ftype}.gguf", ftype)
            res = in_child(decode_llamacpp, path=str(path), prompts=prompts, batches=batches, new_tokens=new,
                           reps=reps, n_threads=threads)
            res["gguf_mib"] = round(path.stat().st_size / 2**20, 2)
            section["frameworks"][f"llama.cpp {ftype}"] = res
            log(f"  llama.cpp {ftype}: " + _decode_line(res))
            for tool, row in tool_rows(args.llamacpp_tools, str(path), p, new, batches, reps, threads).items():
                section["frameworks"][f"{tool} {ftype}"] = row
                log(f"  {tool} {ftype}: " + _decode_line(row))
    ours = section["frameworks"]["atlas_jax"].get("results", {})
    for name, r in section["frameworks"].items():
        if name == "atlas_jax" or "results" not in r:  # an error, or tools not built
            continue
        for key, row in r["results"].items():
            if key in ours:
                row["atlas_jax_decode_speedup"] = ours[key]["decode_tokens_per_s"] / row["decode_tokens_per_s"]
                row["atlas_jax_prefill_speedup"] = ours[key]["prefill_tokens_per_s"] / row["prefill_tokens_per_s"]
                if "greedy_row0" not in row:  # llama.cpp's tools decode random tokens
                    continue
                a, b = ours[key]["greedy_row0"], row["greedy_row0"]
                row["greedy_same_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                                 min(len(a), len(b)))
    section["load_avg_end"] = load_avg()
    return section


def _per_batch_children(fn, batches: list[int], **kwargs) -> dict:
    """fn once per batch size, each in a fresh child: every batch's peak RSS is its own (batch 32's
    KV cache does not stand in batch 1's figure). -> one result, peak_rss_mib per batch in its row."""
    merged: dict = {"results": {}}
    for b in batches:
        res = in_child(fn, batches=[b], **kwargs)
        if "error" in res:
            return res
        for key, row in res.pop("results").items():
            row["peak_rss_mib"] = res["peak_rss_mib"]
            merged["results"][key] = row
        merged.update({k: v for k, v in res.items() if k != "peak_rss_mib"})
        merged["peak_rss_mib"] = max(merged.get("peak_rss_mib", 0.0), res["peak_rss_mib"])
    return merged


def _decode_line(res: dict) -> str:
    if "error" in res or "skipped" in res:
        return res.get("error") or res["skipped"]
    return ", ".join(f"{k}: decode {v['decode_tokens_per_s']:,.0f} tok/s, "
                     f"prefill {v['prefill_tokens_per_s']:,.0f} tok/s" for k, v in res["results"].items())
