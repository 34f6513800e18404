"""The model package: specs, loading, the prompt template, batched generation, HTML pages.

Importing ``model`` is cheap: torch and transformers load only with the modules that need
them (``model.loading``, ``model.engine``).
"""

from model.errors import ModelError
from model.spec import PRESETS, ModelSpec, Quantization, resolve_spec
from model.types import FinishReason, GenerationRequest, GenerationResult, SamplingParams

__all__ = [
    "PRESETS",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "ModelError",
    "ModelSpec",
    "Quantization",
    "SamplingParams",
    "resolve_spec",
]
