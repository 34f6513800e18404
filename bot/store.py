"""Finished pages kept on disk, so nothing generated is lost (the local backend's page store).

Layout: ``<results_dir>/<user_id>/<job_id>.html`` next to ``<job_id>.json`` (metadata).
Only the newest ``keep_per_user`` pages of each user are kept. Every method is a coroutine:
the files are read and written through aiofiles (a thread pool), never on the event loop.
The Redis backend's page store has the same API, with ``StoredPage.path`` None.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")


@dataclass(frozen=True)
class StoredPage:
    """Metadata of one kept page; the bytes are at ``path`` (None where not on disk)."""

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
    path: Path | None


class ResultStore:
    """Per-user store of the last pages (see the module docstring)."""

    def __init__(self, root: Path, keep_per_user: int = 10) -> None:
        self.root = Path(root)
        self.keep_per_user = keep_per_user

    async def save(
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
        await aiofiles.os.makedirs(folder, exist_ok=True)
        page_path = folder / f"{job_id}.html"
        await _write_atomic(page_path, data)
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
        # The metadata last: a page is listed only once both files are complete.
        await _write_atomic(
            folder / f"{job_id}.json", json.dumps(meta, ensure_ascii=False).encode()
        )
        await self._prune(user_id)
        return self._from_meta(meta, page_path)

    async def list(self, user_id: int) -> list[StoredPage]:
        """The user's kept pages, newest first."""
        folder = self._folder(user_id)
        try:
            names = await aiofiles.os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        pages = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            page = await self._load(folder / name)
            if page is not None:
                pages.append(page)
        pages.sort(key=lambda page: page.created_at, reverse=True)
        return pages

    async def get(self, user_id: int, job_id: str) -> StoredPage | None:
        """One of the user's pages, or None (also for ids of other users' pages)."""
        if not _JOB_ID.match(job_id):
            return None
        return await self._load(self._folder(user_id) / f"{job_id}.json")

    async def read(self, page: StoredPage) -> bytes:
        """The page's bytes. Raises FileNotFoundError if it was pruned meanwhile."""
        if page.path is None:
            raise FileNotFoundError(f"page {page.job_id} has no file")
        async with aiofiles.open(page.path, "rb") as handle:
            return await handle.read()

    def _folder(self, user_id: int) -> Path:
        return self.root / str(int(user_id))

    async def _load(self, meta_path: Path) -> StoredPage | None:
        try:
            async with aiofiles.open(meta_path, encoding="utf-8") as handle:
                meta = json.loads(await handle.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable result metadata %s", meta_path)
            return None
        page_path = meta_path.with_suffix(".html")
        if not await aiofiles.os.path.isfile(page_path):
            return None
        try:
            return self._from_meta(meta, page_path)
        except (KeyError, TypeError, ValueError):
            log.warning("malformed result metadata %s", meta_path)
            return None

    @staticmethod
    def _from_meta(meta: dict[str, Any], path: Path) -> StoredPage:
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

    async def _prune(self, user_id: int) -> None:
        for page in (await self.list(user_id))[self.keep_per_user :]:
            assert page.path is not None  # pages on disk always have one
            # The metadata first, so a half-pruned page is never listed.
            for path in (page.path.with_suffix(".json"), page.path):
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(path)


async def _write_atomic(path: Path, data: bytes) -> None:
    # A unique temporary name in the same folder, then one rename: readers see the old
    # file or the new one, never a half-written one.
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(6)}")
    try:
        async with aiofiles.open(tmp, "wb") as handle:
            await handle.write(data)
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(tmp)
        raise
