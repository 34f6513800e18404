"""Offline QLoRA fine-tuning that turns (description, HTML page) pairs into a LoRA adapter.

One GPU (NF4 QLoRA by default on CUDA; fp32 LoRA on CPU)::

    python -m training --base codellama/CodeLlama-7b-Instruct-hf --output-dir out/html-lora
    python -m training --config run.yaml --resume          # continue from the last checkpoint

Several GPUs (DDP; the same flags)::

    accelerate launch --multi_gpu --num_processes 4 -m training --config run.yaml

The output folder loads through :func:`model.loading.load_model` as an adapter
(``resolve_spec(base=..., adapter="out/html-lora")``). The prompt template comes from
:mod:`model.prompting`, the same one inference uses.
"""

from training.config import TrainConfig
from training.errors import ConfigError, DataError, TrainingError

__all__ = ["ConfigError", "DataError", "TrainConfig", "TrainingError"]
