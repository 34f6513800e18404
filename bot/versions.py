"""Pages and their versions, as both page stores hand them out.

Every delivered result is one *version* of one *page*: ``/html`` makes v1 (its job id is the
page's id), and a refine, a regenerate or a style switch of any version adds the next number
to the same page. The two stores (``bot.store`` on disk, ``bot.queue.redis_pages`` in Redis)
keep the same metadata and share the types and rules here: how a version's metadata reads
back (pages written before versions existed read as v1 of their own page), how versions group
into pages, and which ones trimming drops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

PageKind = Literal["create", "refine", "regenerate", "restyle"]
KINDS: tuple[PageKind, ...] = ("create", "refine", "regenerate", "restyle")
# Versions kept per page (the first one always among them): a page refined again and again
# must not grow without bound while counting as one page against RESULTS_KEEP_PER_USER.
MAX_VERSIONS = 20


@dataclass(frozen=True)
class StoredPage:
    """One kept version of a page; the bytes are at ``path`` (None where not on disk).

    ``page_id`` is the job id of the page's first version; ``parent_job_id`` the version this
    one was made from (None for a page made from scratch). ``has_content`` says whether the
    structured content of a compose page was kept (``read_content`` of the store fetches it).
    ``message_id``/``channel_id``/``thread_id`` say where the version was posted, once
    ``set_message`` has recorded it.
    """

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
    page_id: str = ""
    version: int = 1
    parent_job_id: str | None = None
    kind: PageKind = "create"
    instruction: str | None = None
    has_content: bool = False
    message_id: int | None = None
    channel_id: int | None = None
    thread_id: int | None = None

    @property
    def label(self) -> str:
        """``v3``: how the version is shown to users."""
        return f"v{self.version}"


@dataclass(frozen=True)
class PageHistory:
    """One page with its kept versions, oldest (v1) first."""

    page_id: str
    versions: tuple[StoredPage, ...]

    @property
    def first(self) -> StoredPage:
        """The lowest kept version (v1: trimming never drops it)."""
        return self.versions[0]

    @property
    def latest(self) -> StoredPage:
        """The newest version."""
        return self.versions[-1]

    @property
    def updated_at(self) -> float:
        """When its newest version was saved: pages are listed and trimmed by this."""
        return max(version.created_at for version in self.versions)

    def version(self, number: int) -> StoredPage | None:
        """Version ``number``, or None if it is not kept."""
        return next((page for page in self.versions if page.version == number), None)

    @property
    def posted(self) -> StoredPage | None:
        """The newest version whose message is known: follow-ups reply to it (or post in
        its thread), so a page's versions stay in one conversation."""
        return next((page for page in reversed(self.versions) if page.message_id), None)


def check_kind(kind: str) -> PageKind:
    """``kind`` if it is one of :data:`KINDS`; ValueError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown page kind {kind!r} (one of {', '.join(KINDS)})")
    return cast(PageKind, kind)


def version_meta(
    *,
    parent_job_id: str | None,
    kind: str,
    instruction: str | None,
    content: str | None,
) -> dict[str, Any]:
    """The version fields a store writes beside the page's own metadata."""
    return {
        "parent_job_id": parent_job_id,
        "kind": check_kind(kind),
        "instruction": instruction,
        "has_content": content is not None,
    }


def page_from_meta(meta: Mapping[str, Any], *, created_at: float, path: Path | None) -> StoredPage:
    """A StoredPage from a store's metadata; fields missing in old metadata get the v1 defaults.

    Raises KeyError, TypeError or ValueError for metadata without the required fields.
    """
    job_id = str(meta["job_id"])
    kind = str(meta.get("kind") or "create")
    if kind not in KINDS:
        kind = "create"  # written by a newer bot: still readable
    return StoredPage(
        job_id=job_id,
        user_id=int(meta["user_id"]),
        filename=str(meta["filename"]),
        prompt=str(meta.get("prompt", "")),
        model=str(meta.get("model", "")),
        generated_tokens=int(meta.get("generated_tokens", 0)),
        seconds=float(meta.get("seconds", 0.0)),
        warnings=tuple(meta.get("warnings", ())),
        created_at=created_at,
        size=int(meta.get("size", 0)),
        path=path,
        page_id=str(meta.get("page_id") or job_id),
        version=int(meta.get("version") or 1),
        parent_job_id=_optional_str(meta.get("parent_job_id")),
        kind=cast(PageKind, kind),
        instruction=_optional_str(meta.get("instruction")),
        has_content=bool(meta.get("has_content", False)),
        message_id=_optional_int(meta.get("message_id")),
        channel_id=_optional_int(meta.get("channel_id")),
        thread_id=_optional_int(meta.get("thread_id")),
    )


def group_pages(versions: Iterable[StoredPage]) -> list[PageHistory]:
    """Versions grouped into pages: pages newest (last saved to) first, versions in order."""
    by_page: dict[str, list[StoredPage]] = {}
    for page in versions:
        by_page.setdefault(page.page_id, []).append(page)
    pages = [
        PageHistory(page_id, tuple(sorted(found, key=lambda p: (p.version, p.created_at))))
        for page_id, found in by_page.items()
    ]
    pages.sort(key=lambda page: page.updated_at, reverse=True)
    return pages


def newest_first(versions: Iterable[StoredPage]) -> list[StoredPage]:
    """Versions newest first, one entry each (what ``list`` returns)."""
    return sorted(versions, key=lambda page: page.created_at, reverse=True)


def to_trim(pages: list[PageHistory], keep_pages: int, max_versions: int) -> list[StoredPage]:
    """What trimming drops from ``pages`` (newest first, as :func:`group_pages` returns):
    every version of the pages past ``keep_pages``, and in each kept page the oldest versions
    past ``max_versions``, never its first."""
    gone: list[StoredPage] = []
    for page in pages[keep_pages:]:
        gone.extend(page.versions)
    for page in pages[:keep_pages]:
        excess = len(page.versions) - max_versions
        if excess > 0:
            gone.extend(page.versions[1 : 1 + excess])
    return gone


def _optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _optional_int(value: Any) -> int | None:
    if value is None or value == "" or value == b"":
        return None
    return int(value)
