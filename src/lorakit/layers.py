"""LoRA layers: a frozen base layer plus, per adapter, a low-rank update.

For an input ``x`` (…, in) each LoRA layer computes

    y = base(x) + Σ_{a ∈ active} s_a · B_a(A_a(dropout_a(x)))        s_a = alpha_a / r_a  (or / sqrt(r_a))

with ``A_a`` (r × in) and ``B_a`` (out × r). Merging folds ``s_a · B_a A_a`` into the base weight.

Design: a LoRA layer *is* its base layer. ``LoraLinear.from_base(linear)`` builds an object of a
subclass of the base's own class (``LoraLinear(nn.Linear)``, ``LoraConv1D(Conv1D)``...) that takes over
the base's parameters under their original names (``weight``, ``bias``), so a base checkpoint loads
unchanged, ``isinstance(layer, nn.Linear)`` still holds, and the base forward runs as written — also
for quantized bases (bitsandbytes layers get a subclass made on the fly). ``to_base()`` returns a plain
object of the original class: merged export leaves no wrapper behind.

Adapters live in ``nn.ModuleDict``s keyed by adapter name, with PEFT's in-memory names
(``lora_A.<name>.weight``, ``lora_B.<name>.weight``; ``lora_embedding_A.<name>`` for embeddings).
A DoRA adapter on a linear layer or a convolution adds its magnitude ``lora_magnitude_vector.<name>``
((out,); (1, out, 1…) for a convolution, PEFT's shapes) and rescales the layer's rows, or a kernel's
output channels (``lorakit.dora``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import dora, inits, rows
from lorakit.kernels.cast import cast_frozen
from lorakit.kernels.dequant import float_weight, is_4bit, runs_dequantized
from lorakit.kernels.dora import fused_dora_linear
from lorakit.kernels.gemm import linear, uses_onednn
from lorakit.kernels.lora import fused_lora_linear, lora_linear
from lorakit.memory import page_out

# Use the fused LoRA-linear (or DoRA-linear) autograd node where it applies (see `_LinearLora._fused_adapter`);
# False runs the plain composition of base forward + LoRA term (the reference path).
FUSED_LINEAR = True
# Attributes a LoRA layer adds to its base; removed again by `to_base`.
_LORA_MODULES = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_router",
                 "lora_magnitude_vector")
_LORA_ATTRS = ("r", "lora_alpha", "scaling", "active_adapters", "merged_adapters", "adapters_disabled",
               "dora_norms", "dora_norm_cache", "dora_weight_sq", "init_factors")


def adopt(cls: type, base: nn.Module) -> Any:
    """A new ``cls`` object owning ``base``'s parameters, buffers, sub-modules and hooks (no copies)."""
    obj = cls.__new__(cls)
    state = dict(base.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = type(state[key])(state[key])
    obj.__dict__.update(state)
    return obj


def release(obj: nn.Module, cls: type[nn.Module], modules: tuple[str, ...], attrs: tuple[str, ...] = ()) -> nn.Module:
    """``adopt``'s inverse: a plain ``cls`` object owning ``obj``'s parameters, buffers and hooks, without
    the sub-modules named in ``modules`` and the attributes in ``attrs`` (what a wrapper added)."""
    plain = cls.__new__(cls)
    state = {k: v for k, v in obj.__dict__.items() if k not in attrs}
    state["_modules"] = type(state["_modules"])((k, v) for k, v in state["_modules"].items() if k not in modules)
    plain.__dict__.update(state)
    return plain


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on a low-precision or quantized base, in the base dtype otherwise."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraLayer:
    """Mixin holding the adapters of one layer; concrete classes pair it with a base ``nn.Module``.

    Subclasses implement ``_make_adapter`` (create A and B), ``_reset_adapter`` (initialise),
    ``_lora_term`` (the update for an input) and ``delta_weight`` (``s · B A`` in the base's layout).
    """

    base_class: ClassVar[type[nn.Module]]
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    active_adapters: list[str]
    merged_adapters: list[str]
    adapters_disabled: bool

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: nn.Module) -> LoraLayer:
        """A LoRA layer that owns ``base``'s parameters, buffers and hooks (no copies)."""
        layer = adopt(cls, base)
        keep_4bit_layout(layer)
        layer._init_lora_state()
        return layer

    def _init_lora_state(self) -> None:
        """No adapters yet: empty dropout and factor containers, rank/alpha/scale tables and lists."""
        nn.Module.__setattr__(self, "lora_dropout", nn.ModuleDict())
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.active_adapters, self.merged_adapters = [], []
        self.adapters_disabled = False
        self._init_adapter_containers()

    def _init_adapter_containers(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def to_base(self) -> nn.Module:
        """A plain ``base_class`` object with this layer's base parameters (adapters dropped)."""
        return release(self, self.base_class, _LORA_MODULES, _LORA_ATTRS)  # type: ignore[arg-type]

    def update_layer(
        self, name: str, r: int, alpha: float, scaling: float, dropout: float, init: bool | str,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) adapter ``name`` of rank ``r``, on the base weight's device; with
        ``use_dora``, a DoRA adapter (linear layers and convolutions)."""
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.__dict__.get("dora_norm_cache", {}).pop(name, None)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._make_adapter(name, r)
        structured = inits.is_structured(init) and self._structured_init(name, init)
        if not structured and init is not False:
            self._reset_adapter(name, init)
        weight = self.base_weight
        device = weight.device if weight.device.type != "meta" else None
        for container in self._adapter_containers():
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):  # Parameter.to returns a copy: put the moved one in its place
                    container[name] = nn.Parameter(item.detach().to(device=device, dtype=_adapter_dtype(weight)))
                else:
                    item.to(device=device, dtype=_adapter_dtype(weight))
        if use_dora:
            self._make_magnitude(name)

    def is_dora(self, name: str) -> bool:
        """Whether adapter ``name`` of this layer is a DoRA adapter."""
        magnitudes = self._modules.get("lora_magnitude_vector")
        return magnitudes is not None and name in magnitudes

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``; a PiSSA/OLoRA one first gives the base back what it took
        (W = W_res + s·B₀A₀, up to the base dtype's rounding)."""
        initial = self.__dict__.get("init_factors", {}).pop(name, None)
        if initial is not None:
            self._set_rows(self._out_rows(self.base_weight).to(initial[0].dtype)
                           + self.scaling[name] * (initial[1] @ initial[0]))
        for container in (*self._adapter_containers(), self.lora_dropout):
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.__dict__.get("dora_norm_cache", {})):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _adapter_containers(self) -> tuple[nn.Module, ...]:
        magnitudes = self._modules.get("lora_magnitude_vector")  # DoRA's
        return (self.lora_A, self.lora_B) if magnitudes is None else (self.lora_A, self.lora_B, magnitudes)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.weight  # type: ignore[attr-defined]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for c in self._adapter_containers() if name in c for p in _params(c[name])]

    # -- kind-specific pieces ----------------------------------------------------------------------

    def _make_adapter(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _structured_init(self, name: str, init: str) -> bool:
        """Initialise A and B by ``lorakit.inits`` (PiSSA, OLoRA, orthogonal) and return True, or return
        False where this layer kind has no such initialisation (PEFT's default init then applies)."""
        return False

    def _set_rows(self, rows: torch.Tensor) -> None:
        """Replace the base weight by ``rows`` (out, rest) in its own dtype and layout (new storage:
        the old one may be a read-only view of a memory-mapped checkpoint)."""
        raise NotImplementedError

    def _reset_adapter(self, name: str, init: bool | str) -> None:
        """PEFT's initialisation: A kaiming-uniform (or N(0, 1/r²) for 'gaussian'), B zero."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B(A(dropout(x))), the adapter's term for input ``x``."""
        return self._update(name, self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype)))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` shaped like the base weight, in the adapter's dtype."""
        raise NotImplementedError

    def _rows_term(self, x: torch.Tensor, rows: list[str | None], result: torch.Tensor) -> torch.Tensor:
        """The update for a batch whose row b uses adapter ``rows[b]`` (None: none), grouping rows by
        adapter (``result``: the base output); linear layers override this with a gathered kernel."""
        out = None
        for name in {r for r in rows if r is not None and r in self.r}:
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            term = self._adapter_term(name, x.index_select(0, idx), result.index_select(0, idx))
            out = torch.zeros(x.shape[0], *term.shape[1:], dtype=term.dtype, device=x.device) if out is None else out
            out.index_add_(0, idx, term)
        return out if out is not None else torch.zeros((), dtype=x.dtype, device=x.device)

    def _rows_add_(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """A mixed batch's updates added into ``result`` in place by a fused kernel, or None where
        none applies (then ``_rows_term`` runs)."""
        return None

    # -- DoRA (lorakit.dora): linear layers and convolutions ------------------------------------------
    # A layer kind states its layout: ``_out_rows`` (a weight as (out, rest) rows), ``_update``
    # (s · B(A(x)) without dropout), ``_base_product`` (x through W given as rows, no bias) and
    # ``_channels`` (an (out,) vector shaped to scale its outputs); the rest is common.

    def _out_rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # (dora_refusal names the layer kinds without a layout)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _base_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        """An (out,) vector shaped to scale this layer's outputs (…, out)."""
        return v

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight W as it computes, as (out, rest) rows in ``dtype`` (a 4-bit one dequantized)."""
        return self._out_rows(float_weight(self.weight, dtype)).to(dtype)  # type: ignore[attr-defined]

    def _factor_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r, rest) and B as (out, r) rows: B A = the delta's rows / s."""
        return self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)

    def magnitude(self, name: str) -> torch.Tensor:
        """DoRA's m as an (out,) vector (stored in PEFT's shape: (out,), or (1, out, 1…) for a convolution)."""
        return self.lora_magnitude_vector[name].reshape(-1)

    def _make_magnitude(self, name: str) -> None:
        """m = ‖W + s B A‖_row (out,): the adapted weight starts as the base's (W' = W for B = 0)."""
        reason = dora_refusal(self)
        if reason:
            raise ValueError(f"use_dora: this {type(self).__name__} {reason}")
        if "lora_magnitude_vector" not in self._modules:
            self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_magnitude_vector[name] = nn.Parameter(self._channels(self.dora_norm(name)))

    def dora_norm(self, name: str) -> torch.Tensor:
        """n = ‖W + s B A‖_row (out,) in the adapter's dtype, without gradient. Kept until W, A, B
        or s change, so that a decode step, the micro-batches of one optimizer step and a
        checkpointed layer's recomputation read W for it once, not at every forward. A change is an
        in-place write (version counters), new storage (a move), a new dtype, or any optimizer step
        (``dora.optimizer_steps``: fused optimizers leave version counters alone). No comparison of
        values, which on a GPU would wait for the device at every layer."""
        params = (self.base_weight, self.lora_A[name].weight, self.lora_B[name].weight)  # (not views: new ids)
        key = (*((id(t), t._version, t.data_ptr(), t.dtype) for t in params), self.scaling[name],
               dora.optimizer_steps, torch.is_inference_mode_enabled())
        cache = self.__dict__.setdefault("dora_norm_cache", {})
        if name in cache and cache[name][0] == key:
            return cache[name][1]
        a, b = self._factor_rows(name)
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):  # in the adapter's precision
            weight = self.dense_weight(a.dtype)
            norm = dora.factored_norm(weight, a, b, self.scaling[name], self._weight_sq(weight, key[0]))
        cache[name] = (key, norm)
        return norm

    def _weight_sq(self, weight: torch.Tensor, key: tuple) -> torch.Tensor:
        """‖W‖²_row of the frozen base weight (``weight``: W's dense rows), kept while W is unchanged
        (``key``: W's identity, version, storage and dtype)."""
        kept = self.__dict__.get("dora_weight_sq")
        if kept is None or kept[0] != (key, weight.dtype):
            kept = ((key, weight.dtype), weight.square().sum(1))
            self.__dict__["dora_weight_sq"] = kept
        return kept[1]

    def _adapter_term(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``result``, the layer's output so far for ``x``: the LoRA
        term, or DoRA's (g − 1) ⊙ x Wᵀ + g ⊙ s x Aᵀ Bᵀ with g = m / ‖W + s B A‖_row, its x Wᵀ read
        from ``result`` less the bias (PEFT's convention: with several active adapters, the earlier
        ones' terms included); under dropout from dropout(x) Wᵀ."""
        if not self.is_dora(name):
            return self._lora_term(name, x)
        dtype = self.lora_A[name].weight.dtype
        scale = self._channels(self.magnitude(name) / self.dora_norm(name))
        x, p = x.to(dtype), self._dropout_p(name)
        if p > 0:
            x = F.dropout(x, p, training=True)
            base = self._base_product(x, self.dense_weight(dtype))
        else:
            bias = self._parameters.get("bias")  # type: ignore[attr-defined]
            base = (result if bias is None else result - self._channels(bias)).to(dtype)
        return dora.term(base, self._update(name, x), scale)

    def _unmerged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight's rows with the merged adapters taken out again, last merged first."""
        weight = self.dense_weight(dtype).clone()
        for name in reversed(self.merged_adapters):
            delta = self._out_rows(self.delta_weight(name)).to(dtype)
            weight = (dora.unmerge(weight, delta, self.magnitude(name), self.dora_norms[name])
                      if self.is_dora(name) else weight - delta)
        return weight

    def merged_weight(self, weight: torch.Tensor, name: str, unmerged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight`` (out, rest rows) with adapter ``name`` merged: W + ΔW, or for DoRA
        (m / n) ⊙ (W + ΔW) with n = ‖unmerged + ΔW‖_row of the base weight without merged
        adapters; and that n (None for LoRA)."""
        delta = self._out_rows(self.delta_weight(name)).to(weight.dtype)
        if not self.is_dora(name):
            return weight + delta, None
        norm = dora.weight_norm(unmerged, delta)
        return dora.merge(weight, delta, self.magnitude(name).to(weight.dtype), norm), norm

    def merge_preview(self, name: str) -> torch.Tensor:
        """The base weight with adapter ``name`` merged, computed out of place in fp32 (for checks)."""
        if not self.is_dora(name):
            return self.base_weight.float() + self.delta_weight(name).float()
        unmerged = self._unmerged_weight(torch.float32)
        return self.merged_weight(self.dense_weight(torch.float32), name, unmerged)[0]

    def merge_adapter(self, name: str) -> None:
        """W ← W + s · B A, or DoRA's (m / n) ⊙ (W + s · B A) (quantized layers are merged by
        ``quant.unload_quantized``)."""
        with torch.no_grad():
            if not self.is_dora(name):
                self.base_weight.add_(self.delta_weight(name).to(self.base_weight.dtype))
            else:
                dtype = self.lora_A[name].weight.dtype
                merged, norm = self.merged_weight(self.dense_weight(dtype), name, self._unmerged_weight(dtype))
                self._out_rows(self.base_weight).copy_(merged)
                self.__dict__.setdefault("dora_norms", {})[name] = norm
        self.merged_adapters.append(name)

    def unmerge_adapter(self, name: str) -> None:
        with torch.no_grad():
            if not self.is_dora(name):
                self.base_weight.sub_(self.delta_weight(name).to(self.base_weight.dtype))
            else:
                dtype = self.lora_A[name].weight.dtype
                delta = self._out_rows(self.delta_weight(name)).to(dtype)
                norm = self.__dict__["dora_norms"].pop(name)
                weight = dora.unmerge(self.dense_weight(dtype), delta, self.magnitude(name), norm)
                self._out_rows(self.base_weight).copy_(weight)
        self.merged_adapters.remove(name)

    # -- forward -----------------------------------------------------------------------------------

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen base layer's output for ``x``."""
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = self.__dict__.get("row_adapters")
        if rows is not None and x.dim() == 2 and x.shape[0] != len(rows):
            tokens = self.__dict__.get("row_width", {}).get("tokens", 0)
            if x.shape[0] == len(rows) * tokens:  # the batch flattened to (B·T, in) tokens, row after row
                return self.forward(x.view(len(rows), tokens, -1), *args, **kwargs).flatten(0, 1)
        result = self._base_forward(x, *args, **kwargs)
        if self.adapters_disabled:
            return result
        if rows is not None:  # a mixed batch: each row has its own adapter (see lorakit.batch)
            if len(rows) != x.shape[0]:
                raise ValueError(f"adapter_batch got {len(rows)} adapter ids for a batch of {x.shape[0]} rows")
            added = self._rows_add_(result, x)
            return added if added is not None else _add(result, self._rows_term(x, rows, result))
        if "router_adapters" in self.__dict__:  # a learned router weighs the adapters per token
            return result + self._routed_term(x).to(result.dtype)
        for name in self.active_adapters:
            if name in self.r and name not in self.merged_adapters:
                result = _add(result, self._adapter_term(name, x, result))
        return result

    def _routed_term(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_a softmax(G x)_a · (term of adapter a) over the routed adapters (see ``lorakit.router``)."""
        names = self.__dict__["router_adapters"]
        gate = self._modules["lora_router"]
        weights = torch.softmax(gate(x.to(gate.weight.dtype)), dim=-1)  # (..., n)
        out = None
        for i, name in enumerate(names):
            if name in self.r and name not in self.merged_adapters:
                term = weights[..., i:i + 1] * self._lora_term(name, x)
                out = term if out is None else out + term
        return out if out is not None else torch.zeros((), dtype=x.dtype, device=x.device)


def gemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A linear layer's x Wᵀ + b (W (out, in): ``nn.Linear``'s, or a bitsandbytes 4-bit one)
    through ``gemm.linear``, on a CPU where oneDNN is the faster fp32 GEMM and autocast is off: a
    W of x's dtype, or a 4-bit W whose layer computes in x's dtype (``compute_dtype``;
    ``dequant.runs_dequantized``), its products on oneDNN inside ``onednn_scope()``. None where
    neither applies: the layer's own forward then runs."""
    if autocast_dtype(x) is not None or not uses_onednn(x.device, x.dtype):
        return None
    if weight.dtype == x.dtype or runs_dequantized(weight, bias, compute_dtype, x.dtype):
        return linear(x, weight, bias)
    return None


def init_refusal(module: nn.Module, init: bool | str, adapter_name: str | None = None) -> str | None:
    """Why ``init`` cannot initialise an adapter on ``module`` (None where it can): PiSSA and OLoRA
    rewrite the base weight, so need it loaded and in floating point, and alone on the layer (any
    other adapter's update is relative to the weight they would change)."""
    others = [n for n in getattr(module, "r", {}) if n != adapter_name]
    mutated = [n for n in getattr(module, "init_factors", {}) if n != adapter_name]
    if mutated:
        return (f"carries adapter {mutated[0]!r}, whose PiSSA/OLoRA initialisation rewrote the base "
                f"weight another adapter would add to; delete it first, or save it (converted to a plain "
                f"LoRA by default) and load that beside others")
    if not inits.mutates_base(init):
        return None
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return "has no loaded weight (built on the meta device) to decompose"
    if not weight.is_floating_point() or is_4bit(weight):
        return ("has a quantized base weight; PiSSA/OLoRA decompose a float one: initialise on the float "
                "model (quantizing the residual is not supported here) or use init_lora_weights=true")
    if others:
        return (f"already carries adapter(s) {others}, and {init} rewrites the base weight they add to; "
                f"load or train it on its own (or save the PiSSA/OLoRA adapter converted and load that)")
    return None


def keep_4bit_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer's weights in the one layout that training, merging and
    saving read (a no-op for other modules). On CPUs with AVX512-BF16, bitsandbytes otherwise
    repacks them, at the first forward in eval mode without gradients, into a layout for its bf16
    inference kernel: evaluation would then compute differently from training, the repacking fails
    outright for layers whose sizes do not fit its blocks, and the layout stays changed afterwards.
    Called for every layer LoRA wraps and by ``quant.quantize_model`` for the ones it does not."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``x`` in, or None outside autocast. Fused nodes
    cast their operands to it and run with autocast off: the same products (operands rounded to
    that dtype, results in it) as the unfused ops would get from autocast one by one."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _add(result: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``result + term`` in result's dtype. With gradients off (inference) the sum is formed in
    the term's precision (fp32 adapters on a bf16 base: fp32) and rounded once, in place in the
    base layer's fresh output, as PEFT's sum is; with gradients on, out of place (term rounded first)."""
    return result.add_(term) if not torch.is_grad_enabled() else result + term.to(result.dtype)


def _params(module: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [module] if isinstance(module, nn.Parameter) else list(module.parameters())


class _LinearLora(LoraLayer):
    """LoRA for layers computing ``x @ W.T`` (``nn.Linear``) or ``x @ W`` (GPT-2 ``Conv1D``)."""

    in_features: int
    out_features: int

    def _fused_adapter(self, x: torch.Tensor, cast: torch.dtype | None) -> str | None:
        """The one adapter when the fused kernel applies, else None: a plain ``nn.Linear`` /
        ``Conv1D`` base or a 4-bit one the node can dequantize (``_fused_4bit``), exactly one
        unmerged active adapter (or a mixed batch in which every row uses the same adapter, which
        this layer has), and either one dtype throughout or autocast (``cast``, from
        ``autocast_dtype(x)``; the caller applies it itself)."""
        if not FUSED_LINEAR or self.adapters_disabled or "router_adapters" in self.__dict__:
            return None
        four_bit = False
        if self.base_class not in (nn.Linear, Conv1D):
            four_bit = self._fused_4bit(x, cast)
            if not four_bit:
                return None
        if "row_adapters" in self.__dict__:
            plan: rows.RowPlan = self.__dict__["row_index"]
            if len(plan.present) != 1 or plan.bare is not None or len(plan.row_slots) != x.shape[0]:
                return None
            live = [plan.order[plan.present[0] - 1]]
            if live[0] not in self.r:
                return None
        else:
            live = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if len(live) != 1 or not x.is_floating_point():
            return None
        if cast is not None:
            return live[0]
        dtype = x.dtype if four_bit else self.weight.dtype  # type: ignore[attr-defined]
        return live[0] if x.dtype == dtype == self.lora_A[live[0]].weight.dtype else None

    def _fused_4bit(self, x: torch.Tensor, cast: torch.dtype | None) -> bool:
        """A bitsandbytes 4-bit base computing in x's dtype, on a CPU where oneDNN is the faster fp32
        GEMM: the fused node dequantizes it itself (``kernels.dequant``; no autocast)."""
        return (cast is None and uses_onednn(x.device, x.dtype)
                and runs_dequantized(self.weight, self.bias, getattr(self, "compute_dtype", None), x.dtype))  # type: ignore[attr-defined]

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x Wᵀ + b, through ``gemm_linear`` where it applies (the base of a mixed-adapter batch,
        of a routed or multi-adapter forward)."""
        weight = self.weight  # type: ignore[attr-defined]
        out = None
        if not args and not kwargs and (self.base_class is nn.Linear or is_4bit(weight)):
            out = gemm_linear(x, weight, self.bias, getattr(self, "compute_dtype", None))  # type: ignore[attr-defined]
        return out if out is not None else LoraLayer._base_forward(self, x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cast = autocast_dtype(x)
        name = None if args or kwargs else self._fused_adapter(x, cast)
        if name is None:
            return LoraLayer.forward(self, x, *args, **kwargs)
        weight = self.weight if issubclass(self.base_class, nn.Linear) else self.weight.T  # type: ignore[attr-defined]
        mixed = "row_adapters" in self.__dict__  # mixed batches apply no dropout
        p = 0.0 if mixed else self._dropout_p(name)
        dora_args = ()
        if self.is_dora(name):
            if p > 0:  # DoRA's dropout convention (lorakit.dora) has no fused node: the plain composition
                return LoraLayer.forward(self, x, *args, **kwargs)
            dora_args = (self.lora_magnitude_vector[name], self.dora_norm(name))
        tensors = (x, weight, self.bias, self.lora_A[name].weight, self.lora_B[name].weight)  # type: ignore[attr-defined]
        if cast is None:
            return _fused(*tensors, self.scaling[name], p, dora_args)
        # what autocast does to each matmul, done once up front: every operand in its dtype (the
        # frozen weight's copy made once per run inside ``cached_casts``; DoRA's m and n stay wide)
        weight = cast_frozen(self.weight, cast)  # type: ignore[attr-defined]
        weight = weight if self.base_class is nn.Linear else weight.T
        x, bias, a, b = (t.to(cast) if t is not None else None for t in (x, *tensors[2:]))
        with torch.autocast(x.device.type, enabled=False):
            return _fused(x, weight, bias, a, b, self.scaling[name], p, dora_args)

    def _make_adapter(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def _structured_init(self, name: str, init: str) -> bool:
        weight = self.weight  # type: ignore[attr-defined]
        reason = init_refusal(self, init, name)
        if reason:
            raise ValueError(f"init_lora_weights={init!r}: this {type(self).__name__} {reason}")
        dtype = _adapter_dtype(weight)
        with torch.no_grad():
            w = self._out_rows(weight).to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
            a, b = inits.factors(init, w, self.r[name], self.scaling[name])
            self.lora_A[name].weight = nn.Parameter(a.to(dtype))
            self.lora_B[name].weight = nn.Parameter(b.to(dtype))
            if inits.mutates_base(init):
                a, b = self.lora_A[name].weight.to(w.dtype), self.lora_B[name].weight.to(w.dtype)
                self._set_rows(w - self.scaling[name] * (b @ a))
                self.__dict__.setdefault("init_factors", {})[name] = (self.lora_A[name].weight.detach().clone(),
                                                                      self.lora_B[name].weight.detach().clone())
        return True

    def _set_rows(self, rows: torch.Tensor) -> None:
        weight = self.weight  # type: ignore[attr-defined]
        old, rows = weight.data, rows.to(weight.dtype)
        weight.data = (rows if issubclass(self.base_class, nn.Linear) else rows.T).contiguous()
        page_out(old)  # a memory-mapped checkpoint's pages read for the decomposition: no longer needed

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return lora_linear(x.to(a.dtype), a, b, self.scaling[name], self._dropout_p(name))

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (out, in)

    # -- DoRA's layout (LoraLayer holds the rest) ----------------------------------------------------

    def _out_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in this layer's storage layout, viewed as (out, in)."""
        return weight if issubclass(self.base_class, nn.Linear) else weight.T

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return lora_linear(x, a, b, self.scaling[name], 0.0)

    def _base_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    # -- mixed batches (lorakit.rows) ----------------------------------------------------------------

    def stacked(self, order: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's adapters in the model-wide slot ``order`` (see ``rows.stacked``)."""
        return rows.stacked(self, order)

    def group_stacks(self, plan: rows.RowPlan, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks of the slots ``plan`` runs over (see ``rows.group_stacks``)."""
        return rows.group_stacks(self, plan, a, b)

    def _rows_add_(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self._has_dora(self.__dict__["row_adapters"]):
            return None
        return rows.linear_rows_add_(self, result, x)

    def _rows_term(self, x: torch.Tensor, names: list[str | None], result: torch.Tensor) -> torch.Tensor:
        if self._has_dora(names):  # DoRA rows read the base output: each adapter's rows on their own
            return LoraLayer._rows_term(self, x, names, result)
        return rows.linear_rows_term(self, x)

    def _has_dora(self, names: list[str | None]) -> bool:
        return "lora_magnitude_vector" in self._modules and any(self.is_dora(n) for n in set(names) if n)


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
           scale: float, p: float, dora_args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The fused LoRA-linear node, or with DoRA's (magnitude, norm) the fused DoRA node (no dropout)."""
    if dora_args:
        return fused_dora_linear(x, weight, bias, a, b, scale, *dora_args)
    return fused_lora_linear(x, weight, bias, a, b, scale, p)


class LoraLinear(_LinearLora, nn.Linear):
    """LoRA on ``nn.Linear``: weight (out, in), y = x Wᵀ + b + s · x Aᵀ Bᵀ."""

    base_class = nn.Linear


class LoraConv1D(_LinearLora, Conv1D):
    """LoRA on GPT-2's ``Conv1D`` (fan_in_fan_out): weight stored (in, out), y = x W + b + s · x Aᵀ Bᵀ."""

    base_class = Conv1D

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.weight.shape[1]

    def delta_weight(self, name: str) -> torch.Tensor:
        return super().delta_weight(name).T  # (in, out)


class LoraEmbedding(LoraLayer, nn.Embedding):
    """LoRA on ``nn.Embedding`` (num, dim): y = E[x] + s · (Aᵀ[x]) Bᵀ with A (r, num), B (dim, r).

    As in PEFT the factors are bare parameters (``lora_embedding_A``/``_B``), A starts at zero and
    B is N(0, 1), and no dropout is applied.
    """

    base_class = nn.Embedding

    def _init_adapter_containers(self) -> None:
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _adapter_containers(self) -> tuple[nn.Module, ...]:
        return (self.lora_embedding_A, self.lora_embedding_B)

    def _make_adapter(self, name: str, r: int) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.num_embeddings))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.embedding_dim, r))

    def _reset_adapter(self, name: str, init: bool | str) -> None:
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_a = F.embedding(x, a.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)  # (..., r)
        return (after_a @ b.T) * self.scaling[name]  # (..., dim)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]  # (num, dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LoraLayer.forward(self, x, *args, **kwargs)


class _ConvLora(LoraLayer):
    """LoRA on a convolution: A is a conv with the base's kernel, stride, padding and dilation
    (in → r channels), B a 1×…×1 conv (r → out); the merged delta kernel is
    ΔW[o, i, k…] = s · Σ_r B[o, r] A[r, i, k…]."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    groups: int

    def _make_adapter(self, name: str, r: int) -> None:
        if self.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={self.groups}) is not supported")
        conv = self.base_class
        self.lora_A[name] = conv(self.in_channels, r, self.kernel_size, self.stride, self.padding,  # type: ignore[call-arg]
                                 self.dilation, bias=False, padding_mode=self.padding_mode)
        ones = (1,) * len(self.kernel_size)
        self.lora_B[name] = conv(r, self.out_channels, ones, ones, bias=False)  # type: ignore[call-arg]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, k…), (out, r, 1…)
        return torch.einsum("or,r...->o...", b.flatten(1), a) * self.scaling[name]

    # DoRA's layout: a kernel's rows are its output channels, each (in · k…) long

    def _out_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def _base_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight.view_as(self.weight), None)  # type: ignore[attr-defined]

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *(1,) * len(self.kernel_size))


class LoraConv1d(_ConvLora, nn.Conv1d):
    base_class = nn.Conv1d


class LoraConv2d(_ConvLora, nn.Conv2d):
    base_class = nn.Conv2d


class LoraConv3d(_ConvLora, nn.Conv3d):
    base_class = nn.Conv3d


# Base class → LoRA class. Exact types first; `lora_class_for` derives classes for subclasses of
# nn.Linear (e.g. bitsandbytes' Linear4bit) on the fly.
LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    Conv1D: LoraConv1D,
    nn.Embedding: LoraEmbedding,
    nn.Conv1d: LoraConv1d,
    nn.Conv2d: LoraConv2d,
    nn.Conv3d: LoraConv3d,
}
SUPPORTED_TYPES = tuple(LORA_CLASSES)


def lora_class_for(base_cls: type[nn.Module]) -> type[LoraLayer] | None:
    """The LoRA class for ``base_cls``, or None when LoRA cannot wrap it."""
    if base_cls in LORA_CLASSES:
        return LORA_CLASSES[base_cls]
    if issubclass(base_cls, nn.Linear):
        cls = type(f"Lora{base_cls.__name__}", (LoraLinear, base_cls), {"base_class": base_cls})
        LORA_CLASSES[base_cls] = cls
        return cls
    return None


def computes_linear(module: nn.Module) -> bool:
    """Whether an ``nn.Linear`` (or subclass) computes x Wᵀ + b, the map a LoRA layer adds its
    update to: nn.Linear's own forward, a bitsandbytes quantized layer (its forward dequantizes
    W), or a subclass whose forward gives ``F.linear`` on a 2-row probe input (Falcon's); not a
    subclass whose forward computes more, such as a router returning top-k scores (Llama 4,
    PhiMoE) or a grouped product (DeepSeek-V4). The probe draws from its own generator."""
    if isinstance(module, LoraLayer) or type(module).forward is nn.Linear.forward:
        return True
    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        return True
    if weight.is_meta:
        return False
    x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = module(x)
            ref = F.linear(x, weight, module.bias)
    except Exception:  # a forward that cannot take a plain (2, in) input is not a plain linear map
        return False
    return (isinstance(out, torch.Tensor) and out.shape == ref.shape
            and torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max().clamp_min(1e-6))))


def dora_refusal(module: nn.Module) -> str | None:
    """Why a DoRA adapter cannot go on ``module`` (a layer LoRA wraps, or its LoRA layer), as the
    rest of a sentence naming the module, or None: DoRA has a layout for linear layers and
    convolutions only, not on an 8-bit base, and its magnitudes need the base weights."""
    cls = type(module) if isinstance(module, LoraLayer) else lora_class_for(type(module))
    if cls is None or cls._out_rows is LoraLayer._out_rows:
        return (f"is a {type(module).__name__}, and DoRA is implemented for linear layers and convolutions only; "
                f"leave it out of target_modules (or exclude_modules) or set use_dora false")
    weight = module.weight
    if type(weight).__name__ == "Int8Params":
        return "is 8-bit quantized, and DoRA is not supported on an 8-bit base; quantize to 4-bit (NF4) or set use_dora false"
    if weight.is_meta:
        return ("has its weights on the meta device; load the weights before adding the adapter (DoRA's "
                "magnitudes start at the base weights' row norms)")
    return None


def find_modules(model: nn.Module, cls: type | tuple[type, ...]) -> list[tuple[str, Any]]:
    """(name, module) for every module of type ``cls`` in ``model``, in ``named_modules`` order,
    without walking into the matches or into LoRA layers. A LoRA layer holds only its adapters, an
    ``nn.Linear`` pair each, so with many adapters the full walk is dominated by modules that can
    hold nothing (16 adapters on the 135 M model: 52 ms a walk, which ``adapter_batch`` pays per
    decode step in the server)."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, cls):
            found.append((name, module))
            continue
        if isinstance(module, LoraLayer):
            continue
        children = [(f"{name}.{k}" if name else k, m) for k, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))
    return found


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in ``model``."""
    return find_modules(model, LoraLayer)
