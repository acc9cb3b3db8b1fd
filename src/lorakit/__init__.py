"""lorakit: LoRA and QLoRA fine-tuning for PyTorch models, PEFT-compatible on disk."""

from lorakit.batch import adapter_batch
from lorakit.compose import combine_adapters
from lorakit.config import LoraConfig
from lorakit.inject import (
    active_adapters,
    add_adapter,
    count_parameters,
    delete_adapter,
    get_lora_model,
    print_trainable_parameters,
    set_adapter,
)
from lorakit.io import AdapterLoadError, load_adapter, save_adapter
from lorakit.merge import disable_adapter, merge, merge_and_unload, unmerge

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "LoraConfig",
    "active_adapters",
    "adapter_batch",
    "add_adapter",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapter",
    "get_lora_model",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "unmerge",
]
