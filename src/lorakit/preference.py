"""Preference data and the objectives that learn from it: DPO (Rafailov et al. 2023), ORPO, SimPO, KTO.

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

KTO (``kto_loss``) learns from answers judged one at a time, TRL's unpaired rows
``{"prompt": ..., "completion": ..., "label": true|false}`` (a pair row gives one of each): it raises
the desirable answers' and lowers the undesirable ones' log-ratio against the reference relative to
a KL estimate, the log-ratio of each prompt with another row's answer (``KtoItem``: both share a
micro-batch, as a pair's answers do; the reference's values are computed once, as for DPO).
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
PREFERENCE_KEYS = ("chosen", "rejected")
KTO_KEYS = ("completion", "label")  # with "prompt": TRL's unpaired preference rows
REFERENCE_FILE = "reference_logps.safetensors"


class PreferencePair(list):
    """``[chosen, rejected]`` Examples, and the pair's ``index`` into the reference log-probabilities
    (a row to the batching helpers of ``lorakit.collate``, which shuffle and slice rows)."""

    def __init__(self, chosen: Example, rejected: Example, index: int) -> None:
        super().__init__([chosen, rejected])
        self.index = index

    def with_index(self, index: int) -> PreferencePair:
        return PreferencePair(self[0], self[1], index)


class KtoItem(PreferencePair):
    """KTO's unit: ``[answer, mismatched]``, an answer judged ``desirable`` or not, and its prompt with
    another row's answer (whose log-probabilities estimate the KL term); both always share a micro-batch."""

    def __init__(self, answer: Example, mismatched: Example, index: int, desirable: bool) -> None:
        super().__init__(answer, mismatched, index)
        self.desirable = desirable

    def with_index(self, index: int) -> KtoItem:
        return KtoItem(self[0], self[1], index, self.desirable)


def is_preference_row(data: dict[str, Any]) -> bool:
    return all(k in data for k in PREFERENCE_KEYS)


def _turns(value: Any, role: str, row: Row, key: str) -> list[dict[str, Any]]:
    """A string as one ``role`` turn; a list as the turns it holds (checked by ``tokenize_row``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [dict(m) for m in value]
    raise DataError(f"{row.source}: '{key}' must be a string or a list of {{'role', 'content'}} messages")


def _sides(row: Row) -> tuple[Any, list[Any]]:
    """A preference row's prompt (a string or context turns) and its [chosen, rejected] answers."""
    d = row.data
    if not is_preference_row(d):
        raise DataError(f"{row.source}: a preference row needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"got keys {', '.join(sorted(d)) or 'none'}")
    prompt = d.get("prompt")
    if all(isinstance(v, str) for v in (prompt, d["chosen"], d["rejected"])):
        return prompt, [d["chosen"], d["rejected"]]
    chosen, rejected = (_turns(d[k], "assistant", row, k) for k in PREFERENCE_KEYS)
    if prompt is None:  # implicit prompt: the turns both conversations share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        context, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not context:
            raise DataError(f"{row.source}: no 'prompt' and 'chosen'/'rejected' share no leading turn; give the "
                            f"prompt as 'prompt'")
        return context, [chosen, rejected]
    return prompt, [chosen, rejected]


def _answer_row(prompt: Any, answer: Any, row: Row) -> Row:
    """An SFT row in which only ``answer`` trains: prompt/completion when both are strings, else
    messages (a string prompt a user turn, a string answer an assistant turn; the prompt's own
    assistant turns are context, weight 0)."""
    if isinstance(prompt, str) and isinstance(answer, str):
        return Row({"prompt": prompt, "completion": answer}, row.source)
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in _turns(prompt, "user", row, "prompt")]
    return Row({"messages": context + _turns(answer, "assistant", row, "completion")}, row.source)


def side_rows(row: Row) -> tuple[Row, Row]:
    """The row's chosen and rejected sides as SFT rows (prompt/completion or messages) in which only
    the answer trains."""
    prompt, answers = _sides(row)
    return _answer_row(prompt, answers[0], row), _answer_row(prompt, answers[1], row)


def _fit(sides: list[Example], opts: DataOptions) -> tuple[bool, bool]:
    """(keep, cut): sides over ``max_seq_len`` are cut at their end (``overlong: truncate``) or drop
    the unit (``drop``), as does a side left with nothing to train on."""
    cut = any(len(e.input_ids) > opts.max_seq_len for e in sides)
    if cut and opts.overlong == "truncate":
        for e in sides:
            e.input_ids, e.labels = e.input_ids[: opts.max_seq_len], e.labels[: opts.max_seq_len]
    keep = not (cut and opts.overlong == "drop") and all(e.n_supervised > 0 for e in sides)
    return keep, cut and keep


def build_pairs(rows: Sequence[Row], tokenizer: Any, opts: DataOptions) -> list[PreferencePair]:
    """Tokenize preference rows (``_fit`` truncates or drops); counts land in ``opts.stats``."""
    pairs: list[PreferencePair] = []
    truncated = 0
    for row in rows:
        sides = [tokenize_row(r, tokenizer, opts) for r in side_rows(row)]
        keep, cut = _fit(sides, opts)
        if keep:
            truncated += cut
            pairs.append(PreferencePair(sides[0], sides[1], len(pairs)))
    opts.stats.update(truncated=truncated, dropped=len(rows) - len(pairs), kept=len(pairs))
    return pairs


def is_unpaired_row(data: dict[str, Any]) -> bool:
    return all(k in data for k in KTO_KEYS)


def _judged(row: Row) -> list[tuple[Any, Any, bool]]:
    """(prompt, answer, desirable) of a KTO row: one for an unpaired row, two for a preference pair."""
    d = row.data
    if is_unpaired_row(d):
        if not isinstance(d["label"], bool):
            raise DataError(f"{row.source}: 'label' must be true (a desirable answer) or false, got {d['label']!r}")
        if "prompt" not in d:
            raise DataError(f"{row.source}: an unpaired row needs 'prompt' with its 'completion' and 'label'")
        return [(d["prompt"], d["completion"], d["label"])]
    if is_preference_row(d):
        prompt, (chosen, rejected) = _sides(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    raise DataError(f"{row.source}: a KTO row needs 'prompt', 'completion' and 'label' (true/false), or 'chosen' "
                    f"and 'rejected'; got keys {', '.join(sorted(d)) or 'none'}")


def build_kto_items(rows: Sequence[Row], tokenizer: Any, opts: DataOptions) -> list[KtoItem]:
    """Tokenize KTO rows (unpaired, or pairs split into a desirable and an undesirable answer); each
    answer's prompt is also paired with the answer of another row, chosen by a fixed permutation
    (each answer is some other's mismatch exactly once), for the KL estimate. ``_fit`` truncates or
    drops; counts land in ``opts.stats``."""
    judged = [(row, *j) for row in rows for j in _judged(row)]
    if len(judged) < 2:
        raise DataError(f"{rows[0].source if rows else 'the dataset'}: KTO needs at least two answers (the KL "
                        f"estimate pairs each prompt with another row's answer)")
    order = torch.randperm(len(judged), generator=torch.Generator().manual_seed(0)).tolist()
    other = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    items: list[KtoItem] = []
    truncated = 0
    for i, (row, prompt, answer, desirable) in enumerate(judged):
        rows_ = [_answer_row(prompt, answer, row), _answer_row(prompt, judged[other[i]][2], row)]
        sides = [tokenize_row(r, tokenizer, opts) for r in rows_]
        keep, cut = _fit(sides, opts)
        if keep:
            truncated += cut
            items.append(KtoItem(sides[0], sides[1], len(items), desirable))
    opts.stats.update(truncated=truncated, dropped=len(judged) - len(items), kept=len(items))
    return items


def load_pairs(path: str | Path, tokenizer: Any, opts: DataOptions, objective: str = "dpo") -> list[PreferencePair]:
    """The file's preference pairs, or for ``objective: kto`` its ``KtoItem``s."""
    return load_examples(path, tokenizer, opts, build=build_kto_items if objective == "kto" else build_pairs)


def split_pairs(pairs: list[PreferencePair], fraction: float,
                seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``data.split_eval`` for pairs, both parts re-indexed from 0."""
    train, evals = split_eval(pairs, fraction, seed)
    return reindex(train), reindex(evals)


def reindex(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    return [p.with_index(i) for i, p in enumerate(pairs)]


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


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's per-answer losses (N,) and (N, 2) [implicit reward β·r, mismatched log-ratio] (no gradient)
    (Ethayarajh et al. 2024; TRL's KTOTrainer). ``policy`` and ``reference`` (N, 2): column 0 the judged
    answer's log π(y|x), column 1 its prompt with another row's answer, log π(y'|x); ``desirable`` (N,) bool.

        r = log π(y|x) − log π_ref(y|x)
        z = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x))   (no gradient: a baseline, the KL estimate)
        ℓ = λ_D (1 − σ(β (r − z)))   for a desirable answer,   λ_U (1 − σ(β (z − r)))   for an undesirable one

    ``kl``: the mean mismatched log-ratio when the batch is larger than these rows (the trainer's
    micro-batch split over ranks), clamped here as z.
    """
    ratios = policy - reference.to(policy)
    mean = ratios[:, 1].detach().mean() if kl is None else ratios.new_tensor(kl)
    z = mean.clamp(min=0)
    r = ratios[:, 0]
    wanted = desirable.to(policy.device, torch.bool)
    losses = torch.where(wanted, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return losses, torch.stack([beta * r.detach(), ratios[:, 1].detach()], dim=1)


def answer_lengths(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """(P, 2) the chosen and rejected answers' supervised token counts."""
    return torch.tensor([[p[0].n_supervised, p[1].n_supervised] for p in pairs], dtype=torch.float64)


class Totals:
    """Running sums of a step's or an evaluation's pair metrics, reported as means (TRL's names)."""

    def __init__(self) -> None:
        self.pairs = 0.0
        self.sums = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                   "rewards/margins", "logps/chosen", "logps/rejected"), 0.0)

    def add(self, losses: torch.Tensor, rewards: torch.Tensor, policy: torch.Tensor,
            pairs: Sequence[PreferencePair], weight: float = 1.0) -> None:
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


class KtoTotals(Totals):
    """KTO's running sums (TRL's names): the loss per answer; rewards and log-probabilities averaged
    over the desirable (``chosen``) and the undesirable (``rejected``) answers apart; ``kl``, the
    mismatched answers' mean log-ratio, clamped at 0. Weighted sums and counts, so that ranks add up."""

    def __init__(self) -> None:
        self.pairs = 0.0
        self.sums = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                                   "count/chosen", "count/rejected", "kl"), 0.0)

    def add(self, losses: torch.Tensor, rewards: torch.Tensor, policy: torch.Tensor,
            pairs: Sequence[PreferencePair], weight: float = 1.0) -> None:
        good = desirable(pairs)
        r, p = rewards.double().cpu(), policy.detach().double().cpu()
        for side, mask in (("chosen", good), ("rejected", ~good)):
            self.sums[f"rewards/{side}"] += float(r[mask, 0].sum()) * weight
            self.sums[f"logps/{side}"] += float(p[mask, 0].sum()) * weight
            self.sums[f"count/{side}"] += float(mask.sum()) * weight
        self.sums["loss"] += float(losses.detach().double().sum()) * weight
        self.sums["kl"] += float(r[:, 1].sum()) * weight
        self.pairs += len(losses) * weight

    def means(self, prefix: str = "") -> dict[str, float]:
        s, n = self.sums, max(self.pairs, 1.0)
        out = {"loss": s["loss"] / n, "kl": max(0.0, s["kl"] / n)}
        for side in ("chosen", "rejected"):  # a side with no answers in the step has no mean: left out
            if s[f"count/{side}"] > 0:
                out[f"rewards/{side}"] = s[f"rewards/{side}"] / s[f"count/{side}"]
                out[f"logps/{side}"] = s[f"logps/{side}"] / s[f"count/{side}"]
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {prefix + k: v for k, v in out.items()}


def desirable(items: Sequence[PreferencePair]) -> torch.Tensor:
    """(N,) bool: each ``KtoItem``'s judgement."""
    return torch.tensor([bool(getattr(it, "desirable", True)) for it in items])


def totals_for(objective: str) -> Totals:
    return KtoTotals() if objective == "kto" else Totals()


# -- the reference ------------------------------------------------------------------------------------


def policy_logprobs(model: nn.Module, pairs: Sequence[PreferencePair],
                    collate: Callable[[list[Example]], dict[str, Any]], whole: bool = False) -> torch.Tensor:
    """(P, 2) log π(chosen | x), log π(rejected | x) of ``pairs`` in one batch (with gradients)."""
    examples = [e for pair in pairs for e in pair]  # chosen₀, rejected₀, chosen₁, …
    return sequence_logprobs(model, collate(examples), len(examples), whole=whole).view(-1, 2)


def kto_logprobs(model: nn.Module, items: Sequence[PreferencePair],
                 collate: Callable[[list[Example]], dict[str, Any]], whole: bool = False) -> torch.Tensor:
    """(N, 2) log π(y | x) of each judged answer (with gradients) and log π(y' | x) of its mismatched one
    (without: z, the KL estimate, takes no gradient), in two forwards, so that the backward pass runs
    over the judged answers only (TRL's KTOTrainer also runs the mismatched ones under no_grad)."""
    own = sequence_logprobs(model, collate([it[0] for it in items]), len(items), whole=whole)
    with torch.no_grad():
        mismatched = sequence_logprobs(model, collate([it[1] for it in items]), len(items), whole=whole)
    return torch.stack([own, mismatched.to(own.dtype)], dim=1)


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
    margin, the DPO loss at β and the log-probabilities, under TRL's names. ``KtoItem``s (judged
    answers) get KTO's loss, rewards and KL at β against the base, and as ``accuracy`` the share of
    answers whose reward has the sign of their label."""
    from lorakit.merge import disable_adapter

    policy = scored_logprobs(model, pairs, collate, batch_size)
    with disable_adapter(model):
        base = scored_logprobs(model, pairs, collate, batch_size)
    if isinstance(pairs[0], KtoItem):
        return _evaluate_judged(policy, base, pairs, beta)
    lengths = answer_lengths(pairs).double()
    totals = Totals()
    totals.add(*dpo_loss(policy, base, beta), policy, pairs)
    metrics = totals.means()
    for key, logps in (("accuracy", policy), ("base_accuracy", base)):
        mean = logps / lengths
        metrics[key] = float((mean[:, 0] > mean[:, 1]).double().mean())
    metrics["pairs"] = len(pairs)
    return metrics


def _evaluate_judged(policy: torch.Tensor, base: torch.Tensor, items: Sequence[PreferencePair],
                     beta: float) -> dict[str, float]:
    labels = desirable(items)
    losses, rewards = kto_loss(policy, base, labels, beta)
    totals = KtoTotals()
    totals.add(losses, rewards, policy, items)
    metrics = totals.means()
    metrics["accuracy"] = float(((rewards[:, 0] > 0) == labels).double().mean())
    metrics["answers"] = len(items)
    return metrics


def save_reference(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write atomically (a temporary file renamed into place)."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"fingerprint": fingerprint}))


def load_reference(path: Path, fingerprint: str, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """The saved reference log-probabilities, checked against this run's config and pair counts."""
    from safetensors import safe_open

    if not path.exists():
        raise DataError(f"{path} is missing: a resumed DPO or KTO run needs the reference log-probabilities its first "
                        f"step computed; start over with train.resume=never (or a new output_dir)")
    with safe_open(str(path), "pt") as f:
        saved = (f.metadata() or {}).get("fingerprint")
    tensors = load_file(str(path))
    if saved != fingerprint or any(k not in tensors or len(tensors[k]) != n for k, n in counts.items()):
        raise DataError(f"{path} was computed for other data or another config; start over with "
                        f"train.resume=never (or a new output_dir)")
    return tensors
