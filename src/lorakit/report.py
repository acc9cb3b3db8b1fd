"""What a run leaves for people to read: ``metrics.jsonl``, ``loss.png`` and a ``README.md`` model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, entries after the checkpoint's step are dropped so a
    resumed run's file reads like an uninterrupted one. ``path=None`` keeps records in memory only
    (ranks other than 0 of a distributed run)."""

    def __init__(self, path: Path | None, resume_step: int | None = None, tensorboard: bool = False) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if path is None:
            return
        if path.exists() and resume_step is not None:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                print("lorakit: TensorBoard logging needs the tensorboard package (pip install tensorboard); skipped")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against step, written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_model_card(path: Path, config_yaml: str, result: dict[str, Any], base_model: str, method: str) -> None:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items())
    loads = (
        "```python\nimport lorakit\nfrom lorakit.models import load_model\n\n"
        f"model, tokenizer = load_model({base_model!r})\nmodel = lorakit.load_adapter(model, {str(path.parent)!r})\n```\n"
        "It also loads with `peft.PeftModel.from_pretrained(base, directory)`."
        if method == "lora" else f"The fine-tuned model is in `{path.parent / 'model'}` (plain transformers)."
    )
    path.write_text(
        f"# {path.parent.name}\n\nFine-tuned from `{base_model}` with lorakit ({method}).\n\n"
        f"## Final metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n## Use\n\n{loads}\n\n"
        f"## Config\n\n```yaml\n{config_yaml}```\n"
    )
