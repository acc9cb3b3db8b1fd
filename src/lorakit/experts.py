"""LoRA on bare parameters (``target_parameters``): the fused expert weights of MoE models.

transformers keeps a mixture-of-experts layer's experts as 3-D parameters, not as ``nn.Linear``
modules: Mixtral's ``experts.gate_up_proj`` is (E, 2·I, H) and ``experts.down_proj`` (E, H, I),
each expert's weight as (out, in) rows; gpt-oss stores them transposed, (E, in, out), which its
experts module states with ``is_transposed``. A 2-D parameter (a router's ``gate.weight``) is the
one-expert case, (out, in). An adapter on such a parameter gives every expert e its own pair

    W'_e = W_e + s · B_e A_e          A_e (r × in), B_e (out × r), s = alpha / r

stored in PEFT's layout so that the files are PEFT's: ``lora_A.weight`` (E·r, in) holds A_e in
rows e·r … e·r + r − 1, ``lora_B.weight`` (out, r·E) holds B_e's column j at column j·E + e.

Two ways to run it, equal up to rounding (tested in float64):

- Per routed token (``TOKENWISE``, for the experts modules transformers builds with
  ``use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, …): the module's tokens
  sorted by expert, each expert's rows go through ``x W_eᵀ + s · (x A_eᵀ) B_eᵀ``, then the module's
  own gate (``_apply_gate``), biases, down projection and routing weights, summed over the top-k
  as transformers' batched implementation sums them. The adapter costs r·(in + out) per routed
  token and no weight-sized tensor; backward keeps activations only.
- Through the module's own forward (any other owner, such as a router's 2-D weight, or with
  ``TOKENWISE = False``): the targeted parameters read as W' = W + s·B A for that forward, so
  autograd carries the gradient through W' to A and B. This is how PEFT computes it; it
  materialises E·out·in values per parameter per forward (kept for backward).

Design: the module owning the parameters becomes a ``LoraExperts`` (a subclass of its own class,
made on the fly, as a LoRA layer is its base layer) holding one ``ParamLora`` per targeted
parameter in ``lora_params``. A ``ParamLora`` is a ``LoraLayer``, so activating, disabling,
merging, unmerging and deleting adapters go through the same code as for linear layers.

On disk, PEFT nests one wrapper per targeted parameter of a module, in the module's parameter
order, the first one innermost, so the k-th of n targeted parameters of ``experts`` is saved
under ``experts`` + ``.base_layer`` × (n − 1 − k) (``adapter_keys``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.layers import LoraLayer, adopt, find_modules, release

# Run the experts' adapters per routed token where the module allows it (see the module docstring);
# False always runs the module's own forward on W + s·B A (the reference path, PEFT's way).
TOKENWISE = True


class ParamLora(LoraLayer, nn.Module):
    """The adapters of one parameter ``owner.<param_name>`` (3-D (E, out, in) or (E, in, out)
    when the owner ``is_transposed``; 2-D (out, in)).

    Attributes:
        param_name: the parameter's name in its owner.
        num_experts: E (1 for a 2-D parameter).
        in_features, out_features: one expert's input and output sizes.
        transposed: the parameter stores each expert as (in, out).
    """

    base_class = nn.Module

    def __init__(self, owner: nn.Module, param_name: str) -> None:
        nn.Module.__init__(self)
        self.__dict__["owner"] = owner  # not a sub-module: the owner holds this one
        self.param_name = param_name
        weight = owner._parameters[param_name]
        self.transposed = weight.ndim == 3 and bool(getattr(owner, "is_transposed", False))
        if weight.ndim == 3:
            self.num_experts = weight.shape[0]
            self.in_features, self.out_features = (weight.shape[1], weight.shape[2]) if self.transposed else (
                weight.shape[2], weight.shape[1])
        else:
            self.num_experts, (self.out_features, self.in_features) = 1, weight.shape
        self._init_lora_state()

    @property
    def base_weight(self) -> torch.Tensor:
        return self.__dict__["owner"]._parameters[self.param_name]

    def _make_adapter(self, name: str, r: int) -> None:
        weight = self.base_weight
        kwargs = {"device": weight.device if weight.device.type != "meta" else None, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, **kwargs)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, **kwargs)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter ``name`` per expert: A (E, r, in), B (E, out, r)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        r = self.r[name]
        return a.view(self.num_experts, r, self.in_features), b.view(self.out_features, r, self.num_experts).permute(2, 0, 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B_e A_e`` for every expert, shaped like the parameter, in the adapter's dtype."""
        if self.base_weight.ndim == 2:
            return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        a, b = self.factors(name)
        delta = torch.bmm(b, a) * self.scaling[name]  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def live_names(self) -> list[str]:
        """The adapters that add to this parameter in a forward now (active, not merged, not disabled);
        none in a batch with an adapter per row (``adapter_batch``, which refuses rows that name one of
        this parameter's adapters, so the rows' adapters are all elsewhere)."""
        if self.adapters_disabled or "row_adapters" in self.__dict__:
            return []
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    def adapted_weight(self) -> torch.Tensor | None:
        """W + Σ s_a · B_a A_a over the live adapters, in W's dtype (None when there is none)."""
        names = self.live_names()
        if not names:
            return None
        weight = self.base_weight
        if weight.ndim == 3:  # W + s·B_e A_e per expert in one batched product each (no separate delta)
            for name in names:
                a, b = (t.to(weight.dtype) for t in self.factors(name))
                lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
                weight = torch.baddbmm(weight, lhs, rhs, alpha=self.scaling[name])
            return weight
        delta = self.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.delta_weight(name)
        return weight + delta.to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.param_name}'s adapters are applied by the module that owns it, not called")


class LoraExperts:
    """Mixin for a module whose parameters carry adapters (see the module docstring)."""

    base_class: ClassVar[type[nn.Module]]
    lora_params: nn.ModuleDict

    @classmethod
    def from_base(cls, base: nn.Module) -> LoraExperts:
        wrapped = adopt(experts_class_for(type(base)), base)
        wrapped.lora_params = nn.ModuleDict()
        return wrapped

    def to_base(self) -> nn.Module:
        """A plain object of the original class with this one's parameters (adapters dropped)."""
        return release(self, self.base_class, ("lora_params",))  # type: ignore[arg-type]

    def param_lora(self, param_name: str) -> ParamLora:
        """The ``ParamLora`` of ``param_name``, made on first use."""
        if param_name not in self.lora_params:
            self.lora_params[param_name] = ParamLora(self, param_name)  # type: ignore[arg-type]
        return self.lora_params[param_name]  # type: ignore[return-value]

    def adapter_keys(self, path: str, adapter_name: str) -> dict[str, nn.Parameter]:
        """``{PEFT key: parameter}`` of adapter ``adapter_name`` on this module (``path``: its full
        PEFT name), PEFT's nesting of one wrapper per targeted parameter."""
        params = [p for p in self._parameters if p in self.lora_params and adapter_name in self.lora_params[p].r]
        keys: dict[str, nn.Parameter] = {}
        for k, param_name in enumerate(params):
            prefix = path + ".base_layer" * (len(params) - 1 - k)
            lora = self.lora_params[param_name]
            keys[f"{prefix}.lora_A.weight"] = lora.lora_A[adapter_name].weight
            keys[f"{prefix}.lora_B.weight"] = lora.lora_B[adapter_name].weight
        return keys

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [param_name for param_name, lora in self.lora_params.items() if lora.live_names()]
        if not live:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        if self._routable(live, args, kwargs):
            return self._routed_forward(*args)
        swaps = {p: self.lora_params[p].adapted_weight() for p in live}
        originals = {k: self._parameters[k] for k in swaps}
        self._parameters.update(swaps)  # the forward reads W' (a tensor, not a Parameter) under W's name
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._parameters.update(originals)


    # -- per routed token --------------------------------------------------------------------------

    def _routable(self, live: list[str], args: tuple, kwargs: dict) -> bool:
        """Whether ``_routed_forward`` computes this module's forward: one of transformers' experts
        modules (it declares its layout: ``has_gate``, ``is_transposed``, ``has_bias``…), called as
        ``(hidden (T, H), top-k expert ids (T, K), top-k weights (T, K))``, with adapters only on
        its up (gate-up) and down projections, and not split across devices (expert parallelism)."""
        if not TOKENWISE or kwargs or len(args) != 3 or getattr(self, "_is_expert_parallel", True):
            return False
        if not all(hasattr(self, a) for a in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")):
            return False
        up = "gate_up_proj" if self.has_gate else "up_proj"
        hidden, index, weights = args
        return (set(live) <= {up, "down_proj"} and hidden.dim() == 2 and index.dim() == 2
                and weights.shape == index.shape and index.shape[0] == hidden.shape[0])

    def _routed_forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_tk · down_e(gate(up_e(x_t))) over token t's top-k experts e = index[t, k], with each
        projection ``x W_eᵀ + b_e + Σ_a s_a (x A_aeᵀ) B_aeᵀ``; (T, H) → (T, H)."""
        tokens, top_k = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # the (token, k) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # type: ignore[attr-defined]
        x = hidden[order // top_k]
        h = self._expert_products("gate_up_proj" if self.has_gate else "up_proj", x, counts)  # type: ignore[attr-defined]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # type: ignore[attr-defined]
        y = self._expert_products("down_proj", h, counts)
        if self.has_post_expert_norm:  # type: ignore[attr-defined]
            y = self.post_expert_norm(y)  # type: ignore[attr-defined]
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return y[back].view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

    def _expert_products(self, name: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows of ``x`` (sorted by expert, ``counts[e]`` rows for expert e) through parameter
        ``name`` of their expert, its bias and its live adapters."""
        weight = self._parameters[name]
        bias = self._parameters.get(f"{name}_bias") if self.has_bias else None  # type: ignore[attr-defined]
        lora = self.lora_params._modules.get(name)
        terms = [(*lora.factors(a), lora.scaling[a]) for a in lora.live_names()] if lora is not None else []
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = x[start:start + n]
            start += n
            out = rows @ weight[e] if self.is_transposed else rows @ weight[e].T  # type: ignore[attr-defined]
            if bias is not None:
                out = out + bias[e]
            for a, b, s in terms:
                out = out + (s * ((rows.to(a.dtype) @ a[e].T) @ b[e].T)).to(out.dtype)
            outs.append(out)
        if not outs:
            size = weight.shape[2] if self.is_transposed else weight.shape[1]  # type: ignore[attr-defined]
            return x.new_zeros(0, size)
        return torch.cat(outs)


_EXPERTS_CLASSES: dict[type[nn.Module], type[LoraExperts]] = {}


def experts_class_for(base_cls: type[nn.Module]) -> type[LoraExperts]:
    if base_cls not in _EXPERTS_CLASSES:
        _EXPERTS_CLASSES[base_cls] = type(f"Lora{base_cls.__name__}", (LoraExperts, base_cls), {"base_class": base_cls})
    return _EXPERTS_CLASSES[base_cls]


def experts_modules(model: nn.Module) -> list[tuple[str, LoraExperts]]:
    """(name, module) for every module with parameter adapters in ``model``."""
    return find_modules(model, LoraExperts)


def unwrap_empty(model: nn.Module, replace: Any) -> None:
    """Drop ``ParamLora``s left without adapters, and give a module left without any its plain
    class back (``replace(model, name, module)`` puts a module in place)."""
    for name, module in experts_modules(model):
        for param_name in [p for p, lora in module.lora_params.items() if not lora.adapter_names]:
            del module.lora_params[param_name]
        if not module.lora_params:
            replace(model, name, module.to_base())

