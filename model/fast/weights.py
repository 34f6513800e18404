"""The weights of a Llama model, held the way the fast engine's forward reads them.

:class:`LlamaWeights` reads a transformers ``LlamaForCausalLM`` (merged bf16, or modules such
as bitsandbytes 4-bit or unmerged peft LoRA layers, which it calls as they are): the model's
dimensions, its embedding and norms, and each layer's projections as callables (:data:`Linear`),
with plain linears fused into one matmul (q|k|v, gate|up). It also builds the rotary tables
with the config's theta (:meth:`LlamaWeights.rope_tables`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]


class _Weight:
    """A bias-free linear layer held as one (out, in) weight; may be several fused."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _TransposedWeight:
    """The same layer with its weight stored (in, out): ``x @ Wt``.

    cuBLAS picks faster kernels for this layout at decode batch sizes: on an H100, at 8 rows,
    o_proj 17.2 vs 23.4 us, gate_up 63.4 vs 70.7 us (bench/serving.py, gemm rows).
    """

    def __init__(self, transposed: torch.Tensor) -> None:
        self.transposed = transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.transposed)


class _Modules:
    """Calls modules as they are (4-bit, LoRA-wrapped, biased) and concatenates outputs."""

    def __init__(self, *modules: Any) -> None:
        self.modules = modules

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            out: torch.Tensor = self.modules[0](x)
            return out
        return torch.cat([module(x) for module in self.modules], dim=-1)


def _is_plain_linear(module: Any) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _fuse(modules: list[Any], transpose: bool = True) -> Linear:
    """One weight for several plain linears; the HF modules then view slices of it.

    Rebinding the HF parameters to views keeps the HF model working while the weights exist
    once in memory (a 7B model in bf16 is 13.5 GB; a second copy would not fit small cards).
    With ``transpose`` the one copy is stored (in, out) and the HF weights are transposed
    views of it.
    """
    if not all(_is_plain_linear(m) for m in modules):
        return _Modules(*modules)
    with torch.no_grad():
        if transpose:
            fused = torch.cat([m.weight.data.t() for m in modules], dim=1).contiguous()
            start = 0
            for module in modules:
                rows = module.weight.shape[0]
                module.weight.data = fused[:, start : start + rows].t()
                start += rows
            return _TransposedWeight(fused)
        if len(modules) == 1:
            return _Weight(modules[0].weight.data)
        fused = torch.cat([m.weight.data for m in modules], dim=0)
        start = 0
        for module in modules:
            rows = module.weight.shape[0]
            module.weight.data = fused[start : start + rows]
            start += rows
    return _Weight(fused)


@dataclass
class Layer:
    """One decoder layer: its two norms' weights and its four (fused) projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


def is_quantized(model: Any) -> bool:
    """Whether any layer holds bitsandbytes 4/8-bit weights."""
    return any(
        type(m).__name__ in {"Linear4bit", "Linear8bitLt"} or hasattr(m, "quant_state")
        for m in model.modules()
    )


def _unwrap(model: Any) -> Any:
    """The LlamaForCausalLM inside a peft wrapper; merges the adapter when it can."""
    if hasattr(model, "merge_and_unload"):
        if not is_quantized(model):
            log.info("merging the LoRA adapter into the base weights")
            return model.merge_and_unload()
        # Quantized base: keep the LoRA layers unmerged and call them as modules.
        return model.get_base_model()
    return model


WEIGHT_FORMATS = ("bf16", "fp8")


def _bf16_weight(linear: Linear) -> torch.Tensor:
    """The (out, in) bf16 weight of a plain (fused) projection; ValueError for modules that
    FP8 can't read (4-bit, an unmerged adapter)."""
    if isinstance(linear, _TransposedWeight):
        return linear.transposed.t()
    if isinstance(linear, _Weight):
        return linear.weight
    raise ValueError("FP8 weights need a plain bf16 model (not 4-bit, not an unmerged adapter)")


def _fp8_of(linear: Linear, keep_bf16: bool) -> Linear:
    """The FP8 version of a plain (fused) projection, holding the bf16 one as its twin when
    ``keep_bf16`` (for the routes that run it, ``model.fast.fp8_gemm.ROUTES``)."""
    from model.fast.fp8_gemm import Fp8Weight

    if isinstance(linear, Fp8Weight):
        return linear
    return Fp8Weight.from_weight(_bf16_weight(linear), bf16=linear if keep_bf16 else None)


def _fp8_of_check(linear: Linear) -> None:
    from model.fast.fp8_gemm import Fp8Weight

    if not isinstance(linear, Fp8Weight):
        _bf16_weight(linear)


def _linear_tensors(linear: Linear) -> list[torch.Tensor]:
    """The weight tensors a projection callable holds (its modules' parameters)."""
    if isinstance(linear, _TransposedWeight):
        return [linear.transposed]
    if isinstance(linear, _Weight):
        return [linear.weight]
    if isinstance(linear, _Modules):
        return [p.data for module in linear.modules for p in module.parameters()]
    return []


def _release(modules: list[Any]) -> None:
    """Point HF linears that view a fused bf16 weight at an empty tensor, so that the weight's
    memory goes once the fast engine drops it. The HF model can't run after this."""
    for module in modules:
        weight = module.weight
        weight.data = torch.empty((0, weight.shape[1]), dtype=weight.dtype, device=weight.device)


def _projections(layer: Any) -> list[Any]:
    attn, mlp = layer.self_attn, layer.mlp
    return [
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    ]


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class LlamaWeights:
    """A Llama model's dimensions and weights; raises ``ValueError`` for other models.

    ``weight_format="fp8"`` holds the decoder layers' projections as E4M3 weights with one
    scale per output channel (:meth:`use_fp8`, ``keep_bf16`` as there); the LM head and the
    embedding stay bf16.
    """

    def __init__(
        self, model: Any, weight_format: str = "bf16", *, keep_bf16: bool | None = None
    ) -> None:
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weight_format!r} (one of {WEIGHT_FORMATS})")
        llama = _unwrap(model)
        config = llama.config
        if getattr(config, "model_type", "llama") not in {"llama", "mistral"}:
            raise ValueError(f"the fast engine runs Llama models, not {config.model_type!r}")
        self.llama = llama
        self.config = config
        inner = llama.model
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.group = self.n_heads // self.n_kv
        self.eps = float(config.rms_norm_eps)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        self.embed = inner.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.vocab_size = int(llama.lm_head.weight.shape[0])
        self.final_norm = inner.norm.weight
        # lm_head keeps the (out, in) layout: it may be tied to the embedding table.
        self.lm_head = _fuse([llama.lm_head], transpose=False)
        self.layers = [
            Layer(
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
                qkv=_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=_fuse([layer.self_attn.o_proj]),
                gate_up=_fuse([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=_fuse([layer.mlp.down_proj]),
            )
            for layer in inner.layers
        ]
        self.weight_format = "bf16"
        self.bf16_twin = False
        if weight_format == "fp8":
            self.use_fp8(keep_bf16=keep_bf16)

    def use_fp8(self, keep_bf16: bool | None = None) -> None:
        """Quantize every layer's projections to FP8 (E4M3, per output channel), in place.

        A decode step reads each weight once: one byte instead of two halves its floor. The
        adapter is already merged (``_unwrap``). ``keep_bf16``: keep each projection's bf16
        weight as its twin, for the routes that run it; by default only when a route of
        ``model.fast.fp8_gemm.ROUTES`` does (``uses_bf16_twin``). Without it the bf16 weights
        are freed layer by layer (the HF modules' views of them too, so the HF model can't run
        afterwards), which takes the decoder's weights to about half of bf16's; nothing changes
        before every projection is known to be plain bf16 (``ValueError`` otherwise, the model
        left as it was). The LM head stays bf16 (it decides every token; quantizing it is the
        guard's separate row in bench/RESULTS.md). Graphs captured before must be dropped
        (``DecodeGraphs.clear``).
        """
        from model.fast.fp8_gemm import uses_bf16_twin

        keep = uses_bf16_twin() if keep_bf16 is None else keep_bf16
        for layer in self.layers:  # check them all first: a failure changes nothing
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                _fp8_of_check(linear)
        for layer, hf_layer in zip(self.layers, self.llama.model.layers, strict=True):
            layer.qkv = _fp8_of(layer.qkv, keep)
            layer.o = _fp8_of(layer.o, keep)
            layer.gate_up = _fp8_of(layer.gate_up, keep)
            layer.down = _fp8_of(layer.down, keep)
            if not keep:
                _release(_projections(hf_layer))
        if not keep and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the KV cache sizes itself from free memory
        self.weight_format = "fp8"
        self.bf16_twin = keep
        log.info(
            "decoder weights held in FP8 (E4M3, per-channel scales)%s; weights %.2f GB",
            ", bf16 twins kept" if keep else "",
            self.weight_bytes() / 1e9,
        )

    def weight_bytes(self) -> int:
        """Bytes of every weight the fast engine reads (embedding, norms, LM head, the
        projections, and their bf16 twins where kept), each storage counted once."""
        from model.fast.fp8_gemm import Fp8Weight

        tensors = [self.embed, self.final_norm, *_linear_tensors(self.lm_head)]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_norm]
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if isinstance(linear, Fp8Weight):
                    tensors += [linear.weight, linear.scale]
                    if linear.bf16 is not None:
                        tensors += _linear_tensors(linear.bf16)
                else:
                    tensors += _linear_tensors(linear)
        return _unique_bytes(tensors)

    def rope_tables(self, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary ``cos`` and ``sin`` of positions ``[0, max_seq_len)``, (T, head_dim) each,
        in the model's dtype on its device."""
        config = self.config
        # transformers 5 keeps these in rope_parameters; older configs in rope_theta/rope_scaling.
        rope: dict[str, Any] = dict(getattr(config, "rope_scaling", None) or {})
        rope.update(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta: Any = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        dim = self.head_dim
        if rope_type == "default":
            # Computed here in float32: a model cast to bf16 also casts HF's inv_freq buffer.
            inv_freq = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            scaling = 1.0
        else:
            rotary = self.llama.model.rotary_emb
            inv_freq = rotary.inv_freq.detach().float().cpu()
            scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * scaling).to(self.dtype).to(self.device)
        sin = (emb.sin() * scaling).to(self.dtype).to(self.device)
        return cos, sin
