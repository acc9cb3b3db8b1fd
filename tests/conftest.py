"""Tiny models built from configs in code (no downloads), shared by the tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


class TinyConvNet(nn.Module):
    """Conv2d → Conv1d-free image classifier with a Linear head (exercises conv LoRA)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, H/2, W/2)
        h = self.conv1d(h.flatten(2)).mean(-1)  # (B, 8)
        return self.head(h)


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every LoRA parameter random values (so B is not zero and the adapter does something)."""
    from lorakit.layers import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def clone():
    return copy.deepcopy
