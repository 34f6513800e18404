"""Finished pages kept on disk, so nothing generated is lost (the local backend's page store).

Layout: ``<results_dir>/<user_id>/<job_id>.html`` next to ``<job_id>.json`` (metadata) and,
for a compose page, ``<job_id>.content`` (its structured content, JSON text). Each page is a
version of a page (see ``bot.versions``); the newest ``keep_per_user`` *pages* of each user are
kept, whole, and at most ``max_versions`` versions of each (the first always among them).
Every method is a coroutine: the files are read and written through aiofiles (a thread pool),
never on the event loop. Saves and ``set_message`` take one lock, so version numbers come out
distinct and in order; the local backend is one process, so an asyncio lock is enough.
The Redis backend's page store has the same API, with ``StoredPage.path`` None.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from bot.versions import (
    MAX_VERSIONS,
    PageHistory,
    StoredPage,
    group_pages,
    newest_first,
    page_from_meta,
    to_trim,
    version_meta,
)

__all__ = ["PageHistory", "ResultStore", "StoredPage"]

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")
_USER_FOLDER = re.compile(r"^[0-9]+$")


class ResultStore:
    """Per-user store of the last pages and their versions (see the module docstring)."""

    def __init__(
        self, root: Path, keep_per_user: int = 10, max_versions: int = MAX_VERSIONS
    ) -> None:
        if max_versions < 2:
            raise ValueError("max_versions must keep the first version and the newest")
        self.root = Path(root)
        self.keep_per_user = keep_per_user
        self.max_versions = max_versions
        self._lock = asyncio.Lock()

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
        parent_job_id: str | None = None,
        kind: str = "create",
        instruction: str | None = None,
        content: str | None = None,
    ) -> StoredPage:
        """Keep a version: the next one of the parent's page, or v1 of a new page.

        ``parent_job_id`` names the version this one was made from (refined, regenerated,
        restyled); if the user has no such version (trimmed, or never theirs) the result
        starts a page of its own. Saving a job id again replaces that version in place.
        The page and its metadata are written atomically, then the oldest pages and
        versions past the limits are dropped.
        """
        if not _JOB_ID.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        extra = version_meta(
            parent_job_id=parent_job_id, kind=kind, instruction=instruction, content=content
        )
        folder = self._folder(user_id)
        async with self._lock:
            await aiofiles.os.makedirs(folder, exist_ok=True)
            kept = await self._versions(user_id)
            page_id, version = _place(kept, job_id, parent_job_id)
            page_path = folder / f"{job_id}.html"
            await _write_atomic(page_path, data)
            content_path = page_path.with_suffix(".content")
            if content is None:
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(content_path)
            else:
                await _write_atomic(content_path, content.encode())
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
                "page_id": page_id,
                "version": version,
                **extra,
            }
            # The metadata last: a version is listed only once its files are complete.
            await _write_meta(page_path.with_suffix(".json"), meta)
            saved = page_from_meta(meta, created_at=meta["created_at"], path=page_path)
            await self._prune([page for page in kept if page.job_id != job_id] + [saved])
        return saved

    async def list(self, user_id: int) -> list[StoredPage]:
        """The user's kept versions, one entry each, newest first."""
        return newest_first(await self._versions(user_id))

    async def list_pages(self, user_id: int) -> builtins.list[PageHistory]:
        """The user's pages, newest (last saved to) first, each with its versions in order."""
        return group_pages(await self._versions(user_id))

    async def get(self, user_id: int, job_id: str) -> StoredPage | None:
        """One of the user's versions, or None (also for ids of other users' pages)."""
        if not _JOB_ID.match(job_id):
            return None
        return await self._load(self._folder(user_id) / f"{job_id}.json")

    async def get_version(self, user_id: int, page_id: str, version: int) -> StoredPage | None:
        """Version ``version`` of the user's page ``page_id``, or None."""
        for page in await self._versions(user_id):
            if page.page_id == page_id and page.version == version:
                return page
        return None

    async def get_page(self, user_id: int, page_id: str) -> PageHistory | None:
        """The user's page ``page_id`` with its versions in order, or None."""
        versions = [page for page in await self._versions(user_id) if page.page_id == page_id]
        return group_pages(versions)[0] if versions else None

    async def get_any(self, job_id: str) -> StoredPage | None:
        """A version whoever owns it (``user_id`` is the owner): for the owner check of the
        buttons under a page, where the caller decides who may do what. None if not kept."""
        if not _JOB_ID.match(job_id):
            return None
        found = await asyncio.to_thread(self._find_owner_folders, job_id)
        for folder in found:
            page = await self._load(folder / f"{job_id}.json")
            if page is not None:
                return page
        return None

    async def read(self, page: StoredPage) -> bytes:
        """The page's bytes. Raises FileNotFoundError if it was pruned meanwhile."""
        if page.path is None:
            raise FileNotFoundError(f"page {page.job_id} has no file")
        async with aiofiles.open(page.path, "rb") as handle:
            return await handle.read()

    async def read_content(self, page: StoredPage) -> str | None:
        """The structured content kept with a compose page (JSON text), or None if there is
        none (not a compose page, or pruned meanwhile)."""
        if page.path is None or not page.has_content:
            return None
        try:
            async with aiofiles.open(page.path.with_suffix(".content"), "rb") as handle:
                return (await handle.read()).decode()
        except FileNotFoundError:
            return None

    async def set_message(
        self,
        user_id: int,
        job_id: str,
        *,
        message_id: int | None = None,
        channel_id: int | None = None,
        thread_id: int | None = None,
    ) -> StoredPage | None:
        """Record where a version was posted (the ids given; the others stay as they were).
        The updated version, or None if the user has no such version."""
        if not _JOB_ID.match(job_id):
            return None
        meta_path = self._folder(user_id) / f"{job_id}.json"
        given = {"message_id": message_id, "channel_id": channel_id, "thread_id": thread_id}
        async with self._lock:
            if await self._load(meta_path) is None:
                return None
            meta = await _read_meta(meta_path)
            if meta is None:
                return None
            meta.update({key: value for key, value in given.items() if value is not None})
            await _write_meta(meta_path, meta)
        return await self._load(meta_path)

    def _folder(self, user_id: int) -> Path:
        return self.root / str(int(user_id))

    def _find_owner_folders(self, job_id: str) -> builtins.list[Path]:
        # Blocking (run in a thread): the user folders holding this job's metadata.
        try:
            folders = list(self.root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [
            folder
            for folder in folders
            if _USER_FOLDER.match(folder.name) and (folder / f"{job_id}.json").is_file()
        ]

    async def _versions(self, user_id: int) -> builtins.list[StoredPage]:
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
        return pages

    async def _load(self, meta_path: Path) -> StoredPage | None:
        meta = await _read_meta(meta_path)
        if meta is None:
            return None
        page_path = meta_path.with_suffix(".html")
        if not await aiofiles.os.path.isfile(page_path):
            return None
        try:
            return page_from_meta(
                meta, created_at=float(meta.get("created_at", 0.0)), path=page_path
            )
        except (KeyError, TypeError, ValueError):
            log.warning("malformed result metadata %s", meta_path)
            return None

    async def _prune(self, versions: builtins.list[StoredPage]) -> None:
        for page in to_trim(group_pages(versions), self.keep_per_user, self.max_versions):
            assert page.path is not None  # pages on disk always have one
            # The metadata first, so a half-pruned version is never listed.
            for suffix in (".json", ".html", ".content"):
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(page.path.with_suffix(suffix))


def _place(kept: list[StoredPage], job_id: str, parent_job_id: str | None) -> tuple[str, int]:
    """The page id and version number of a version being saved among ``kept``."""
    by_id = {page.job_id: page for page in kept}
    again = by_id.get(job_id)
    if again is not None:
        return again.page_id, again.version
    parent = by_id.get(parent_job_id) if parent_job_id else None
    if parent is None:
        return job_id, 1
    numbers = [page.version for page in kept if page.page_id == parent.page_id]
    return parent.page_id, max(numbers) + 1


async def _read_meta(meta_path: Path) -> dict[str, Any] | None:
    try:
        async with aiofiles.open(meta_path, encoding="utf-8") as handle:
            meta = json.loads(await handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("unreadable result metadata %s", meta_path)
        return None
    if not isinstance(meta, dict):
        log.warning("malformed result metadata %s", meta_path)
        return None
    return meta


async def _write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    await _write_atomic(meta_path, json.dumps(meta, ensure_ascii=False).encode())


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
