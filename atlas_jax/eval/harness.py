"""Atlas runs as an lm-evaluation-harness model: `atlas` in lm-eval's registry (importing this registers it).

    import atlas_jax.eval.harness
    lm_eval.simple_evaluate(model="atlas", model_args="checkpoint=runs/shakespeare,batch_size=8", tasks=[...])

model_args: checkpoint (a run or step dir; a LoRA run is merged into its base), batch_size (rows per
forward, default 8), max_length (tokens of context, default the model's max_seq_len), max_gen_toks
(a generate_until request's default, default min(256, max_length // 2)); lm-eval's own device and
max_batch_size are accepted and unused (JAX places the model).

The three requests:
- loglikelihood(context, continuation): TemplateLM tokenizes it (context + continuation, split at
  the context's tokens; an empty context is EOS); the sequence is cut on the left to max_length + 1
  tokens and one forward scores the continuation: the sum of its tokens' log-probs, and whether each
  one was the argmax (is_greedy).
- loglikelihood_rolling(text): [EOS] + the text's tokens in windows of max_length, every token
  scored once, the last window moved back to full context: perplexity.plan_windows with stride =
  window is lm-eval's rolling procedure (utils.get_rolling_token_windows with context_len 1).
- generate_until(context, gen_kwargs): sample.generate up to max_gen_toks tokens or EOS, cut at the
  first `until` string; greedy unless do_sample / temperature > 0 ask for sampling (top_k, top_p
  from the request, else off; request i draws with fold_in(key(sample.seed), i)). The context is cut
  on the left to max_length - max_gen_toks tokens.
Batches: requests sorted longest first, batch_size per forward; scoring pads each batch to a
power-of-two width (sample.prompt_bucket), so few shapes compile.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from atlas_jax.eval.perplexity import EvalError, atlas_sequences, plan_windows, score_atlas, token_scores_fn
from atlas_jax.eval.tasks import cut_at_stop

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
MODEL_ARGS = ("checkpoint", "batch_size", "max_length", "max_gen_toks")
LM_EVAL_ARGS = ("device", "max_batch_size")  # what simple_evaluate passes to every model


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"model_args {key}={value}: must be a whole number of at least 1")
    return value


@register_model("atlas")
class AtlasLM(TemplateLM):
    """An Atlas run as an lm-eval model (module docstring)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int | None = None, **lm_eval_args):
        super().__init__()
        import jax

        from atlas_jax.init_from import load_model
        from atlas_jax.tokenizer import Tokenizer

        unknown = sorted(set(lm_eval_args) - set(LM_EVAL_ARGS))
        if unknown:
            raise EvalError(f"model_args {', '.join(unknown)}: unknown to the atlas model; it takes "
                            f"{', '.join(MODEL_ARGS)}")
        if not checkpoint:
            raise EvalError("model_args checkpoint: missing; give checkpoint=RUN_DIR (a run or a step directory)")
        self.batch_size = _positive_int(batch_size, "batch_size")
        params, self.cfg, tokenizer_path = load_model(checkpoint)
        self.params = jax.device_put(params)
        self.tokenizer = Tokenizer.load(tokenizer_path)
        if self.tokenizer.eos_id is None or self.tokenizer.eos_id < 0:
            raise EvalError(f"{tokenizer_path}: the tokenizer has no EOS, which lm-eval needs as the empty context")
        limit = self.cfg.model.max_seq_len
        self.max_length = _positive_int(limit if max_length is None else max_length, "max_length")
        if self.max_length > limit:
            raise EvalError(f"model_args max_length={self.max_length}: longer than the model's max_seq_len "
                            f"{limit}; use max_length={limit} or less")
        self.max_gen_toks = _positive_int(min(256, max(1, self.max_length // 2)) if max_gen_toks is None
                                          else max_gen_toks, "max_gen_toks")
        self.checkpoint = str(checkpoint)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode([int(t) for t in ids if t != eos])

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Request indices, longest first, in chunks of batch_size."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log-prob, is_greedy)."""
        from atlas_jax.sample import prompt_bucket

        seqs, n_cont = [], []
        for (context, continuation), ctx, cont in requests:
            if len(cont) > self.max_length:
                raise EvalError(f"a continuation of {len(cont)} tokens ({continuation[:40]!r}...) is longer than "
                                f"max_length {self.max_length}; it cannot be scored in one window")
            seqs.append(np.asarray((ctx + cont)[-(self.max_length + 1):], np.int32))
            n_cont.append(len(cont))
        scores_fn = token_scores_fn(self.cfg.model)
        rows = min(self.batch_size, len(seqs))
        out: list[Any] = [None] * len(seqs)
        for chunk in tqdm(self._batches([len(s) for s in seqs]), desc="loglikelihood", disable=disable_tqdm):
            width = prompt_bucket(max(len(seqs[i]) - 1 for i in chunk), self.max_length)
            inputs_BxT = np.zeros((rows, width), np.int32)
            labels_BxT = np.zeros((rows, width), np.int32)
            for r, i in enumerate(chunk):
                inputs_BxT[r, :len(seqs[i]) - 1] = seqs[i][:-1]
                labels_BxT[r, :len(seqs[i]) - 1] = seqs[i][1:]
            nll_BxT, greedy_BxT = (np.asarray(a) for a in scores_fn(self.params, inputs_BxT, labels_BxT))
            for r, i in enumerate(chunk):
                end = len(seqs[i]) - 1
                scored = slice(end - n_cont[i], end)
                out[i] = (-float(nll_BxT[r, scored].astype(np.float64).sum()), bool(greedy_BxT[r, scored].all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        seqs = atlas_sequences(self.tokenizer, texts)
        plan = plan_windows([len(s) for s in seqs], self.max_length, self.max_length)
        totals = [0.0] * len(seqs)
        batches = score_atlas(self.params, self.cfg.model, seqs, plan, batch_size=self.batch_size)
        for batch in tqdm(batches, total=-(-len(plan) // self.batch_size), desc="loglikelihood_rolling",
                          disable=disable_tqdm):
            for s in batch:
                totals[s.window.doc] -= float(s.nll.sum())
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ------------------------------------------------------------------ generation

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], Any]:
        """A request's gen_kwargs -> (until strings, SampleConfig)."""
        import dataclasses

        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise EvalError(f"gen_kwargs {', '.join(unknown)}: not supported by the atlas model; it reads "
                            f"{', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n_new = gen_kwargs.get("max_gen_toks", self.max_gen_toks)
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new < self.max_length:
            raise EvalError(f"gen_kwargs max_gen_toks={n_new}: must be between 1 and max_length - 1 "
                            f"({self.max_length - 1}), which leaves the context a token; lower it in the task's "
                            f"generation_kwargs or with model_args max_gen_toks=N")
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0:
            temperature = 1.0
        sample_cfg = dataclasses.replace(self.cfg.sample, max_new_tokens=n_new, temperature=temperature,
                                         top_k=int(gen_kwargs.get("top_k", 0)),
                                         top_p=float(gen_kwargs.get("top_p", 1.0)))
        return until, sample_cfg

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import jax

        from atlas_jax.sample import check_sample_config, generate

        groups: dict[str, list[int]] = {}  # requests with the same gen_kwargs run together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        key = jax.random.key(self.cfg.sample.seed)
        out: list[Any] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, sample_cfg = self._gen_settings(requests[members[0]].args[1])
            check_sample_config(sample_cfg)
            room = self.max_length - sample_cfg.max_new_tokens
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-room:] for i in members]
            rows = min(self.batch_size, len(members))
            for chunk in self._batches([len(p) for p in prompts]):
                batch = [prompts[j] for j in chunk]
                batch += [batch[0]] * (rows - len(batch))  # the last batch padded to the same rows
                keys = jax.vmap(jax.random.fold_in, (None, 0))(key, np.asarray([members[j] for j in chunk] +
                                                                                [0] * (rows - len(chunk))))
                tokens_BxN, lengths_B = jax.device_get(generate(
                    self.params, batch, keys, sample_cfg, self.cfg.model, eos_id=self.tokenizer.eos_id,
                    pad_id=self.tokenizer.pad_id))
                for r, j in enumerate(chunk):
                    i = members[j]
                    out[i] = cut_at_stop(self.tok_decode(tokens_BxN[r, :lengths_B[r]]), until)[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out
