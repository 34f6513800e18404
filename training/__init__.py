"""Offline QLoRA fine-tuning that turns (description, HTML page) pairs into a LoRA adapter.

``python -m training --data pages.jsonl --output-dir out/adapter`` trains; the output
folder loads through :func:`model.loading.load_model` as an adapter. The prompt template
comes from :mod:`model.prompting`, the same one inference uses.
"""

from training.config import TrainConfig
from training.errors import ConfigError, DataError, TrainingError

__all__ = ["ConfigError", "DataError", "TrainConfig", "TrainingError"]
