"""A plain PyTorch twin of atlas_jax's `llama` and `gpt2` models, for parity tests only.

The families are presets over three options (`positions` rope | learned | none, `norm` rms | layer,
`mlp` swiglu | gelu); `arch` alone decides the biases (gpt2: every Linear but the head).

Written independently of atlas_jax (it imports nothing from it): attention is spelled out as
matmul + causal mask + softmax, RoPE rotates adjacent pairs with strided slices, GQA repeats each
key/value head over its group of query heads. It shares only hyper-parameter VALUES with the Flax
model, through its own `RefConfig`. Float32, no KV cache, no dropout.

Mixture-of-experts (llama, `moe_experts` > 0) is written as Hugging Face's Mixtral block is: a
softmax over all experts, torch.topk, the k weights renormalised, then a loop over experts, each
running its SwiGLU on the tokens that picked it and adding the weighted result in place. Its
auxiliary losses (Switch load balancing, 1.0 when balanced; ST-MoE router z-loss) are averaged
over the MoE layers and added to `loss` with their coefficients.

Attention (`attention`, the twin's own choice, never taken from a mapping): `math`, the default, is
the spelled-out form above, kept for parity; `sdpa` calls torch's fused
F.scaled_dot_product_attention on the same q, k, v (is_causal for plain rows, the same boolean mask
for packed rows, enable_gqa for grouped heads), for benchmarks of torch at its fastest. Sink logits
have no sdpa form (an extra softmax column): `sdpa` refuses them.

Attention sinks: `sink_logits` gives each head a learned logit `attn.sink` [H], appended to every
row of scores as one more column before the softmax and dropped after it (gpt-oss); `sink_tokens` = n
learned vectors `sink.weight` [n, D] are concatenated in front of the token embeddings (positions
0..n-1, the tokens at n..; gpt2's position table has max_seq_len + n rows) and their outputs cut off
before the head.

Module names follow the Flax param paths (`layers.3.attn.wq` <-> `layers_3/attn/wq`), so the
loader in `atlas_torch_ref.load` is a renaming plus a transpose of the Linear weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RefConfig:
    arch: str  # llama | gpt2
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # gpt2: must equal n_heads
    d_ff: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    moe_experts: int = 0  # 0: every layer has a dense MLP
    moe_experts_per_token: int = 2
    moe_first_layer: int = 0
    moe_every: int = 1
    moe_d_ff: int | None = None  # None -> d_ff
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0
    # Expert parallelism's capacity (Atlas' model.moe_capacity_factor > 0 on a train.mesh expert axis):
    # the N tokens are split into moe_token_groups equal, contiguous groups (one per device) and each
    # group sends at most ceil(factor * group assignments / moe_expert_devices) of its assignments to
    # each of the moe_expert_devices devices holding E/moe_expert_devices experts; the rest are dropped.
    moe_capacity_factor: float = 0.0
    moe_token_groups: int = 1
    moe_expert_devices: int = 1
    # Architecture options, None -> the family's: llama rope/rms/swiglu, gpt2 learned/layer/gelu (arch decides biases).
    positions: str | None = None  # rope | learned | none
    norm: str | None = None  # rms | layer
    mlp: str | None = None  # swiglu | gelu
    sink_logits: bool = False  # a learned logit per head in every softmax row (gpt-oss)
    sink_tokens: int = 0  # n learned vectors prepended to every sequence
    attention: str = "math"  # math (spelled out, for parity) | sdpa (F.scaled_dot_product_attention)

    def __post_init__(self):
        if self.attention not in ("math", "sdpa"):
            raise ValueError(f"attention {self.attention!r}: expected math or sdpa")
        if self.attention == "sdpa" and self.sink_logits:
            raise ValueError("attention sdpa with sink_logits: scaled_dot_product_attention has no sink column; "
                             "use attention='math'")
        family = {"llama": ("rope", "rms", "swiglu"), "gpt2": ("learned", "layer", "gelu")}.get(self.arch)
        if family is None:
            raise ValueError(f"arch {self.arch!r}: expected llama or gpt2")
        for name, default in zip(("positions", "norm", "mlp"), family):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Layers moe_first_layer, moe_first_layer + moe_every, ... are MoE."""
        return self.moe_experts > 0 and i >= self.moe_first_layer and (i - self.moe_first_layer) % self.moe_every == 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], attention: str = "math") -> "RefConfig":
        """Pick this config's fields out of any mapping (e.g. dataclasses.asdict of a model config).
        `attention` is the twin's own (a model config's `attention` names a jax kernel): given here."""
        fields = [f for f in dataclasses.fields(cls) if f.name != "attention"]
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and values.get(f.name) is None]
        if missing:
            raise ValueError(f"RefConfig needs resolved values for {', '.join(missing)}")
        return cls(**{f.name: values[f.name] for f in fields if f.name in values}, attention=attention)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        return x_BxTxD * torch.rsqrt(x_BxTxD.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: RefConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)  # scale and bias


def rope(x_BxNxTxH: torch.Tensor, theta: float, positions_BxT: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) at position p by the angle p * theta^(-2i/H); p is the
    token's index t, or positions_BxT[b, t] when given (packed rows)."""
    b, _, t, h = x_BxNxTxH.shape
    inv_freq_H2 = (theta ** (-torch.arange(0, h, 2, dtype=torch.float64) / h)).float()
    if positions_BxT is None:
        positions_BxT = torch.arange(t).expand(b, t)
    angle_Bx1xTxH2 = positions_BxT.float()[:, None, :, None] * inv_freq_H2
    cos, sin = angle_Bx1xTxH2.cos(), angle_Bx1xTxH2.sin()
    even, odd = x_BxNxTxH[..., 0::2], x_BxNxTxH[..., 1::2]
    out = torch.empty_like(x_BxNxTxH)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class Attention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        bias = cfg.arch == "gpt2"
        dh = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * dh, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * dh, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * dh, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * dh, cfg.d_model, bias=bias)
        if cfg.sink_logits:
            self.sink = nn.Parameter(torch.zeros(cfg.n_heads))

    def forward(self, x_BxTxD: torch.Tensor, positions_BxT: torch.Tensor | None = None,
                segment_ids_BxT: torch.Tensor | None = None, n_sinks: int = 0) -> torch.Tensor:
        """n_sinks: the first n_sinks rows are sink tokens, which every later token sees (packed rows too)."""
        c = self.cfg
        b, t, _ = x_BxTxD.shape
        dh = c.head_dim
        q = self.wq(x_BxTxD).view(b, t, c.n_heads, dh).transpose(1, 2)  # B,H,T,Dh
        k = self.wk(x_BxTxD).view(b, t, c.n_kv_heads, dh).transpose(1, 2)  # B,KV,T,Dh
        v = self.wv(x_BxTxD).view(b, t, c.n_kv_heads, dh).transpose(1, 2)
        if c.positions == "rope":
            q, k = rope(q, c.rope_theta, positions_BxT), rope(k, c.rope_theta, positions_BxT)
        allowed_BxTxT = None  # None: plain causal
        if segment_ids_BxT is not None:
            # Packed rows: query i may read key j only when j <= i and both carry the same segment id.
            same_BxTxT = torch.zeros(b, t, t, dtype=torch.bool)
            for i in range(t):
                for j in range(i + 1):
                    same_BxTxT[:, i, j] = segment_ids_BxT[:, i] == segment_ids_BxT[:, j]
            same_BxTxT[:, :, :n_sinks] = True
            allowed_BxTxT = torch.ones(t, t, dtype=torch.bool).tril() & same_BxTxT
        if c.attention == "sdpa":  # torch's fused kernel, same mask and grouping
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if allowed_BxTxT is None else allowed_BxTxT[:, None],
                is_causal=allowed_BxTxT is None, enable_gqa=c.n_kv_heads != c.n_heads)
            return self.wo(out.transpose(1, 2).reshape(b, t, c.n_heads * dh))
        # Query head h reads kv head h // group: repeat each kv head `group` times in place.
        group = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores_BxHxTxT = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if allowed_BxTxT is None:
            allowed_BxTxT = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
        scores_BxHxTxT = scores_BxHxTxT.masked_fill(~allowed_BxTxT[:, None], float("-inf"))
        if c.sink_logits:  # one more column per row, the head's sink logit, dropped after the softmax
            sink_BxHxTx1 = self.sink.view(1, -1, 1, 1).expand(b, -1, t, 1)
            probs = torch.softmax(torch.cat([scores_BxHxTxT, sink_BxHxTx1], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores_BxHxTxT, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, c.n_heads * dh)
        return self.wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        bias = cfg.arch == "gpt2"
        if self.swiglu:
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w_down(F.silu(self.w_gate(x_BxTxD)) * self.w_up(x_BxTxD))
        return self.w_down(F.gelu(self.w_up(x_BxTxD), approximate="tanh"))


class MoE(nn.Module):
    """Top-k of E SwiGLU experts, Mixtral's routing. Expert weights are stacked [E, in, out]."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        e, d, f = cfg.moe_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
        self.cfg, self.k = cfg, cfg.moe_experts_per_token
        self.router = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.empty(e, d, f))
        self.w_up = nn.Parameter(torch.empty(e, d, f))
        self.w_down = nn.Parameter(torch.empty(e, f, d))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)
        self.aux: dict[str, torch.Tensor] = {}  # the last forward's auxiliary losses

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(b * t, d)
        logits_NxE = self.router(x_NxD)
        probs_NxE = torch.softmax(logits_NxE, dim=-1)
        top_NxK, experts_NxK = torch.topk(probs_NxE, self.k, dim=-1)
        weights_NxK = top_NxK / top_NxK.sum(dim=-1, keepdim=True)
        out_NxD = torch.zeros_like(x_NxD)
        kept_NxK = self.capacity_kept(experts_NxK)
        for e in range(self.w_gate.shape[0]):
            token, slot = torch.where((experts_NxK == e) & kept_NxK)
            if token.numel() == 0:
                continue
            xe = x_NxD[token]
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            out_NxD.index_add_(0, token, ye * weights_NxK[token, slot, None])
        n_experts = probs_NxE.shape[-1]
        fraction_E = torch.bincount(experts_NxK.reshape(-1), minlength=n_experts).float() / experts_NxK.numel()
        self.aux = {"load_balance": n_experts * (fraction_E * probs_NxE.mean(dim=0)).sum(),
                    "router_z": torch.logsumexp(logits_NxE, dim=-1).pow(2).mean()}
        return out_NxD.reshape(b, t, d)

    def capacity_kept(self, experts_NxK: torch.Tensor) -> torch.Tensor:
        """Which assignments fit their device's capacity (all of them without a capacity factor): in each
        token group, the assignments bound for one device are taken by expert id, then token order."""
        cfg = self.cfg
        kept_NxK = torch.ones_like(experts_NxK, dtype=torch.bool)
        if cfg.moe_capacity_factor <= 0:
            return kept_NxK
        n, k = experts_NxK.shape
        per_group, n_dev = n // cfg.moe_token_groups, cfg.moe_expert_devices
        local = cfg.moe_experts // n_dev
        a = per_group * k
        capacity = min(a, max(1, math.ceil(cfg.moe_capacity_factor * a / n_dev)))
        for g in range(cfg.moe_token_groups):
            expert_A = experts_NxK[g * per_group:(g + 1) * per_group].reshape(-1)
            dest_A = expert_A // local
            rank_A = torch.empty_like(expert_A)
            for dev in range(n_dev):
                mine = torch.where(dest_A == dev)[0]
                by_expert = mine[torch.argsort(expert_A[mine] * a + mine)]  # expert id, then token order
                rank_A[by_expert] = torch.arange(len(by_expert))
            kept_NxK[g * per_group:(g + 1) * per_group] = (rank_A < capacity).reshape(per_group, k)
        return kept_NxK


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)) (or moe(norm(x)))."""

    def __init__(self, cfg: RefConfig, moe: bool = False):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        if moe:
            self.moe = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x_BxTxD: torch.Tensor, positions_BxT: torch.Tensor | None = None,
                segment_ids_BxT: torch.Tensor | None = None, n_sinks: int = 0) -> torch.Tensor:
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT, n_sinks)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x_BxTxD + ffn(self.mlp_norm(x_BxTxD))


class Transformer(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        if cfg.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch {cfg.arch!r}: expected llama or gpt2")
        if cfg.arch == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("gpt2 has no grouped attention: n_kv_heads must equal n_heads")
        if cfg.moe_experts and cfg.arch != "llama":
            raise ValueError("mixture-of-experts has SwiGLU experts: llama only")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len + cfg.sink_tokens, cfg.d_model)
        if cfg.sink_tokens:
            self.sink = nn.Embedding(cfg.sink_tokens, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens_BxT: torch.Tensor, positions_BxT: torch.Tensor | None = None,
                segment_ids_BxT: torch.Tensor | None = None) -> torch.Tensor:
        """Causal forward -> logits_BxTxV. Packed rows: positions_BxT (restarting at 0 in each segment)
        replace 0..T-1, and segment_ids_BxT keep attention inside each segment."""
        b, t = tokens_BxT.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.cfg.max_seq_len}")
        n = self.cfg.sink_tokens
        x = self.embed(tokens_BxT)
        if positions_BxT is None:
            positions_BxT = torch.arange(t).expand(b, t)
        if n:
            x = torch.cat([self.sink.weight.expand(b, n, -1), x], dim=1)
            positions_BxT = torch.cat([torch.arange(n).expand(b, n), positions_BxT.long() + n], dim=1)
            if segment_ids_BxT is not None:
                segment_ids_BxT = torch.cat([torch.full((b, n), -1, dtype=segment_ids_BxT.dtype), segment_ids_BxT], 1)
        if self.cfg.positions == "learned":
            x = x + self.pos_embed(positions_BxT.long())
        for layer in self.layers:
            x = layer(x, positions_BxT, segment_ids_BxT, n)
        x = self.final_norm(x[:, n:])
        return x @ self.embed.weight.T if self.cfg.tie_embeddings else self.lm_head(x)

    def loss(self, tokens_BxT: torch.Tensor, targets_BxT: torch.Tensor, positions_BxT: torch.Tensor | None = None,
             segment_ids_BxT: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy in nats over all B*T targets, plus for MoE the auxiliary
        losses (averaged over the MoE layers) times their coefficients."""
        logits = self.forward(tokens_BxT, positions_BxT, segment_ids_BxT)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_BxT.reshape(-1))
        moes = [layer.moe for layer in self.layers if hasattr(layer, "moe")]
        if not moes:
            return ce
        load_balance = torch.stack([m.aux["load_balance"] for m in moes]).mean()
        router_z = torch.stack([m.aux["router_z"] for m in moes]).mean()
        return ce + self.cfg.moe_aux_loss_coef * load_balance + self.cfg.moe_z_loss_coef * router_z
