"""`bench hf`: Hugging Face import and export of a GPT-2-small-shaped random model (124M params,
written by transformers' save_pretrained), time and peak RSS, beside transformers doing the same
load + save (`from_pretrained` then `save_pretrained`) in the same invocation.

Each measurement runs in a fresh child process (so peak RSS is its own): `baseline` imports the same
libraries and does nothing, which is the floor every figure stands on.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from atlas_jax.bench.common import REPO, load_avg, log

JOBS = {
    "atlas: import libraries only": "import atlas_jax.hf.run, jax; jax.numpy.zeros(1).block_until_ready()",
    "atlas import (safetensors -> run dir)": "from atlas_jax.hf.run import import_model; "
                                             "import_model(SRC, WORK / 'run', log=lambda m: None)",
    "atlas export (run dir -> safetensors)": "from atlas_jax.hf.run import export_run; "
                                             "export_run(WORK / 'run', WORK / 'hf-out', log=lambda m: None)",
    "transformers: import libraries only": "import transformers, torch",
    "transformers from_pretrained + save_pretrained": "import transformers, torch; "
                                                      "m = transformers.AutoModelForCausalLM.from_pretrained(SRC); "
                                                      "m.save_pretrained(WORK / 'tf-out')",
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    SRC, WORK = sys.argv[1], Path(sys.argv[2])
    t0 = time.perf_counter()
    exec(sys.argv[3])
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def _make_source(path: Path, quick: bool) -> int:
    """A random GPT2LMHeadModel (GPT-2 small's shape; --quick: a tiny one) and a byte-level tokenizer."""
    code = textwrap.dedent(f"""
        import sys, torch, transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        quick = {quick!r}
        cfg = transformers.GPT2Config(**(dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512) if quick else {{}}))
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        model.save_pretrained(sys.argv[1])
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=min(cfg.vocab_size, 512), special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([open(sys.argv[2], encoding="utf-8").read()[:100_000]], trainer)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                             eos_token="<|endoftext|>").save_pretrained(sys.argv[1])
        print(sum(p.numel() for p in model.parameters()))
    """)
    from atlas_jax.bench.common import CORPUS

    r = subprocess.run([sys.executable, "-c", code, str(path), str(CORPUS)], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"making the source model failed:\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def cmd_hf(args) -> dict:
    section = {"load_avg_start": load_avg(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="atlas-bench-hf-") as tmp:
        src, work = Path(tmp) / "src", Path(tmp) / "work"
        work.mkdir()
        n = _make_source(src, args.quick)
        weights_mib = n * 4 / 2**20
        section.update(params=n, float32_weights_mib=round(weights_mib, 1))
        log(f"hf: a random GPT-2 ({n:,} params, {weights_mib:,.0f} MiB in float32) saved by transformers")
        for name, code in JOBS.items():
            r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(work), code], capture_output=True,
                               text=True, cwd=REPO)
            if r.returncode:
                raise RuntimeError(f"{name} failed:\n{r.stderr[-2000:]}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            row = {"job": name, "seconds": round(m["seconds"], 2), "peak_rss_mib": round(m["peak_rss_mib"], 1),
                   "peak_rss_over_weights": round(m["peak_rss_mib"] / weights_mib, 2)}
            section["rows"].append(row)
            log(f"  {name}: {row['seconds']} s, peak RSS {row['peak_rss_mib']:,.0f} MiB "
                f"({row['peak_rss_over_weights']}x the float32 weights)")
    section["load_avg_end"] = load_avg()
    return section
