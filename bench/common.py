"""What the benchmarks share: the CodeLlama-7B shape and random Llamas built on the device.

Random weights cost the same time as real ones, and building them on the device in the
target dtype needs no download and no CPU copy of a 7B model.
"""

from __future__ import annotations

from typing import Any

# CodeLlama-7B's LlamaConfig numbers (the seed's base model), without the token ids.
CODELLAMA_7B: dict[str, Any] = {
    "vocab_size": 32016,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 16384,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-5,
}


def random_llama(config: Any, device: Any, dtype: Any) -> Any:
    """A ``LlamaForCausalLM(config)`` with random weights made directly on ``device`` in
    ``dtype``. Seed torch before calling it for repeatable weights."""
    import torch
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
