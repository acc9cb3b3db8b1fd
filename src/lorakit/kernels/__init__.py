"""Tensor-in, tensor-out LoRA ops. Each fast path sits beside a plain-PyTorch reference."""
