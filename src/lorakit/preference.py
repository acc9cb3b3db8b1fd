"""Preference pairs, Direct Preference Optimization (DPO, Rafailov et al. 2023) and ORPO.

Rows hold a prompt and two answers, the preferred one first (TRL's keys):

    strings           {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt   {"chosen": [messages], "rejected": [messages]}   their common leading turns are the prompt

A string prompt or answer is a user or assistant turn (string rows render like prompt/completion
rows: under the chat template when there is one, with ``data.system_prompt``). Each side becomes an
``Example`` through ``data.tokenize_row`` whose labels mark the answer's assistant turns only.

With log π(y | x) the summed log-probability of answer y (``loss.sequence_logprobs``), policy π
(the model being trained) and reference π_ref (the same model before training), per pair:

    u = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
    sigmoid (DPO):  ℓ = −(1−ε) log σ(β u) − ε log σ(−β u)      (ε: label smoothing, conservative DPO)
    ipo (IPO):      ℓ = (u − 1/(2β))²,  the log-probabilities averaged over each answer's tokens

plus, with ``rpo_alpha`` = α > 0 (RPO, Pang et al. 2024; TRL's name), α times the chosen answer's
negative log-likelihood per token, −log π(y_c|x) / |y_c|: DPO alone widens the gap between the two
answers by pushing both down, and from a base model that has not learnt the answer format it never
makes the chosen answer the greedy one (the demo: every eval pair ranked right, 0.5% exact match);
the likelihood term does. The implicit rewards β[log π(y|x) − log π_ref(y|x)] of each answer are logged, with their
margin and how often the chosen one's is higher. The reference's log-probabilities are computed
once before the first step (TRL's ``precompute_ref_log_probs``): no second model in memory, for
LoRA and full fine-tuning alike, and saved beside the run so that a resumed run reads the same
values. ORPO (``orpo_loss``) and SimPO (``simpo_loss``) need no reference: ORPO adds to an SFT term
on the chosen answer a log-odds ratio between the two answers; SimPO asks the answers' mean
per-token log-probabilities to differ by a margin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.data import DataError, DataOptions, Example, Row, load_examples, split_eval, tokenize_row
from lorakit.io import atomic_write
from lorakit.loss import sequence_logprobs
from lorakit.models import evaluating

LOSS_TYPES = ("sigmoid", "ipo")
OBJECTIVES = ("dpo", "orpo", "simpo")
PREFERENCE_KEYS = ("chosen", "rejected")
REFERENCE_FILE = "reference_logps.safetensors"


class PreferencePair(list):
    """``[chosen, rejected]`` Examples, and the pair's ``index`` into the reference log-probabilities
    (a row to the batching helpers of ``lorakit.collate``, which shuffle and slice rows)."""

    def __init__(self, chosen: Example, rejected: Example, index: int) -> None:
        super().__init__([chosen, rejected])
        self.index = index


def is_preference_row(data: dict[str, Any]) -> bool:
    return all(k in data for k in PREFERENCE_KEYS)


def _turns(value: Any, role: str, row: Row, key: str) -> list[dict[str, Any]]:
    """A string as one ``role`` turn; a list as the turns it holds (checked by ``tokenize_row``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [dict(m) for m in value]
    raise DataError(f"{row.source}: '{key}' must be a string or a list of {{'role', 'content'}} messages")


def side_rows(row: Row) -> tuple[Row, Row]:
    """The row's chosen and rejected sides as SFT rows (prompt/completion or messages) in which only
    the answer trains."""
    d = row.data
    if not is_preference_row(d):
        raise DataError(f"{row.source}: a preference row needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"got keys {', '.join(sorted(d)) or 'none'}")
    prompt = d.get("prompt")
    if all(isinstance(v, str) for v in (prompt, d["chosen"], d["rejected"])):
        return tuple(Row({"prompt": prompt, "completion": d[k]}, row.source) for k in PREFERENCE_KEYS)  # type: ignore[return-value]
    chosen, rejected = (_turns(d[k], "assistant", row, k) for k in PREFERENCE_KEYS)
    if prompt is None:  # implicit prompt: the turns both conversations share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        context, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not context:
            raise DataError(f"{row.source}: no 'prompt' and 'chosen'/'rejected' share no leading turn; give the "
                            f"prompt as 'prompt'")
    else:
        context = _turns(prompt, "user", row, "prompt")
    # the prompt's own assistant turns are context (weight 0), never trained
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in context]
    return Row({"messages": context + chosen}, row.source), Row({"messages": context + rejected}, row.source)


def build_pairs(rows: Sequence[Row], tokenizer: Any, opts: DataOptions) -> list[PreferencePair]:
    """Tokenize preference rows; a side over ``max_seq_len`` is cut at its end (``overlong:
    truncate``) or drops the pair (``drop``), as does a side left with nothing to train on. Counts
    land in ``opts.stats``."""
    pairs: list[PreferencePair] = []
    truncated = dropped = 0
    for row in rows:
        sides = [tokenize_row(r, tokenizer, opts) for r in side_rows(row)]
        cut = any(len(e.input_ids) > opts.max_seq_len for e in sides)
        if cut and opts.overlong == "truncate":
            for e in sides:
                e.input_ids, e.labels = e.input_ids[: opts.max_seq_len], e.labels[: opts.max_seq_len]
        if (cut and opts.overlong == "drop") or any(e.n_supervised == 0 for e in sides):
            dropped += 1
            continue
        truncated += cut
        pairs.append(PreferencePair(sides[0], sides[1], len(pairs)))
    opts.stats.update(truncated=truncated, dropped=dropped, kept=len(pairs))
    return pairs


def load_pairs(path: str | Path, tokenizer: Any, opts: DataOptions) -> list[PreferencePair]:
    return load_examples(path, tokenizer, opts, build=build_pairs)


def split_pairs(pairs: list[PreferencePair], fraction: float,
                seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``data.split_eval`` for pairs, both parts re-indexed from 0."""
    train, evals = split_eval(pairs, fraction, seed)
    return reindex(train), reindex(evals)


def reindex(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    return [PreferencePair(p[0], p[1], i) for i, p in enumerate(pairs)]


# -- the objective -----------------------------------------------------------------------------------


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, lengths: torch.Tensor | None = None,
             rpo_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (P,) and implicit rewards (P, 2) (no gradient) from the policy's and the
    reference's log-probabilities (P, 2): column 0 the chosen answer, column 1 the rejected one.
    ``lengths`` (P, 2), the answers' token counts, averages the log-probabilities for ``ipo`` and
    the chosen answer's likelihood term (``rpo_alpha``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if lengths is None and (loss_type == "ipo" or rpo_alpha):
        raise ValueError("ipo and rpo_alpha average log-probabilities over each answer's tokens: pass lengths")
    ratios = policy - reference.to(policy)  # (P, 2): log π/π_ref per answer
    rewards = beta * ratios.detach()
    if loss_type == "ipo":
        u = (ratios / lengths.to(ratios)) @ ratios.new_tensor([1.0, -1.0])  # type: ignore[union-attr]
        losses = (u - 1 / (2 * beta)) ** 2
    else:
        u = ratios[:, 0] - ratios[:, 1]
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(-beta * u)
    if rpo_alpha:
        losses = losses - rpo_alpha * policy[:, 0] / lengths[:, 0].to(policy)  # type: ignore[index]
    return losses, rewards


def orpo_loss(policy: torch.Tensor, lengths: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's per-pair losses (P,) and its rewards β·log p̄ (P, 2) (no gradient), with no reference:
    from the answers' mean per-token log-probabilities log p̄ = log π(y|x) / |y| (P, 2),

        ℓ = −log p̄_c − β log σ(log odds(p̄_c) − log odds(p̄_r)),   log odds(p) = log p − log(1 − p)

    (Hong et al. 2024; β is the paper's λ and TRL's ``beta``). log(1 − p) is formed as
    log(−expm1(log p)), exact as log p → 0, in float64."""
    mean = (policy.double() / lengths.to(policy.device, torch.float64)).clamp(max=-1e-12)  # (P, 2), log p̄ < 0
    log_odds = mean - torch.log(-torch.expm1(mean))
    losses = -mean[:, 0] - beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    return losses.to(policy.dtype), beta * mean.detach()


def simpo_loss(policy: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0, cpo_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SimPO's per-pair losses (P,) and rewards β·log p̄ (P, 2) (no gradient), with no reference:
    from the mean per-token log-probabilities log p̄ = log π(y|x) / |y| (P, 2),

        u = β (log p̄_c − log p̄_r) − γ,   ℓ = −(1−ε) log σ(u) − ε log σ(−u) + α · (−log p̄_c)

    (Meng et al. 2024: the reward is the length-normalised likelihood and γ a target margin; TRL's
    CPOTrainer with ``loss_type="simpo"``, whose ``cpo_alpha`` α adds the chosen answer's per-token
    NLL, CPO-SimPO; ε: label smoothing as in DPO)."""
    mean = policy / lengths.to(policy.device, policy.dtype)
    u = beta * (mean[:, 0] - mean[:, 1]) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u) - cpo_alpha * mean[:, 0]
    return losses, beta * mean.detach()


def answer_lengths(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """(P, 2) the chosen and rejected answers' supervised token counts."""
    return torch.tensor([[p[0].n_supervised, p[1].n_supervised] for p in pairs], dtype=torch.float64)


class Totals:
    """Running sums of a step's or an evaluation's pair metrics, reported as means (TRL's names)."""

    def __init__(self) -> None:
        self.pairs = 0.0
        self.sums = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                   "rewards/margins", "logps/chosen", "logps/rejected"), 0.0)

    def add(self, losses: torch.Tensor, rewards: torch.Tensor, policy: torch.Tensor, weight: float = 1.0) -> None:
        r, p = rewards.double(), policy.detach().double()
        values = {"loss": losses.detach().double().sum(), "rewards/chosen": r[:, 0].sum(),
                  "rewards/rejected": r[:, 1].sum(), "rewards/accuracies": (r[:, 0] > r[:, 1]).double().sum(),
                  "rewards/margins": (r[:, 0] - r[:, 1]).sum(), "logps/chosen": p[:, 0].sum(),
                  "logps/rejected": p[:, 1].sum()}
        for key, value in values.items():
            self.sums[key] += float(value) * weight
        self.pairs += len(losses) * weight

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: v / max(self.pairs, 1.0) for k, v in self.sums.items()}


# -- the reference ------------------------------------------------------------------------------------


def policy_logprobs(model: nn.Module, pairs: Sequence[PreferencePair],
                    collate: Callable[[list[Example]], dict[str, Any]], whole: bool = False) -> torch.Tensor:
    """(P, 2) log π(chosen | x), log π(rejected | x) of ``pairs`` in one batch (with gradients)."""
    examples = [e for pair in pairs for e in pair]  # chosen₀, rejected₀, chosen₁, …
    return sequence_logprobs(model, collate(examples), len(examples), whole=whole).view(-1, 2)


def scored_logprobs(model: nn.Module, pairs: Sequence[PreferencePair],
                    collate: Callable[[list[Example]], dict[str, Any]], batch_size: int,
                    whole: bool = False) -> torch.Tensor:
    """(P, 2) float64: the model's log-probabilities of every pair's answers as it is now, in eval mode
    (no dropout) without gradients, ``batch_size`` pairs at a time: DPO's reference before the first
    step, and the policy at evaluation."""
    out = torch.empty(len(pairs), 2, dtype=torch.float64)
    with evaluating(model):
        for k in range(0, len(pairs), batch_size):
            chunk = pairs[k:k + batch_size]
            out[k:k + len(chunk)] = policy_logprobs(model, chunk, collate, whole).double().cpu()
    return out


def evaluate_pairs(model: nn.Module, pairs: Sequence[PreferencePair],
                   collate: Callable[[list[Example]], dict[str, Any]], batch_size: int,
                   beta: float = 0.1) -> dict[str, float]:
    """Score held-out pairs with ``model`` (its active adapters) against its base (adapters off).

    ``accuracy``: the share of pairs whose chosen answer has the higher mean per-token log-probability
    under the model (``base_accuracy``: under the base), a ranking that needs no reference. With the
    base as reference, DPO's implicit rewards β[log π(y|x) − log π_base(y|x)], their accuracy and
    margin, the DPO loss at β and the log-probabilities, under TRL's names."""
    from lorakit.merge import disable_adapter

    policy = scored_logprobs(model, pairs, collate, batch_size)
    with disable_adapter(model):
        base = scored_logprobs(model, pairs, collate, batch_size)
    lengths = answer_lengths(pairs).double()
    totals = Totals()
    totals.add(*dpo_loss(policy, base, beta), policy)
    metrics = totals.means()
    for key, logps in (("accuracy", policy), ("base_accuracy", base)):
        mean = logps / lengths
        metrics[key] = float((mean[:, 0] > mean[:, 1]).double().mean())
    metrics["pairs"] = len(pairs)
    return metrics


def save_reference(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write atomically (a temporary file renamed into place)."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"fingerprint": fingerprint}))


def load_reference(path: Path, fingerprint: str, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """The saved reference log-probabilities, checked against this run's config and pair counts."""
    from safetensors import safe_open

    if not path.exists():
        raise DataError(f"{path} is missing: a resumed DPO run needs the reference log-probabilities its first "
                        f"step computed; start over with train.resume=never (or a new output_dir)")
    with safe_open(str(path), "pt") as f:
        saved = (f.metadata() or {}).get("fingerprint")
    tensors = load_file(str(path))
    if saved != fingerprint or any(k not in tensors or len(tensors[k]) != n for k, n in counts.items()):
        raise DataError(f"{path} was computed for other data or another config; start over with "
                        f"train.resume=never (or a new output_dir)")
    return tensors
