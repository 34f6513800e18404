"""Finished pages kept on disk, so nothing generated is lost.

Layout: ``<results_dir>/<user_id>/<job_id>.html`` next to ``<job_id>.json`` (metadata).
Only the newest ``keep_per_user`` pages of each user are kept. Every method blocks on the
file system: the bot calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")


@dataclass(frozen=True)
class StoredPage:
    """Metadata of one kept page; the bytes are at ``path``."""

    job_id: str
    user_id: int
    filename: str
    prompt: str
    model: str
    generated_tokens: int
    seconds: float
    warnings: tuple[str, ...]
    created_at: float
    size: int
    path: Path


class ResultStore:
    """Per-user store of the last pages (see the module docstring)."""

    def __init__(self, root: Path, keep_per_user: int = 10) -> None:
        self.root = Path(root)
        self.keep_per_user = keep_per_user

    def save(
        self,
        *,
        user_id: int,
        job_id: str,
        filename: str,
        data: bytes,
        prompt: str,
        model: str,
        generated_tokens: int = 0,
        seconds: float = 0.0,
        warnings: tuple[str, ...] = (),
    ) -> StoredPage:
        """Write the page and its metadata atomically, then drop the user's oldest pages."""
        if not _JOB_ID.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        folder = self._folder(user_id)
        folder.mkdir(parents=True, exist_ok=True)
        page_path = folder / f"{job_id}.html"
        _write_atomic(page_path, data)
        meta = {
            "job_id": job_id,
            "user_id": user_id,
            "filename": filename,
            "prompt": prompt,
            "model": model,
            "generated_tokens": generated_tokens,
            "seconds": round(seconds, 3),
            "warnings": list(warnings),
            "created_at": time.time(),
            "size": len(data),
        }
        _write_atomic(folder / f"{job_id}.json", json.dumps(meta, ensure_ascii=False).encode())
        self._prune(user_id)
        return self._from_meta(meta, page_path)

    def list(self, user_id: int) -> list[StoredPage]:
        """The user's kept pages, newest first."""
        folder = self._folder(user_id)
        if not folder.is_dir():
            return []
        pages = []
        for meta_path in folder.glob("*.json"):
            page = self._load(meta_path)
            if page is not None:
                pages.append(page)
        pages.sort(key=lambda page: page.created_at, reverse=True)
        return pages

    def get(self, user_id: int, job_id: str) -> StoredPage | None:
        """One of the user's pages, or None (also for ids of other users' pages)."""
        if not _JOB_ID.match(job_id):
            return None
        return self._load(self._folder(user_id) / f"{job_id}.json")

    def read(self, page: StoredPage) -> bytes:
        return page.path.read_bytes()

    def _folder(self, user_id: int) -> Path:
        return self.root / str(int(user_id))

    def _load(self, meta_path: Path) -> StoredPage | None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable result metadata %s", meta_path)
            return None
        page_path = meta_path.with_suffix(".html")
        if not page_path.is_file():
            return None
        return self._from_meta(meta, page_path)

    @staticmethod
    def _from_meta(meta: dict, path: Path) -> StoredPage:
        return StoredPage(
            job_id=str(meta["job_id"]),
            user_id=int(meta["user_id"]),
            filename=str(meta["filename"]),
            prompt=str(meta.get("prompt", "")),
            model=str(meta.get("model", "")),
            generated_tokens=int(meta.get("generated_tokens", 0)),
            seconds=float(meta.get("seconds", 0.0)),
            warnings=tuple(meta.get("warnings", ())),
            created_at=float(meta.get("created_at", 0.0)),
            size=int(meta.get("size", 0)),
            path=path,
        )

    def _prune(self, user_id: int) -> None:
        for page in self.list(user_id)[self.keep_per_user :]:
            for path in (page.path, page.path.with_suffix(".json")):
                path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
