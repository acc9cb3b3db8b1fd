"""Combining adapters into a new one: ``combine_adapters(model, {"a": 0.7, "b": 0.3}, method=...)``.

For adapters a with weights w_a, each layer's target update is ΔW = Σ_a w_a s_a B_a A_a. The new
adapter has scale 1 (``lora_alpha = r``), so its factors carry the weights:

* ``cat``: A = [A_a; …] stacked (rank Σ r_a), B = [w_a s_a B_a, …] side by side. B A = ΔW exactly.
  A layer lacking some adapter gets zero blocks for it, so every layer has the same rank.
* ``linear``: equal ranks only; A = Σ √|w_a s_a| A_a and B = Σ sign(w_a) √|w_a s_a| B_a. Rank r,
  but B A also contains cross terms B_a A_b: an approximation (PEFT's ``linear``), useful when the
  adapters share an initialisation.
* ``svd``: ΔW computed exactly, then truncated to ``rank`` by SVD: B = U_k Σ_k, A = V_kᵀ, the best
  rank-k approximation (Frobenius error √(Σ_{j>k} σ_j²), Eckart–Young).

The result is an ordinary adapter: activate it, merge it, or save it in PEFT's format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import adapter_configs
from lorakit.layers import LoraLayer, _LinearLora, lora_layers

METHODS = ("cat", "linear", "svd")


def combine_adapters(model: nn.Module, weights: Mapping[str, float], method: str = "cat",
                     new_name: str = "combined", rank: int | None = None) -> LoraConfig:
    """Add adapter ``new_name`` combining ``weights`` (adapter name → weight); returns its config.

    ``rank`` is the target rank for ``svd`` (default: the largest input rank); ``cat`` and
    ``linear`` set it themselves. The new adapter is added inactive and frozen.
    """
    configs = adapter_configs(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not weights:
        raise ValueError("combine_adapters needs at least one adapter with a weight")
    missing = [a for a in weights if a not in configs]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r}; this model has {sorted(configs) or 'none'}")
    if new_name in configs:
        raise ValueError(f"adapter {new_name!r} already exists; pick another new_name")
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.r for a in weights)]
    dora = sorted({a for _, layer in layers for a in weights if layer.is_dora(a)})
    if dora:
        raise ValueError(f"adapter {dora[0]!r} is a DoRA adapter: its magnitudes do not add up like B A does, so "
                         f"combine_adapters takes LoRA adapters only")
    odd = [n for n, layer in layers if not isinstance(layer, _LinearLora)]
    if odd:
        kind = type(dict(layers)[odd[0]]).__name__
        raise ValueError(f"combine_adapters supports linear layers only; {odd[0]!r} is a {kind}")
    # each adapter's largest rank over the layers (rank_pattern may vary it): cat's block sizes
    ranks = {a: max(layer.r[a] for _, layer in layers if a in layer.r) for a in weights}
    if method == "linear":
        layer_ranks = {layer.r[a] for _, layer in layers for a in weights if a in layer.r}
        if len(set(ranks.values()) | layer_ranks) > 1:
            raise ValueError(f"method='linear' needs adapters of equal rank; got {ranks} (use 'cat' or 'svd')")
    if method == "svd":
        rank = rank or max(max(layer.r[a] for a in weights if a in layer.r) for _, layer in layers)
        if rank < 1:
            raise ValueError("rank must be >= 1")
    new_rank = {"cat": sum(ranks.values()), "linear": next(iter(ranks.values())), "svd": rank}[method]
    assert new_rank is not None
    for _, layer in layers:
        a, b = _combine_layer(layer, weights, method, new_rank, ranks)
        layer.update_layer(new_name, new_rank, float(new_rank), 1.0, 0.0, init=False)
        with torch.no_grad():
            layer.lora_A[new_name].weight.copy_(a)
            layer.lora_B[new_name].weight.copy_(b)
        for p in layer.adapter_parameters(new_name):
            p.requires_grad_(False)
    config = LoraConfig(r=new_rank, lora_alpha=new_rank, target_modules=sorted(n for n, _ in layers))
    configs[new_name] = config
    return config


def _combine_layer(layer: LoraLayer, weights: Mapping[str, float], method: str, rank: int,
                   blocks: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) for one layer, computed in float64; ``blocks`` gives each
    adapter's block size for ``cat`` (zero-padded where this layer's rank is smaller or absent)."""
    present = [a for a in weights if a in layer.r]
    factors = {a: (layer.lora_A[a].weight.double(), layer.lora_B[a].weight.double(), layer.scaling[a])
               for a in present}
    out_f, in_f = layer.out_features, layer.in_features  # type: ignore[attr-defined]
    device = layer.base_weight.device
    if method == "cat":
        a_new = torch.zeros(rank, in_f, dtype=torch.float64, device=device)
        b_new = torch.zeros(out_f, rank, dtype=torch.float64, device=device)
        start = 0
        for name, w in weights.items():
            if name in factors:
                a, b, s = factors[name]
                a_new[start:start + a.shape[0]] = a
                b_new[:, start:start + a.shape[0]] = b * (w * s)
            start += blocks[name]
        return a_new, b_new
    if method == "linear":
        a_sum = sum(math.sqrt(abs(weights[n] * s)) * a for n, (a, _, s) in factors.items())
        b_sum = sum(math.copysign(math.sqrt(abs(weights[n] * s)), weights[n]) * b for n, (_, b, s) in factors.items())
        return a_sum, b_sum  # type: ignore[return-value]
    delta = sum(weights[n] * s * (b @ a) for n, (a, b, s) in factors.items())  # (out, in)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)  # type: ignore[arg-type]
    k = min(rank, sigma.numel())
    a_new = torch.zeros(rank, in_f, dtype=torch.float64, device=device)
    b_new = torch.zeros(out_f, rank, dtype=torch.float64, device=device)
    a_new[:k], b_new[:, :k] = vh[:k], u[:, :k] * sigma[:k]
    return a_new, b_new
