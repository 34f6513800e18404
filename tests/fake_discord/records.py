"""What the fake server records: requests, multipart parts, and per-interaction state."""

# Test helpers take a timeout argument on purpose: every wait in a test must be bounded.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .components import custom_ids, find_component

if TYPE_CHECKING:
    from .server import FakeDiscord

# Message flags (https://discord.com/developers/docs/resources/message#message-object-message-flags)
FLAG_HAS_THREAD = 1 << 5
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# Interaction callback types.
CB_PONG = 1
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_AUTOCOMPLETE = 8
CB_MODAL = 9


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8")


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, with the answer it gave.

    ``path`` is relative to the API base (``/api/v10``), e.g.
    ``/webhooks/123/abc/messages/@original``.
    """

    seq: int
    time: float  # event-loop clock (time.monotonic) when it arrived
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None  # the JSON body, or the payload_json part of a multipart body
    parts: list[Part] = field(default_factory=list)
    route: str = ""  # the route template, e.g. "POST /webhooks/{app_id}/{token}"
    interaction_id: int | None = None
    token: str | None = None  # the interaction token in the path, if any
    status: int = 0  # 0 until answered
    response: Any = None
    injected: bool = False  # answered by a fail_next() rule

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def files(self) -> list[Part]:
        """The parts that carry a file."""
        return [p for p in self.parts if p.filename is not None]

    @property
    def is_multipart(self) -> bool:
        return bool(self.parts)

    @property
    def content(self) -> str | None:
        """The message text the request sets, if any (JSON ``content`` or ``data.content``)."""
        body = self.json
        if not isinstance(body, dict):
            return None
        if "data" in body and isinstance(body["data"], dict) and "type" in body:
            body = body["data"]  # an interaction callback
        value = body.get("content")
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        files = [p.filename for p in self.files]
        return (
            f"<{self.seq} {self.method} {self.path} -> {self.status}"
            f"{' files=' + repr(files) if files else ''}>"
        )


RequestPredicate = Callable[[RecordedRequest], bool]


def request_matcher(
    method: str | None = None,
    path: str | None = None,
    *,
    token: str | None = None,
    status: int | None = None,
    ok: bool | None = None,
    predicate: RequestPredicate | None = None,
) -> RequestPredicate:
    """A predicate over recorded requests; ``path`` is a regular expression (``re.search``)."""
    pattern = re.compile(path) if path is not None else None

    def match(r: RecordedRequest) -> bool:
        if method is not None and r.method != method.upper():
            return False
        if pattern is not None and not pattern.search(r.path):
            return False
        if token is not None and r.token != token:
            return False
        if status is not None and r.status != status:
            return False
        if ok is not None and r.ok != ok:
            return False
        return predicate is None or predicate(r)

    return match


@dataclass
class FailureRule:
    """Answer the next ``remaining`` matching requests with ``status``."""

    match: RequestPredicate
    status: int
    remaining: int
    retry_after: float = 1.0
    is_global: bool = False
    body: dict[str, Any] | None = None
    hits: list[RecordedRequest] = field(default_factory=list)


class FakeInteraction:
    """An interaction the fake sent to the bot, with everything the bot did about it.

    Message state (``original``, ``followups``) is the fake server's view after all edits,
    like what the user would see in the Discord client.
    """

    def __init__(
        self,
        server: FakeDiscord,
        *,
        id: int,
        token: str,
        type: int,
        user_id: int,
        guild_id: int | None,
        channel_id: int,
        payload: dict[str, Any],
        created_wall: float,
        attachment_size_limit: int,
    ) -> None:
        self._server = server
        self.id = id
        self.token = token
        self.type = type
        self.user_id = user_id
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.payload = payload
        self.created_wall = created_wall  # epoch seconds encoded in the id
        self.attachment_size_limit = attachment_size_limit
        self.sent_at: float = 0.0  # loop clock when INTERACTION_CREATE went out
        # The shard of the gateway session it was sent on (None: an unsharded session).
        self.shard_id: int | None = None
        self.callback_type: int | None = None
        self.callback_at: float | None = None
        self.late_callbacks = 0  # callbacks refused because the 3 s window had passed
        self.original_message_id: int | None = None
        self.followup_ids: list[int] = []
        self.deleted_ids: list[int] = []
        self.expired_status: int | None = None  # set by FakeDiscord.expire()
        # The modal the bot opened (a MODAL callback): custom_id, title and components
        # (with the ids Discord gives them); and the MODAL_SUBMIT that answered it.
        self.modal: dict[str, Any] | None = None
        self.modal_submit: FakeInteraction | None = None

    # ----- what the bot did

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request about this interaction (callback and webhook calls), in order."""
        return list(self._server.requests_by_token.get(self.token, ()))

    @property
    def ok_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.ok]

    @property
    def callback_latency(self) -> float | None:
        """Seconds from INTERACTION_CREATE to the accepted callback."""
        return None if self.callback_at is None else self.callback_at - self.sent_at

    @property
    def deferred(self) -> bool:
        return self.callback_type in (CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE)

    @property
    def original(self) -> dict[str, Any] | None:
        if self.original_message_id is None:
            return None
        return self._server.messages.get(self.original_message_id)

    @property
    def original_content(self) -> str:
        """The original response's text as it is now ("" while there is none)."""
        return str((self.original or {}).get("content") or "")

    @property
    def followups(self) -> list[dict[str, Any]]:
        """Follow-up messages that still exist (the one that replaced a loading original isn't)."""
        return [
            self._server.messages[m]
            for m in self.followup_ids
            if m in self._server.messages and m != self.original_message_id
        ]

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The original response (if any) and the follow-ups, as the user sees them now."""
        out = [self.original] if self.original is not None else []
        return out + self.followups

    @property
    def delivered_files(self) -> list[Part]:
        """File parts of every request Discord accepted for this interaction."""
        return [p for r in self.ok_requests for p in r.files]

    def files_named(self, suffix: str) -> list[Part]:
        return [p for p in self.delivered_files if (p.filename or "").lower().endswith(suffix)]

    @property
    def html_files(self) -> list[Part]:
        return self.files_named(".html")

    @property
    def contents(self) -> list[str]:
        """Every message text the bot successfully set for this interaction, in order."""
        return [c for r in self.ok_requests if (c := r.content) is not None]

    @property
    def visible_text(self) -> str:
        """All message texts currently visible, joined (handy for substring assertions)."""
        parts = []
        for m in self.messages:
            parts.append(m.get("content") or "")
            for e in m.get("embeds") or []:
                parts.append(json.dumps(e, ensure_ascii=False))
        return "\n".join(parts)

    def is_ephemeral_reply(self) -> bool:
        m = self.original
        return bool(m and m.get("flags", 0) & FLAG_EPHEMERAL)

    def component(self, custom_id: str) -> dict[str, Any] | None:
        """The component ``custom_id`` on this interaction's newest visible message that
        carries it (a button, a select with its options...), or None."""
        for m in reversed(self.messages):
            found = find_component(m.get("components") or [], custom_id)
            if found is not None:
                return found
        return None

    def custom_ids(self, prefix: str = "") -> list[str]:
        """custom_ids of the components on this interaction's visible messages (those
        starting with ``prefix``: ``"htmlbot:cancel:"`` for the Cancel buttons alone)."""
        found: list[str] = []
        for m in self.messages:
            _collect_custom_ids(m.get("components") or [], found)
        return [custom_id for custom_id in found if custom_id.startswith(prefix)]

    # ----- waiting

    async def wait_for_request(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        timeout: float = 5.0,
        ok: bool | None = None,
        predicate: RequestPredicate | None = None,
    ) -> RecordedRequest:
        """Wait for an answered request about this interaction that matches.

        Raises ``TimeoutError`` listing this interaction's requests.
        """
        match = request_matcher(method, path, ok=ok, predicate=predicate)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for r in self.requests:
                        if r.status and match(r):
                            return r
                    await self._server._wait_changed()
        except TimeoutError:
            mine = "\n  ".join(repr(r) for r in self.requests[-15:])
            raise TimeoutError(
                f"no {method or '*'} {path or '*'} request for interaction {self.id} within "
                f"{timeout}s; its requests:\n  {mine}\nits messages: {self.contents!r}"
            ) from None

    async def wait_for_callback(self, timeout: float = 5.0) -> RecordedRequest:
        return await self.wait_for_request("POST", r"/callback$", timeout=timeout, ok=True)

    async def wait_for_file(self, suffix: str = ".html", timeout: float = 30.0) -> Part:
        """Wait until an accepted request carries a file ending in ``suffix``."""
        suffix = suffix.lower()
        await self.wait_for_request(
            timeout=timeout,
            ok=True,
            predicate=lambda r: any((p.filename or "").lower().endswith(suffix) for p in r.files),
        )
        return self.files_named(suffix)[0]

    async def wait_until(
        self, condition: Callable[[FakeInteraction], bool], timeout: float = 10.0
    ) -> None:
        """Wait until ``condition(self)`` holds, re-checking after every request."""
        await self._server.wait_until(lambda: condition(self), timeout=timeout)

    def __repr__(self) -> str:
        return (
            f"<FakeInteraction id={self.id} type={self.type} user={self.user_id} "
            f"callback={self.callback_type} requests={len(self.requests)}>"
        )


def _collect_custom_ids(components: list[dict[str, Any]], out: list[str]) -> None:
    out.extend(custom_ids(components))
