"""The pure training and evaluation steps, and the sharded creation of the train state.

    state = {"params", "opt_state", "step", "rng", "bad_steps"}      (a plain pytree)
    train_step(state, batch) -> (state, metrics)                       under jax.jit, state donated

Gradient accumulation runs inside the step with `lax.scan` over microbatches. Microbatch m takes
rows m, m+M, m+2M, ... of the global batch, so every device holds a slice of every microbatch and
the result depends only on the global batch, never on the device count. A step whose loss or
gradient is not finite leaves params and Adam's moments unchanged and counts in `bad_steps`; the
LR schedule still advances, so it ends at min_lr at step train.steps whatever was skipped.

The gradient is that of `model.objective`: the cross-entropy plus, for a MoE model, the auxiliary
losses times model.moe_aux_loss_coef / moe_z_loss_coef. metrics["loss"] is the cross-entropy alone
(comparable with val loss); a MoE model's metrics add "moe_load_balance" and "moe_router_z", unweighted.

LoRA (lora.rank > 0): state["params"] holds the adapters only (so the optimizer holds state for
them only) and the frozen base params are a separate argument of the jitted steps, bound by
make_train_step / make_eval_step (`base=`), never donated, never updated.
"""
from __future__ import annotations

import functools

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flax.linen as nn

from atlas_jax import lora as L
from atlas_jax.config import Config
from atlas_jax.finetune.losses import dpo_loss, sequence_logps
from atlas_jax.model import Transformer, cross_entropy, init_params, loss_terms, objective
from atlas_jax.optim import lr_schedule, make_optimizer
from atlas_jax.sharding import BATCH_AXES, batch_sharding, replicated, state_shardings

PyTree = Any


def base_shapes(cfg: Config) -> PyTree:
    """The model's param shapes (for LoRA: the frozen base's)."""
    return jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))


def init_trainable(cfg: Config, key: jax.Array) -> PyTree:
    """What the optimizer trains: the model's params, or under LoRA the zero-delta adapters."""
    if cfg.lora.rank > 0:
        return L.init_adapters(base_shapes(cfg), cfg.lora, key)
    return init_params(cfg.model, key)


def init_state(cfg: Config, optimizer: optax.GradientTransformation, seed_key: jax.Array) -> PyTree:
    init_key, rng_key = jax.random.split(seed_key)
    params = init_trainable(cfg, init_key)
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.array(0, jnp.int32),
        "rng": jax.random.key_data(rng_key),
        "bad_steps": jnp.array(0, jnp.int32),
    }


def abstract_state(cfg: Config) -> PyTree:
    optimizer = make_optimizer(cfg.train)
    return jax.eval_shape(lambda: init_state(cfg, optimizer, jax.random.key(cfg.train.seed)))


def create_sharded_state(cfg: Config, mesh: Mesh) -> tuple[PyTree, PyTree]:
    """Params and optimizer state created directly in their shardings (eval_shape -> jit(init))."""
    optimizer = make_optimizer(cfg.train)
    shapes = abstract_state(cfg)
    shardings = state_shardings(shapes, mesh)
    init = jax.jit(lambda: init_state(cfg, optimizer, jax.random.key(cfg.train.seed)), out_shardings=shardings)
    return init(), shardings


def schedule_count(opt_state) -> jax.Array:
    """The number of updates applied so far: the LR schedule's step."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    (sched,) = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
    return sched.count


def with_schedule_count(opt_state, count: jax.Array):
    """opt_state with the LR schedule's step set to `count` (everything else unchanged)."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree_util.tree_map(lambda s: optax.ScaleByScheduleState(count=count) if is_sched(s) else s,
                                  opt_state, is_leaf=is_sched)


def _apply_policy(cfg: Config, params, base, inputs, key):
    """Logits of the trained model: params, or under LoRA the base with the adapters `params`."""
    rngs = {"dropout": key} if key is not None else None
    if cfg.lora.rank == 0:
        return Transformer(cfg.model).apply({"params": params}, inputs, key is None, rngs=rngs)
    with _adapters_in_place(cfg, params, key):
        return Transformer(cfg.model).apply({"params": base}, inputs, key is None, rngs=rngs)


def _adapters_in_place(cfg: Config, adapters, key):
    """The context in which the base computes with the LoRA adapters added (their dropout keyed by `key`)."""
    lora_key = jax.random.fold_in(key, 1) if key is not None and cfg.lora.dropout > 0 else None
    return nn.intercept_methods(L.interceptor(adapters, cfg.lora, lora_key))


def _terms(cfg: Config, params, base, mb: dict, key, norm):
    """The microbatch's loss terms for train.objective (the first is what the gradient follows).

    lm: loss_terms of the model (under LoRA: of the base with the adapters in place). sft: the same
    with the assistant-token weights, divided by `norm` (the global batch's weight sum, times the
    microbatch count: the step averages microbatches, so the result is the batch's per-token mean).
    dpo: the DPO loss of the policy against the reference (`base`: LoRA's base with adapters off,
    or the frozen copy of the starting params), and the reward metrics."""
    objective_name = cfg.train.objective
    if cfg.lora.rank > 0 and cfg.lora.base_quant != "none":  # QLoRA: the frozen base is held quantized
        base = L.dequantize_base(base)
    if objective_name == "dpo":
        inputs = jnp.concatenate([mb["chosen_inputs"], mb["rejected_inputs"]])
        targets = jnp.concatenate([mb["chosen_targets"], mb["rejected_targets"]])
        weights = jnp.concatenate([mb["chosen_weights"], mb["rejected_weights"]])
        b = mb["chosen_inputs"].shape[0]
        policy = sequence_logps(_apply_policy(cfg, params, base, inputs, key), targets, weights)
        if "chosen_ref_logps" in mb:  # train.dpo_reference=once: computed before step 1
            ref = jnp.concatenate([mb["chosen_ref_logps"], mb["rejected_ref_logps"]])
        else:
            ref = jax.lax.stop_gradient(sequence_logps(Transformer(cfg.model).apply({"params": base}, inputs),
                                                       targets, weights))
        loss, metrics = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], cfg.train.dpo_beta,
                                 cfg.train.dpo_label_smoothing, cfg.train.rpo_alpha,
                                 jnp.sum(mb["chosen_weights"], axis=-1))
        return {"loss": loss, **metrics}
    weights = mb.get("weights") if objective_name == "sft" else None
    normalizer = norm if objective_name == "sft" else None
    packed = {"positions_BxT": mb.get("positions"), "segment_ids_BxT": mb.get("segment_ids")}  # data.pack
    if cfg.lora.rank == 0:
        return loss_terms(params, cfg.model, mb["inputs"], mb["targets"], key, weights, normalizer, **packed)
    with _adapters_in_place(cfg, params, key):
        return loss_terms(base, cfg.model, mb["inputs"], mb["targets"], key, weights, normalizer, **packed)


def _objective(terms: dict, cfg: Config):
    if cfg.train.objective == "dpo":
        return terms["loss"]
    return objective(terms, cfg.model)


class Bound:
    """A jitted (x, batch, base) with `base` bound: called as f(x, batch); .lower(x, batch) for AOT
    compilation and memory analysis, as on the jitted function itself."""

    def __init__(self, jitted, base):
        self.jitted, self.base = jitted, base

    def __call__(self, x, batch):
        return self.jitted(x, batch, self.base)

    def lower(self, x, batch):
        return self.jitted.lower(x, batch, self.base)


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """fn traced with `mesh` as the abstract mesh, where the mesh has an expert axis: the MoE layers
    read it (model.expert_parallel) and exchange tokens by all_to_all instead of gathering experts."""
    if mesh.shape["expert"] == 1:
        return fn

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_train_step(cfg: Config, mesh: Mesh, shardings: PyTree, base: PyTree | None = None,
                    base_shardings: PyTree | None = None) -> Callable:
    """The jitted (state, batch) -> (state, metrics). LoRA: `base` (the frozen params, in
    `base_shardings`) is bound here and passed to every call, as an argument, not a constant."""
    m_cfg, t_cfg = cfg.model, cfg.train
    optimizer = make_optimizer(t_cfg)
    schedule = lr_schedule(t_cfg)
    n_micro = t_cfg.microbatches
    use_dropout = m_cfg.dropout > 0 or (cfg.lora.rank > 0 and cfg.lora.dropout > 0)

    def objective_and_terms(params, base, mb, key, norm):
        terms = _terms(cfg, params, base, mb, key, norm)
        return _objective(terms, cfg), terms

    grad_fn = jax.value_and_grad(objective_and_terms, has_aux=True)

    def step(state, batch, base):
        # SFT: the global batch's loss-weight count, times the microbatches the step averages
        norm = jnp.sum(batch["weights"]) * n_micro if cfg.train.objective == "sft" else None

        def micro_grad(params, mb, key):
            """((objective, terms), grads) of one microbatch."""
            return grad_fn(params, base, mb, key if use_dropout else None, norm)

        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if n_micro == 1:
            (total, terms), grads = micro_grad(params, batch, key)
        else:
            micro = split_microbatches(batch, n_micro, mesh)

            def body(carry, xs):
                sums, grad_sum = carry
                i, mb = xs
                (total_i, terms_i), grads_i = micro_grad(params, mb, jax.random.fold_in(key, i))
                sums = jax.tree_util.tree_map(jnp.add, sums, (total_i, terms_i))
                return (sums, jax.tree_util.tree_map(jnp.add, grad_sum, grads_i)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zero_terms = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                jax.eval_shape(lambda: micro_grad(params, first, key)[0]))
            # Two microbatches per loop iteration let XLA overlap one's backward with the next one's
            # forward: on 2 CPU cores the shakespeare step went 465-528 -> 431-454 ms (4 and 8 per
            # iteration were slower again: bigger temporaries); neutral at seq 1024.
            (sums, grad_sum), _ = jax.lax.scan(body, (zero_terms, zeros),
                                               (jnp.arange(n_micro), micro), unroll=min(2, n_micro))
            total, terms = jax.tree_util.tree_map(lambda x: x / n_micro, sums)
            grads = jax.tree_util.tree_map(lambda g: g / n_micro, grad_sum)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # An update may overflow finite params too (checked leaf by leaf: a norm of huge finite values
        # would itself overflow).
        ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new_params)]))
        # Computed once: left to itself XLA fuses this cheap scalar chain (an `and` per leaf) into every
        # leaf's select below, leaves^2 instructions (a 36-layer GPT-2 compiled for 15 minutes). XLA does
        # not duplicate an expensive op (a sqrt) into several consumers, so the chain ends in one.
        ok = jnp.sqrt(ok.astype(jnp.float32)) > 0.5
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        applied = schedule_count(state["opt_state"])
        new_state = {
            "params": keep(new_params, params),
            # A skipped step leaves params and moments as they were but still advances the LR
            # schedule, so the schedule and train.steps agree: a run still ends at min_lr.
            "opt_state": with_schedule_count(keep(new_opt_state, state["opt_state"]), applied + 1),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
        }
        metrics = {**terms, "grad_norm": grad_norm, "lr": schedule(applied),
                   "skipped": (~ok).astype(jnp.int32), "bad_steps": new_state["bad_steps"]}
        return new_state, metrics

    jitted = jax.jit(under_mesh(step, mesh), in_shardings=(shardings, batch_sharding(mesh), base_shardings),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    return Bound(jitted, base)


def split_microbatches(batch: dict, n_micro: int, mesh: Mesh) -> dict:
    """[B, T] -> [M, B/M, T]: microbatch m takes rows m, m+M, m+2M, ..., so every device holds a
    slice of every microbatch (the rows stay on the device that has them)."""
    def split(x_BxT):
        b, t = x_BxT.shape
        x_MxBmxT = x_BxT.reshape(b // n_micro, n_micro, t).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x_MxBmxT, NamedSharding(mesh, P(None, BATCH_AXES)))

    return {k: split(v) for k, v in batch.items()}


def eval_microbatches(cfg: Config, batch_rows: int, n_devices: int) -> int:
    """How many passes an eval batch of `batch_rows` takes: the train step's microbatches when they
    divide it into per-device slices, else the largest count that does (a short last val batch)."""
    for m in range(min(cfg.train.microbatches, batch_rows), 0, -1):
        if batch_rows % m == 0 and (batch_rows // m) % n_devices == 0:
            return m
    return 1


def make_eval_step(cfg: Config, mesh: Mesh, param_shardings: PyTree, base: PyTree | None = None,
                   base_shardings: PyTree | None = None) -> Callable:
    """(params, batch) -> summed NLL in nats over the batch's targets (float32); sft: over the weighted
    (assistant) targets; dpo: {loss, reward metrics} summed over the batch's pairs.

    The batch runs in the train step's microbatches (`train.microbatches`), one after another, so
    evaluation holds the logits of one microbatch at a time ([B/M, T, V] float32), never the whole
    batch's: at 64 x 1024 x 32k that is the difference between 8 GiB and 1 GiB."""
    model = Transformer(cfg.model)

    def evaluate(params, batch, base):
        def nll(params, mb):
            if cfg.train.objective == "dpo":  # sums over the pairs: the caller divides by their count
                terms = _terms(cfg, params, base, mb, None, None)
                n = mb["chosen_inputs"].shape[0]
                return {k: v * n for k, v in terms.items()}
            packed = {"positions_BxT": mb.get("positions"), "segment_ids_BxT": mb.get("segment_ids")}
            if cfg.lora.rank == 0:
                logits = model.apply({"params": params}, mb["inputs"], **packed)
            else:
                plain = L.dequantize_base(base) if cfg.lora.base_quant != "none" else base
                logits = L.apply(cfg.model, plain, params, cfg.lora, mb["inputs"], **packed)
            total, _ = cross_entropy(logits, mb["targets"], mb["weights"] if cfg.train.objective == "sft" else None)
            return total

        rows = next(iter(batch.values())).shape[0]
        n_micro = eval_microbatches(cfg, rows, mesh.size)
        if n_micro == 1:
            return nll(params, batch)
        micro = split_microbatches(batch, n_micro, mesh)
        totals = jax.lax.map(lambda mb: nll(params, mb), micro)
        return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), totals)

    jitted = jax.jit(under_mesh(evaluate, mesh), in_shardings=(param_shardings, batch_sharding(mesh), base_shardings),
                     out_shardings=replicated(mesh))
    return Bound(jitted, base)


def make_reference_logps(cfg: Config, mesh: Mesh, base: PyTree, base_shardings: PyTree) -> Callable:
    """(DPO batch) -> (chosen [B], rejected [B]) summed reply log-probs under the reference model (the
    frozen start: under LoRA the base with adapters off), for train.dpo_reference=once."""
    def logps(batch, base):
        if cfg.lora.rank > 0 and cfg.lora.base_quant != "none":
            base = L.dequantize_base(base)
        model = Transformer(cfg.model)
        return tuple(sequence_logps(model.apply({"params": base}, batch[f"{k}_inputs"]), batch[f"{k}_targets"],
                                    batch[f"{k}_weights"]) for k in ("chosen", "rejected"))

    jitted = jax.jit(under_mesh(logps, mesh), in_shardings=(batch_sharding(mesh), base_shardings),
                     out_shardings=replicated(mesh))
    return lambda batch: jitted(batch, base)
