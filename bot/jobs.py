"""A job: one user's request for one page, as it moves through the queue and the worker."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from model.types import GenerationRequest, GenerationResult, PageMode, SafetyPolicy


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # dropped: the interaction token would expire before delivery

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class DeliveryInfo:
    """What any process needs to answer a job's interaction: its webhook (application id and
    token, valid 15 minutes from the interaction's creation), and which shard received it.

    Stored with the job (the SQLite journal, Redis) so a restarted bot, or another shard, can
    still edit the status message and send the page. The token is a secret: never log it.
    """

    application_id: int
    token: str = field(repr=False)
    interaction_id: int
    shard_id: int = 0
    attachment_limit: int = 0  # bytes; 0: Discord's default


def new_job_id() -> str:
    """A short id users can type (``/mypages page:<id>``) and custom_ids can carry."""
    return secrets.token_hex(4)


@dataclass(eq=False)
class Job:
    """One /html request. ``expires_at`` is the monotonic time its interaction token dies.

    The scheduler and worker only read the plain fields; ``context`` holds whatever the
    Discord side needs (the interaction), so this module stays free of discord imports.
    """

    user_id: int
    request: GenerationRequest
    expires_at: float
    user_name: str = ""
    guild_id: int | None = None
    channel_id: int | None = None
    private: bool = False
    created_at: float = field(default_factory=time.monotonic)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    tokens_so_far: int = 0
    attempts: int = 0
    regenerated: bool = False  # generated again (another seed) after an empty page
    error: str | None = None
    cancel_note: str | None = None  # what to tell the user when it was cancelled for them
    result: GenerationResult | None = None
    delivery: DeliveryInfo | None = None
    # A follow-up of a delivered page (issue "iterate on a page"): the version it starts
    # from, and how ("refine": the request holds the instruction and the current page).
    parent_job_id: str | None = None
    kind: str = "create"  # create | refine | regenerate
    context: Any = None

    @property
    def job_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def style(self) -> str | None:
        return self.request.style

    @property
    def page_prompt(self) -> str:
        """What the page is about: the original description (a refine's prompt is its
        instruction)."""
        return self.request.page_prompt

    @classmethod
    def create(
        cls,
        *,
        user_id: int,
        prompt: str,
        ttl_s: float,
        style: str | None = None,
        sampling: Any = None,
        mode: PageMode = PageMode.DOCUMENT,
        safety: SafetyPolicy = SafetyPolicy.STANDARD,
        **fields: Any,
    ) -> Job:
        """A queued job with a fresh short id; ``ttl_s`` counts from now."""
        request = GenerationRequest(
            prompt=prompt, style=style, mode=mode, safety=safety, request_id=new_job_id()
        )
        if sampling is not None:
            request.sampling = sampling
        now = time.monotonic()
        return cls(
            user_id=user_id, request=request, expires_at=now + ttl_s, created_at=now, **fields
        )
