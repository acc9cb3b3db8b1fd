"""The training loop behind ``lorakit train``.

YAML + overrides → ``RunConfig`` → ``load_model`` → LoRA (or full fine-tuning) → examples → batches
→ for each optimizer step: forward with the loss only at supervised positions, backward into the
trainable parameters, clip, AdamW, schedule → metrics, eval, atomic checkpoints → the adapter in
PEFT format, ``metrics.jsonl``, ``loss.png`` and a model card in ``output_dir``.

Loss normalisation: each optimizer step minimises the mean cross-entropy over *all* supervised
tokens of its micro-batches (sum of token losses / token count), so gradient accumulation and
packing change nothing but speed.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.attention import padding_free as padding_free_attention
from lorakit.attention import padding_free_obstacle, supports_padding_free
from lorakit.checkpoint import (
    TrainState,
    complete_checkpoints,
    load_checkpoint,
    load_trainable,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    save_trainable,
)
from lorakit.collate import batches, collate, collate_flat, pack
from lorakit.data import Example, load_examples, split_eval
from lorakit.distributed import (
    World,
    detach_to_meta,
    full_optimizer_state,
    gathered,
    load_shards,
    no_sync,
    process_group,
    reshard_optimizer_state,
    shard_like,
    world_from_env,
    wrap,
)
from lorakit.errors import LorakitError
from lorakit.evaluate import eval_loss, exact_match
from lorakit.inits import mutates_base
from lorakit.inject import count_parameters, get_lora_model
from lorakit.io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from lorakit.kernels.cast import cached_casts
from lorakit.kernels.gemm import TOKEN_MULTIPLE, cpu_flags, onednn_scope, uses_onednn
from lorakit.loss import causal_lm_loss
from lorakit.memory import HeapGuard, keep_freed_memory, peak_memory_bytes, stop_keeping_freed_memory
from lorakit.merge import merge_and_unload
from lorakit.mlp import fused_mlp
from lorakit.models import empty_model, enable_checkpointing, load_model, sequence_mixers
from lorakit.neftune import NoisyEmbeddings, noisy_embeddings
from lorakit.norm import fused_norms
from lorakit.optim import build_optimizer, loraplus_scales, lr_lambda
from lorakit.plain import plain_linears
from lorakit.preference import (
    REFERENCE_FILE,
    PreferencePair,
    Totals,
    answer_lengths,
    desirable,
    dpo_loss,
    kto_logprobs,
    kto_loss,
    load_pairs,
    load_reference,
    orpo_loss,
    policy_logprobs,
    save_reference,
    scored_logprobs,
    simpo_loss,
    split_pairs,
    totals_for,
)
from lorakit.report import MetricsLog, plot_loss, write_model_card
from lorakit.train_config import ConfigError, RunConfig, build_config, dump_config, load_config


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss or gradient); the message names the step."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    elapsed_s: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    interrupted: bool = False
    train_s: float = 0.0  # seconds in the training loop (this process), without loading and final eval
    resumed_from: int = 0  # the step this process started at (0: a fresh run)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


CPUINFO = "/proc/cpuinfo"


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag): there
    bf16 matmuls run ~2× fp32's on oneDNN (AMD EPYC with AVX512-BF16, 2 cores: 810-936 vs 411-499
    GFLOP/s; ~4× the 193-240 of oneMKL's fp32) and the demo trains ~1.4× faster under
    ``train.bf16: true``; elsewhere bf16 matmuls are slower than fp32."""
    flags = cpu_flags(CPUINFO)[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """``train.bf16``: auto = on a GPU only. On a CPU with native bf16 it is opt-in (CPUs without it
    multiply bf16 slowly). With native bf16 it trains the demo 1.44× faster than fp32 with its
    products on oneDNN (70 s against 101 s; 2.45× against fp32 on oneMKL) at about fp32's peak
    memory (the fp32 weights are paged out once their copies are made). Its eval loss was fp32's
    within seed noise: 0.0404 against 0.0411, the mean over three seeds, with the logits kept in
    fp32 (``kernels.cross_entropy``)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16; got {name!r}")
    return table[name]


def _load_adapter_weights(model: nn.Module, directory: Path) -> None:
    _, tensors = read_adapter(directory)
    params, _ = adapter_state_dict(model)
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(shard_like(tensors[key], p))


class Trainer:
    """One run: holds the model, data, optimizer and state; ``run()`` trains to the end."""

    def __init__(self, config: RunConfig, progress: bool = True, log: Callable[[str], None] = print,
                 world: World | None = None) -> None:
        self.world = world or World()
        self.config, self.progress = config, progress and self.world.main
        self.log = log if self.world.main else (lambda _: None)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.device = resolve_device(config.model.device)
        if self.device.type == "cuda" and self.world.active:
            self.device = torch.device("cuda", self.world.local_rank)
        dtype = resolve_dtype(config.model.dtype, self.device)
        # FSDP: build the base on the meta device; each rank later reads only its shards (load_shards).
        # Not for DoRA, whose magnitudes start at the base weights' row norms, nor PiSSA/OLoRA, which
        # decompose the base weights: both need them at injection.
        self.lora = config.lora_config() if config.method == "lora" else None
        needs_base = self.lora is not None and (self.lora.use_dora or mutates_base(self.lora.init_lora_weights))
        needs_base |= config.method == "full" and config.model.adapter is not None  # merged into the weights
        empty = (empty_model(config.model.name, dtype=dtype) if self.world.mode == "fsdp"
                 and config.method in ("lora", "full") and not config.model.quantize and not needs_base else None)
        if empty is not None:
            self.model, self.tokenizer, weight_files = empty
        else:
            self.model, self.tokenizer = load_model(config.model.name, dtype=dtype, device=self.device)
        if config.model.quantize:
            from lorakit.quant import quantize_model

            compute = dtype if config.model.compute_dtype == "auto" else resolve_dtype(config.model.compute_dtype,
                                                                                       self.device)
            quantize_model(self.model, config.model.quantize, double_quant=config.model.double_quant,
                           compute_dtype=compute, blocksize=config.model.blocksize)
        from lorakit.quant import weight_memory_bytes

        self.base_weight_bytes = weight_memory_bytes(self.model)
        self.bf16 = resolve_bf16(config.train.bf16, self.device)
        # oneDNN (CPU bf16 matmuls, and fp32 ones where kernels.gemm routes them there) keeps memory
        # per shape: bound the token counts it sees (≤ 31 idle tokens a batch; batch 8 of the demo
        # data: 2.8% a step for 32, 7.7% for 64, both level off)
        onednn = self.bf16 or uses_onednn(self.device, dtype)  # a 4-bit base's products too (kernels.dequant)
        self.flat_multiple = TOKEN_MULTIPLE if onednn and self.device.type == "cpu" else 1
        device_type = self.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if self.bf16 else None
        self.pairs = config.objective != "sft"  # dpo / orpo / simpo: preference pairs; kto: judged answers
        self.reference: dict[str, torch.Tensor] = {}  # DPO / KTO: the reference log-probabilities (P, 2) per split
        self._load_data()
        if self.lora is not None and config.model.adapter:  # train a saved adapter further
            load_adapter(self.model, config.model.adapter, is_trainable=True, config=self.lora)
        elif self.lora is not None:
            get_lora_model(self.model, self.lora)
        elif config.method == "router":  # frozen adapters, trainable gates
            from lorakit.router import add_router

            for name, path in config.router.adapters.items():
                load_adapter(self.model, path, adapter_name=name, activate=False)
            add_router(self.model, list(config.router.adapters))
        else:
            if config.model.adapter:  # full fine-tuning from base + adapter, merged
                load_adapter(self.model, config.model.adapter)
                self.model = merge_and_unload(self.model)
            for p in self.model.parameters():
                p.requires_grad_(True)
        if config.train.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.config.use_cache = False
        self.padding_free = self._padding_free(config.data.padding_free)
        self.trainable, self.total = count_parameters(self.model)
        initial = detach_to_meta(self.model) if empty is not None else {}  # the fresh adapter's values
        self.wrapped = wrap(self.model, self.world)  # DDP / FSDP2 when distributed, else the model itself
        if empty is not None:
            read, total = load_shards(self.model, weight_files, self.device, initial)
            self.log(f"fsdp: base built on the meta device; each rank read its shards only "
                     f"({read / 2**20:.1f} of {total / 2**20:.1f} MiB on rank 0)")
        self.params = [(n, p) for n, p in self.wrapped.named_parameters() if p.requires_grad]
        t = config.train
        scales = (loraplus_scales(self.model, t.loraplus_lr_ratio, t.lr, t.loraplus_lr_embedding)
                  if t.loraplus_lr_ratio else None)
        self.optimizer = build_optimizer(self.params, t, scales)
        self.rows_per_batch = t.batch_size * self.world.size  # a step's micro-batch across all ranks
        self.steps_per_epoch = math.ceil(math.ceil(len(self.rows) / self.rows_per_batch) / t.grad_accum)
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        warmup = t.warmup_steps if t.warmup_steps > 0 else round(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t.schedule, warmup, self.total_steps))
        self.state = TrainState(fingerprint=config.fingerprint(), world_size=self.world.size)
        self.heap: HeapGuard | None = None  # set by run() where the allocator keeps freed memory
        self.noise: NoisyEmbeddings | None = None  # NEFTune's hook while run() trains
        self.step_metrics: dict[str, float] = {}  # a DPO step's rewards and log-probabilities, for the log

    # -- set-up ------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        d = self.config.data
        self.opts = self.config.data_options()
        objective = self.config.objective
        load, split = (partial(load_pairs, objective=objective), split_pairs) if self.pairs else (load_examples,
                                                                                                   split_eval)
        self.train_examples = load(d.train, self.tokenizer, self.opts)
        stats = dict(self.opts.stats)
        if d.eval:
            self.eval_examples = load(d.eval, self.tokenizer, self.opts)
        elif d.eval_fraction > 0:
            self.train_examples, self.eval_examples = split(self.train_examples, d.eval_fraction, self.config.seed)
        else:
            self.eval_examples = []
        if stats["truncated"] or stats["dropped"]:
            verb = "truncated" if d.overlong == "truncate" else "dropped"
            what = "pairs with a side" if self.pairs else "examples"
            self.log(f"data: {stats['truncated'] + stats['dropped']} training {what} over max_seq_len="
                     f"{d.max_seq_len} or with nothing to train were {verb}")
        if self.pairs:
            self.rows = self.train_examples  # a pair is a row: its two sides always share a micro-batch
            return
        mixers = sequence_mixers(self.model) if d.packing else []
        if mixers:
            raise ConfigError(f"data.packing: {type(self.model).__name__} mixes tokens outside attention "
                              f"({mixers[0]}), which the packed rows' attention mask cannot stop, so packed "
                              f"examples would see each other; set data.packing=false")
        self.rows = pack(self.train_examples, d.max_seq_len) if d.packing else [[e] for e in self.train_examples]

    def _padding_free(self, setting: bool | str) -> bool:
        obstacle = padding_free_obstacle(self.model)
        if setting is True and obstacle is not None:
            raise ConfigError(f"data.padding_free: {type(self.model).__name__} {obstacle}; set data.padding_free=auto")
        return obstacle is None if setting == "auto" else bool(setting)

    def _resume(self) -> bool:
        mode = self.config.train.resume
        ckpt_dir = self.out / "checkpoints"
        if mode == "never":
            return False
        path = Path(mode) if mode != "auto" else (complete_checkpoints(ckpt_dir) or [None])[-1]
        if path is None:
            return False
        if not path.exists():
            raise ConfigError(f"train.resume: checkpoint {path} does not exist")
        from lorakit.router import load_router_weights

        loader = {"lora": _load_adapter_weights, "router": load_router_weights}.get(self.config.method,
                                                                                 load_trainable)
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, loader, self.world.rank)
        reshard_optimizer_state(self.optimizer)
        if state.fingerprint != self.state.fingerprint:
            raise ConfigError(
                f"{path} was written by a run with a different config; resume with the same config, or use a new "
                f"output_dir (or train.resume=never to start over)"
            )
        if state.world_size != self.world.size:
            raise ConfigError(f"{path} was written by a run on {state.world_size} process(es), this one has "
                              f"{self.world.size}; resume with the same number of processes (the data order and "
                              f"global batch depend on it), or use a new output_dir")
        self.state = state
        # the next step's lr from this run's schedule, as LambdaLR forms it: the same value for a plain resume;
        # a finished run extended (more epochs or max_steps) continues on its new schedule, not at the old end's lr
        # (the optimizer's groups carry the lr each step uses; the loop logs it from there)
        sched = self.scheduler
        for group, base, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * f(sched.last_epoch)
        self.log(f"resumed from {path} (step {state.step}, epoch {state.epoch})")
        return True

    # -- the loop ----------------------------------------------------------------------------------

    def fast_paths(self) -> contextlib.AbstractContextManager[nn.Module]:
        return fast_paths(self.model, padding_free=self.padding_free, bf16=self.bf16, device=self.device)

    def collate(self, rows: Sequence[Sequence[Example]]) -> dict[str, Any]:
        """Rows → a batch on the device: padding-free or right-padded, as this run trains."""
        pad = self.tokenizer.pad_token_id
        raw = collate_flat(rows, multiple=self.flat_multiple, pad_id=pad) if self.padding_free \
            else collate(rows, pad, multiple=self.flat_multiple)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
        if self.noise is not None:
            self.noise.lengths = batch["example_lengths"]
        return batch

    def step(self, group: Sequence[Sequence[Sequence[Example]]]) -> tuple[float, float, int]:
        """One optimizer step over micro-batches ``group`` (each the global micro-batch of all ranks;
        this rank takes rows rank, rank+W, …): returns (mean loss, grad norm, tokens)."""
        world = self.world
        tokens = sum(e.n_supervised for mb in group for row in mb for e in row)  # a pair's row: its two answers
        # the loss is a mean over the step's supervised tokens (SFT) or pairs (DPO / ORPO)
        count = sum(len(mb) for mb in group) if self.pairs else tokens
        totals = totals_for(self.config.objective) if self.pairs else None
        loss_total = 0.0
        for i, micro in enumerate(group):
            mine, weight = list(micro[world.rank::world.size]), float(world.size)
            if not mine:  # fewer rows than ranks at an epoch's end: run a row with weight 0 (exact, no hang)
                mine, weight = [micro[0]], 0.0
            with no_sync(self.wrapped, world, last=i == len(group) - 1):
                loss_sum = self._micro_loss(mine, totals, weight / world.size)
                if not torch.isfinite(loss_sum):
                    raise TrainingError(self._nonfinite("loss"))
                # DDP / FSDP average gradients over ranks: × W makes the result Σ grads / global count
                (loss_sum * (weight / count)).backward()
            loss_total += float(loss_sum.detach()) * (weight / world.size)
        if totals is not None:
            totals.pairs, totals.sums = world.sum(totals.pairs), {k: world.sum(v) for k, v in totals.sums.items()}
            self.step_metrics = {k: v for k, v in totals.means().items() if k != "loss"}
        loss, grad_norm = self._update(world.sum(loss_total) / count)
        return loss, grad_norm, tokens

    def _micro_loss(self, rows: Sequence[Sequence[Example]], totals: Totals | None, weight: float) -> torch.Tensor:
        """The summed loss of this rank's ``rows`` of a micro-batch: the supervised tokens'
        cross-entropies, or (DPO / ORPO) the pairs' losses, whose rewards go into ``totals`` at ``weight``."""
        with self.autocast() if self.autocast else contextlib.nullcontext():
            if totals is None:
                return causal_lm_loss(self.wrapped, self.collate(rows), whole=self.world.active)[0]
            logprobs = kto_logprobs if self.config.objective == "kto" else policy_logprobs
            policy = logprobs(self.wrapped, rows, self._collate_examples, whole=self.world.active)  # type: ignore[arg-type]
        kl = self._global_kl(policy, rows, weight) if self.config.objective == "kto" else None
        losses, rewards = self._pair_losses(policy, rows, "train", kl)  # type: ignore[arg-type]
        totals.add(losses, rewards, policy, rows, weight)  # type: ignore[arg-type]
        return losses.sum()

    def _global_kl(self, policy: torch.Tensor, items: Sequence[PreferencePair], weight: float) -> float:
        """KTO's KL estimate over the whole micro-batch, all ranks' rows (a rank's weight-0 filler row
        left out): the mean of log π(y'|x) − log π_ref(y'|x) over the mismatched answers, so that a run
        on W processes computes the z of one process."""
        reference = self.reference["train"][[it.index for it in items], 1]
        ratios = policy[:, 1].detach().double().cpu() - reference
        live = 1.0 if weight > 0 else 0.0
        return self.world.sum(float(ratios.sum()) * live) / self.world.sum(len(items) * live)

    def _pair_losses(self, policy: torch.Tensor, pairs: Sequence[PreferencePair], split: str,
                     kl: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses and rewards of the run's objective from the policy's log-probabilities (P, 2);
        ``kl``: KTO's batch-wide KL estimate (default: over ``pairs``)."""
        lengths = answer_lengths(pairs).to(policy.device)
        if self.config.objective == "orpo":
            return orpo_loss(policy, lengths, self.config.orpo.beta)
        if self.config.objective == "simpo":
            m = self.config.simpo
            return simpo_loss(policy, lengths, m.beta, m.gamma, m.label_smoothing, m.cpo_alpha)
        reference = self.reference[split][[p.index for p in pairs]].to(policy.device)
        if self.config.objective == "kto":
            k = self.config.kto
            return kto_loss(policy, reference, desirable(pairs), k.beta, k.desirable_weight, k.undesirable_weight, kl)
        d = self.config.dpo
        return dpo_loss(policy, reference, d.beta, d.loss_type, d.label_smoothing, lengths, d.rpo_alpha)

    def _update(self, loss: float) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule: (the step's loss, its gradient norm)."""
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingError(self._nonfinite("gradient"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _nonfinite(self, what: str) -> str:
        last = complete_checkpoints(self.out / "checkpoints")
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        return (f"non-finite {what} at step {self.state.step + 1}; training stopped and {where}. "
                f"Lower train.lr or set train.max_grad_norm")

    def _save_model(self, model: nn.Module, directory: Path, final: bool = False) -> None:
        """The trained weights; the final PiSSA/OLoRA adapter as a plain LoRA on the original base
        (``io.converted_lora``), a checkpoint's as trained (a resumed run rebuilds the residual base)."""
        if self.config.method == "lora":
            save_adapter(model, directory, convert=final)
        elif self.config.method == "router":
            from lorakit.router import save_router

            save_router(model, directory, self.config.router.adapters)
        else:
            save_trainable(model, directory)

    def checkpoint(self) -> Path:
        """All ranks arrive; rank 0 writes (with FSDP the adapter is gathered first); all leave."""
        ckpt_dir = self.out / "checkpoints"
        path = ckpt_dir / f"checkpoint-{self.state.step}"
        rng = self.world.gather(rng_state())  # every rank's dropout / data RNG, for an exact resume
        with gathered(self.model, self.world), full_optimizer_state(self.optimizer, self.world):
            if self.world.main:
                path = save_checkpoint(ckpt_dir, self.model, self.optimizer, self.scheduler, self.state,
                                       self._save_model, rng)
                prune_checkpoints(ckpt_dir, self.config.train.save_total_limit)
        self.world.barrier()
        return path

    def _compute_reference(self, resumed: bool) -> None:
        """DPO: every pair's log-probabilities under the model as it starts (saved beside the run), or,
        for a resumed run, those its first start saved. All ranks compute all pairs, in the same
        order (an FSDP model's forward is collective)."""
        path = self.out / REFERENCE_FILE
        splits = {"train": self.train_examples, "eval": self.eval_examples}
        counts = {k: len(v) for k, v in splits.items() if v}
        if resumed:
            self.reference = load_reference(path, self.state.fingerprint, counts)
            return
        tick = time.perf_counter()
        with self.fast_paths(), self.autocast() if self.autocast else contextlib.nullcontext():
            for key in counts:
                self.reference[key] = scored_logprobs(self.wrapped, splits[key], self._collate_examples,
                                                      self.config.eval.batch_size, whole=self.world.active)
        if self.world.main:
            save_reference(path, self.reference, self.state.fingerprint)
        self.world.barrier()
        self.log(f"{self.config.objective}: the reference log-probabilities of {sum(counts.values())} "
                 f"{'answers' if self.config.objective == 'kto' else 'pairs'} took "
                 f"{time.perf_counter() - tick:.1f} s ({path.name})")

    def _kto_balance(self) -> None:
        """Log the desirable and undesirable answers' counts, and TRL's advice when λ_D·n_D / (λ_U·n_U)
        is outside [1, 4/3]."""
        k = self.config.kto
        n_good = int(desirable(self.train_examples).sum())
        n_bad = len(self.train_examples) - n_good
        ratio = k.desirable_weight * n_good / (k.undesirable_weight * n_bad) if n_bad else float("inf")
        advice = "" if 1 <= ratio <= 4 / 3 else (
            f"; λ_D·n_D / (λ_U·n_U) = {ratio:.2f}: the KTO paper advises 1 to 4/3, so set kto.desirable_weight / "
            f"kto.undesirable_weight accordingly")
        self.log(f"kto: {n_good} desirable and {n_bad} undesirable training answers{advice}")

    def _collate_examples(self, examples: list[Example]) -> dict[str, Any]:
        return self.collate([[e] for e in examples])

    def _preference_eval(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        """The DPO / ORPO loss, rewards and log-probabilities of the eval pairs (``eval_`` + TRL's names)."""
        flat = padding_free_attention(self.model) if self.padding_free else contextlib.nullcontext()
        with flat, self.autocast() if self.autocast else contextlib.nullcontext():
            policy = scored_logprobs(self.model, pairs, self._collate_examples, self.config.eval.batch_size)
        totals = totals_for(self.config.objective)
        totals.add(*self._pair_losses(policy, pairs, "eval"), policy, pairs)
        return totals.means("eval_")

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        e = self.config.eval
        examples = self.eval_examples[: e.max_examples] if e.max_examples > 0 else self.eval_examples
        with cached_casts(release=self.device.type == "cpu"), onednn_scope():
            if self.pairs:
                metrics = self._preference_eval(examples)
                # generation is scored against the chosen (KTO: each desirable) answer
                examples = [pair[0] for pair in examples if getattr(pair, "desirable", True)]
            else:
                metrics = eval_loss(self.model, examples, self.tokenizer.pad_token_id, e.batch_size, self.autocast,
                                    flat=self.padding_free, multiple=self.flat_multiple)
        if e.generate:
            metrics["exact_match"], _ = exact_match(self.model, self.tokenizer, examples,
                                                    max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        return metrics

    def run(self) -> TrainResult:
        cfg, t = self.config, self.config.train
        kept = self.device.type == "cpu" and keep_freed_memory()
        self.heap = HeapGuard() if kept else None
        resumed = self._resume()
        first_step = self.state.step
        main = self.world.main
        metrics = MetricsLog(self.out / "metrics.jsonl" if main else None, self.state.step if resumed else None,
                             t.tensorboard and main)
        if main:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        quant = f", {cfg.model.quantize} base" if cfg.model.quantize else ""
        quant += ", bf16 autocast" if self.bf16 else ""
        start = ""
        if cfg.model.adapter:  # trained further (lora) or merged into the weights (full)
            start = f" + adapter {cfg.model.adapter}" + (" merged" if cfg.method == "full" else f" (r={self.lora.r})")
        self.log(f"lorakit train: {cfg.method} on {cfg.model.name}{start} ({self.device}{quant}), "
                 f"trainable {self.trainable:,d} / {self.total:,d} params ({100 * self.trainable / self.total:.2f}%), "
                 f"base weights {self.base_weight_bytes / 2**20:.1f} MiB")
        if self.lora is not None and mutates_base(self.lora.init_lora_weights) and t.lr > 1e-3:
            self.log(f"init_lora_weights={self.lora.init_lora_weights}: the adapter starts as the weights' principal part, so a LoRA lr "
                     f"moves the model far; try train.lr around 2e-4 (the demo: 97.5% at 2e-4, 68% at 2e-3)")
        if self.device.type == "cpu" and not self.bf16 and cpu_native_bf16():
            self.log("this CPU multiplies bf16 natively: train.bf16=true trains about 1.4x faster here "
                     "(the demo: eval loss within seed noise of fp32's; see the README's Precision note)")
        unit = {"sft": "examples", "kto": "answers"}.get(cfg.objective, "pairs")
        self.log(f"data: {len(self.train_examples)} train {unit} in {len(self.rows)} rows, "
                 f"{len(self.eval_examples)} eval; batch {t.batch_size} × accumulation {t.grad_accum}"
                 + (f" × {self.world.size} processes ({self.world.mode})" if self.world.active else "")
                 + f" = {self.rows_per_batch * t.grad_accum} rows per step, {self.total_steps} steps")
        if cfg.objective == "kto":
            self._kto_balance()
        if cfg.objective in ("dpo", "kto"):
            self._compute_reference(resumed)
        start, final_eval, interrupted = time.perf_counter(), {}, False
        self.last_loss = None
        bar = _progress(self.total_steps, self.state.step, self.progress)
        self.model.train()
        try:
            with self.fast_paths(), noisy_embeddings(self.model, t.neftune_noise_alpha) as self.noise:
                self._loop(metrics, bar)
            train_s = time.perf_counter() - start
        except KeyboardInterrupt:
            interrupted, train_s = True, time.perf_counter() - start
            self.optimizer.zero_grad(set_to_none=True)
            if self.state.step > 0:
                path = self.checkpoint()
                self.log(f"\ninterrupted: saved {path}; run again with train.resume=auto to continue")
        finally:
            bar.close()
            if kept:  # the steps' temporaries are not needed by evaluation, saving or the caller
                stop_keeping_freed_memory()
        if not interrupted:
            final_eval = self.evaluate()
            final_eval["peak_memory_bytes"] = peak_memory_bytes(self.device)
            final_eval["base_weight_bytes"] = self.base_weight_bytes
            final_eval["train_s"] = round(train_s, 1)
            metrics.log({"step": self.state.step, "epoch": self.state.epoch, **final_eval})
            self._finish(metrics, final_eval, self.last_loss)
        metrics.close()
        return TrainResult(self.out, self.state.step, self.last_loss, final_eval, self.state.tokens,
                           time.perf_counter() - start, self.trainable, self.total, interrupted, train_s, first_step)

    def _loop(self, metrics: MetricsLog, bar: Any) -> None:
        """Optimizer steps from the current state to ``total_steps``: log, eval and checkpoint on the way."""
        cfg, t, s = self.config, self.config.train, self.state
        while s.step < self.total_steps:
            epoch_batches = batches(self.rows, self.rows_per_batch, s.epoch, cfg.seed)
            groups = [epoch_batches[k:k + t.grad_accum] for k in range(0, len(epoch_batches), t.grad_accum)]
            for index in range(s.step_in_epoch, len(groups)):
                tick = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                loss, grad_norm, tokens = self.step(groups[index])
                if self.heap is not None:
                    self.heap.after_step()
                elapsed = time.perf_counter() - tick
                s.step, s.step_in_epoch, s.tokens = s.step + 1, index + 1, s.tokens + tokens
                self.last_loss = loss
                epoch_f = s.epoch + s.step_in_epoch / len(groups)
                if s.step % max(1, t.logging_steps) == 0 or s.step == self.total_steps:
                    metrics.log({"step": s.step, "epoch": round(epoch_f, 4), "loss": loss, "lr": lr,
                                 "grad_norm": grad_norm, "tokens": s.tokens, "tokens_per_s": tokens / elapsed,
                                 **self.step_metrics})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if s.step_in_epoch == len(groups):
                    s.epoch, s.step_in_epoch = s.epoch + 1, 0
                if cfg.eval.steps > 0 and s.step % cfg.eval.steps == 0 and s.step < self.total_steps:
                    metrics.log({"step": s.step, "epoch": round(epoch_f, 4), **self.evaluate()})
                    if self.world.main:
                        plot_loss(metrics.records, self.out / "loss.png")
                    self.model.train()
                if (t.save_steps > 0 and s.step % t.save_steps == 0) or s.step_in_epoch == 0:
                    self.checkpoint()
                if s.step >= self.total_steps:
                    return

    def _finish(self, metrics: MetricsLog, final_eval: dict[str, float], last_loss: float | None) -> None:
        with gathered(self.model, self.world, trainable_only=self.config.method != "full"):
            if not self.world.main:
                return
            if self.config.method != "full":
                self._save_model(self.model, self.out, final=True)
            else:
                self.model.save_pretrained(self.out / "model")
                self.tokenizer.save_pretrained(self.out / "model")
        plot_loss(metrics.records, self.out / "loss.png")
        summary = {"steps": self.state.step, "train_loss": last_loss, **final_eval,
                   "trainable_params": self.trainable, "total_params": self.total}
        write_model_card(self.out / "README.md", dump_config(self.config), summary, self.config.model.name,
                         self.config.method)


@contextlib.contextmanager
def fast_paths(model: nn.Module, *, padding_free: bool, bf16: bool, device: torch.device) -> Iterator[nn.Module]:
    """The model as training runs it: padding-free attention (where on), the fused SwiGLU MLP and
    RMSNorm nodes, (under autocast) each frozen weight rounded to bf16 once, not every step, and
    the fused nodes' and plain linear layers' fp32 CPU products on oneDNN where it is faster."""
    # lorakit's attention: per segment for padding-free batches; under CPU bf16 also for padded ones
    # (their rows as segments of attention._MathSegments)
    cpu_bf16 = (bf16 and device.type == "cpu" and supports_padding_free(model)
                and model.config._attn_implementation == "sdpa")  # type: ignore[union-attr]
    with padding_free_attention(model) if padding_free or cpu_bf16 else contextlib.nullcontext(), \
            fused_mlp(model), fused_norms(model), cached_casts(release=device.type == "cpu"), \
            plain_linears(model), onednn_scope():
        yield model


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=not enabled, unit="step")


def train(config: RunConfig | dict | str | Path, overrides: list[str] | None = None, *,
          progress: bool = True) -> TrainResult:
    """Run a training job from a ``RunConfig``, a config dict or a YAML path (+ dotted overrides).

    Started by torchrun with several processes, each runs its rank (``train.distributed``)."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        config = build_config(config)
    world = world_from_env(config.train.distributed)
    with process_group(world):
        return Trainer(config, progress=progress, world=world).run()
