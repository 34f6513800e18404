"""The embedded model's conversion cache: keyed by content, shared, never pulled from a user.

The real GGUF -> Hugging Face conversion takes ~20 s, so a fast stand-in converter fills the
folder; everything else (digests, locks, staging, renames, clean-up) is the real code, and
"another process" is a real child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from model import folder_cache
from model.embedded import CACHE_SUBFOLDER, CONVERTED_FOLDER, converted_folder
from model.errors import ModelLoadError
from model.folder_cache import FolderCache, release_claims, sha256_of

REPO = Path(__file__).resolve().parents[2]
TWO_DAYS = 2 * 24 * 3600


class FakeConverter:
    """Writes a small "checkpoint" derived from the source bytes, and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, source: Path, destination: Path) -> None:
        self.calls.append(source)
        data = source.read_bytes()
        (destination / "config.json").write_text(json.dumps({"head": data[:16].hex()}))
        (destination / "model.safetensors").write_bytes(data[::-1])


def write_gguf(path: Path, payload: bytes) -> Path:
    """A GGUF-looking file: the magic, a version, then ``payload``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + payload)
    return path


def replace_file(path: Path, payload: bytes) -> None:
    """Swap in new content the way an upgrade does: a new file renamed over the old."""
    fresh = write_gguf(path.with_name(path.name + ".new"), payload)
    os.replace(fresh, path)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def cache_dir(root: Path) -> Path:
    return root / CACHE_SUBFOLDER


def versions(root: Path) -> list[Path]:
    return sorted(p for p in cache_dir(root).glob(CONVERTED_FOLDER + "-*") if p.is_dir())


@pytest.fixture(autouse=True)
def no_claims_left() -> Iterator[None]:
    yield
    release_claims()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "venv-a" / "model.gguf", os.urandom(64 * 1024))


CHILD_PRELUDE = """
import json, os, sys, time
from pathlib import Path
from model.embedded import converted_folder

def fake_convert(source, destination):
    data = source.read_bytes()
    (destination / "config.json").write_text(json.dumps({"head": data[:16].hex()}))
    (destination / "model.safetensors").write_bytes(data[::-1])
"""


def child(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    """Run ``code`` (after CHILD_PRELUDE) in a fresh Python process with ``args`` as argv."""
    script = CHILD_PRELUDE + textwrap.dedent(code)
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        process.wait(timeout=60)
    return process


def test_two_copies_of_one_file_share_one_conversion(
    root: Path, gguf: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "venv-b" / "model.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    convert = FakeConverter()

    first = converted_folder(root, source=gguf, convert=convert)
    second = converted_folder(root, source=copy, convert=convert)

    assert first == second
    assert convert.calls == [gguf]
    assert (first / "model.safetensors").read_bytes() == gguf.read_bytes()[::-1]
    assert versions(root) == [first]


def test_a_changed_file_converts_again(root: Path, gguf: Path) -> None:
    convert = FakeConverter()
    old = converted_folder(root, source=gguf, convert=convert)
    replace_file(gguf, b"other weights" * 100)

    new = converted_folder(root, source=gguf, convert=convert)

    assert new != old
    assert len(convert.calls) == 2
    assert (new / "model.safetensors").read_bytes() == gguf.read_bytes()[::-1]
    assert (old / "model.safetensors").read_bytes() != gguf.read_bytes()[::-1]


def test_the_digest_is_cached_by_path_size_and_mtime(
    root: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []

    def counting_sha256(path: Path) -> str:
        hashed.append(path)
        return sha256_of(path)

    monkeypatch.setattr(folder_cache, "sha256_of", counting_sha256)
    convert = FakeConverter()
    folder = converted_folder(root, source=gguf, convert=convert)
    assert converted_folder(root, source=gguf, convert=convert) == folder
    assert hashed == [gguf]  # the second start only stat()ed the file

    age(gguf, 60)  # same bytes, new mtime: hashed again, same folder, no new conversion
    assert converted_folder(root, source=gguf, convert=convert) == folder
    assert hashed == [gguf, gguf]
    assert len(convert.calls) == 1


def test_a_folder_in_use_by_another_process_is_not_deleted(root: Path, gguf: Path) -> None:
    old = converted_folder(root, source=gguf, convert=FakeConverter())
    release_claims()  # from here on only the child uses the old version
    user = child(
        """
        folder = converted_folder(Path(sys.argv[1]), source=Path(sys.argv[2]),
                                  convert=lambda s, d: sys.exit("must not convert"))
        print(folder, flush=True)
        sys.stdin.read()  # keep using it until the test closes stdin
        """,
        str(root),
        str(gguf),
        wait=False,
    )
    try:
        assert user.stdout is not None
        assert user.stdout.readline().strip() == str(old)
        age(old / folder_cache.READY_MARKER, TWO_DAYS)  # old enough to be cleaned up
        replace_file(gguf, b"upgraded weights" * 100)

        new = converted_folder(root, source=gguf, convert=FakeConverter())

        assert new != old
        assert (old / "model.safetensors").is_file()  # still in use: kept whole
    finally:
        user.communicate(timeout=30)
    assert user.returncode == 0, user.stderr

    # The child is gone; the next start removes the unused old version.
    assert converted_folder(root, source=gguf, convert=FakeConverter()) == new
    assert versions(root) == [new]
    assert not old.with_name(old.name + ".use").exists()


def test_an_unused_but_recent_version_is_kept(root: Path, gguf: Path) -> None:
    old = converted_folder(root, source=gguf, convert=FakeConverter())
    release_claims()
    replace_file(gguf, b"upgraded weights" * 100)
    new = converted_folder(root, source=gguf, convert=FakeConverter())
    assert versions(root) == sorted([old, new])


def test_a_crash_mid_conversion_leaves_nothing_that_is_used(root: Path, gguf: Path) -> None:
    crashed = child(
        """
        def dies_half_way(source, destination):
            (destination / "config.json").write_text("{}")
            os._exit(3)  # killed: no clean-up code runs

        converted_folder(Path(sys.argv[1]), source=Path(sys.argv[2]), convert=dies_half_way)
        """,
        str(root),
        str(gguf),
    )
    assert crashed.returncode == 3, crashed.stderr.read() if crashed.stderr else ""
    assert versions(root) == []
    (leftover,) = cache_dir(root).glob(".staging-*")

    convert = FakeConverter()
    folder = converted_folder(root, source=gguf, convert=convert)
    assert convert.calls == [gguf]  # converted anew, not taken from the half folder
    assert (folder / "model.safetensors").read_bytes() == gguf.read_bytes()[::-1]
    assert leftover.exists()  # fresh: maybe a build still running, so kept for now

    age(leftover, 3600)
    converted_folder(root, source=gguf, convert=convert)
    assert not leftover.exists()
    assert len(convert.calls) == 1


def test_a_stale_staging_folder_is_kept_while_a_build_runs(root: Path, gguf: Path) -> None:
    converted_folder(root, source=gguf, convert=FakeConverter())
    staging = cache_dir(root) / ".staging-0123456789abcdef-x"
    staging.mkdir()
    age(staging, 3600)
    cache = FolderCache(cache_dir(root), CONVERTED_FOLDER)
    with folder_cache._exclusive(cache.root / folder_cache.BUILD_LOCK):
        assert cache.clean_up() == []
    assert cache.clean_up() == [staging]


def test_two_processes_starting_together_convert_once(root: Path, gguf: Path) -> None:
    code = """
    def slow_convert(source, destination):
        with open(sys.argv[3], "a") as log:
            log.write("converted\\n")
        time.sleep(1.0)
        fake_convert(source, destination)

    print(converted_folder(Path(sys.argv[1]), source=Path(sys.argv[2]), convert=slow_convert))
    """
    calls = root.parent / "calls.txt"
    starters = [child(code, str(root), str(gguf), str(calls), wait=False) for _ in range(2)]
    outputs = [starter.communicate(timeout=60) for starter in starters]
    assert [starter.returncode for starter in starters] == [0, 0], outputs
    folders = {stdout.strip() for stdout, _ in outputs}
    assert len(folders) == 1
    assert calls.read_text().splitlines() == ["converted"]
    assert json.loads((Path(folders.pop()) / "config.json").read_text())["head"]


def test_a_failed_conversion_is_a_load_error_and_leaves_no_staging(root: Path, gguf: Path) -> None:
    def full_disk(source: Path, destination: Path) -> None:
        (destination / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelLoadError, match="could not prepare the converted model.*space"):
        converted_folder(root, source=gguf, convert=full_disk)
    assert list(cache_dir(root).glob(".staging-*")) == []
    assert versions(root) == []
