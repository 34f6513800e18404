"""A :class:`~bot.jobs.Job` as a flat ``str -> str`` dict: one Redis hash per job.

Flat fields rather than one JSON blob, so the Lua scripts of ``bot.queue.redis_scripts`` can
read and change single fields (``state``, ``attempts``, ``cancel_requested``...) without a
JSON library. Only the finished :class:`~model.types.GenerationResult` is stored as JSON: no
script looks inside it.

An optional field that is ``None`` is left out (a missing key decodes to ``None``); floats
are written with ``repr`` so they come back bit for bit.

Times: a Job keeps monotonic times, which mean nothing in another process. The scripts
stamp the hash with Redis's own clock (``deadline``, ``submitted_at``, ``started_at``,
``finished_at``, seconds since the epoch by Redis ``TIME``), and :func:`decode_job` turns
them back into this process's monotonic clock from one ``(redis_now, mono_now)`` pair.
``encode_job`` never writes them: the scripts own them.

The hash holds the interaction token (``delivery_token``): never log a hash or a field dict.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

from bot.jobs import DeliveryInfo, Job, JobState
from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    PageMode,
    SafetyPolicy,
    SamplingParams,
)

# Stamped by the Lua scripts in Redis time (seconds since the epoch, as decimal strings).
REDIS_TIME_FIELDS = ("deadline", "submitted_at", "started_at", "finished_at")


class CodecError(ValueError):
    """A job hash is missing a required field or holds a malformed value."""


def encode_job(job: Job) -> dict[str, str]:
    """The job's fields as strings (times excluded: see the module docstring)."""
    request = job.request
    sampling = request.sampling
    fields: dict[str, str] = {
        "id": job.job_id,
        "user_id": str(job.user_id),
        "user_name": job.user_name,
        "private": _flag(job.private),
        "prompt": request.prompt,
        "mode": request.mode.value,
        "safety": request.safety.value,
        "max_new_tokens": str(sampling.max_new_tokens),
        "temperature": repr(sampling.temperature),
        "top_p": repr(sampling.top_p),
        "repetition_penalty": repr(sampling.repetition_penalty),
        "state": job.state.value,
        "tokens_so_far": str(job.tokens_so_far),
        "attempts": str(job.attempts),
        "regenerated": _flag(job.regenerated),
        "cancel_requested": _flag(request.cancelled),
        "kind": job.kind,
    }
    optional: dict[str, object] = {
        "style": request.style,
        "seed": sampling.seed,
        "guild_id": job.guild_id,
        "channel_id": job.channel_id,
        "error": job.error,
        "cancel_note": job.cancel_note,
        "parent_job_id": job.parent_job_id,
        "description": request.description,
        "source_page": request.source_page,
        "source_content": request.source_content,
    }
    fields.update({key: str(value) for key, value in optional.items() if value is not None})
    if job.result is not None:
        fields["result"] = encode_result(job.result)
    if job.delivery is not None:
        fields.update(encode_delivery(job.delivery))
    return fields


def decode_job(
    fields: Mapping[str, str],
    *,
    redis_now: float | None = None,
    mono_now: float | None = None,
) -> Job:
    """Rebuild a Job from its hash.

    ``redis_now`` is Redis's clock at the moment the hash was read (a script's ``TIME``);
    with it, ``expires_at`` and the other times become monotonic times of this process.
    Without it the Redis-time fields are ignored (``expires_at`` is "now").
    """
    try:
        return _decode(fields, redis_now, time.monotonic() if mono_now is None else mono_now)
    except KeyError as exc:
        raise CodecError(f"job hash lacks field {exc.args[0]!r}") from None
    except ValueError as exc:
        # No field values in the message: the hash holds the interaction token.
        raise CodecError(f"malformed job hash ({type(exc).__name__})") from None


def _decode(fields: Mapping[str, str], redis_now: float | None, mono_now: float) -> Job:
    def mono(name: str) -> float | None:
        # A Redis time of this job, as a monotonic time here.
        value = fields.get(name)
        if value is None or value == "" or redis_now is None:
            return None
        return mono_now + float(value) - redis_now

    seed = fields.get("seed")
    sampling = SamplingParams(
        max_new_tokens=int(fields["max_new_tokens"]),
        temperature=float(fields["temperature"]),
        top_p=float(fields["top_p"]),
        repetition_penalty=float(fields["repetition_penalty"]),
        seed=None if seed is None else int(seed),
    )
    request = GenerationRequest(
        prompt=fields["prompt"],
        style=fields.get("style"),
        mode=PageMode(fields["mode"]),
        safety=SafetyPolicy(fields["safety"]),
        sampling=sampling,
        request_id=fields["id"],
        cancel_event=threading.Event(),
        description=fields.get("description"),
        source_page=fields.get("source_page"),
        source_content=fields.get("source_content"),
    )
    if fields.get("cancel_requested") == "1":
        request.cancel()
    expires_at = mono("deadline")
    created_at = mono("submitted_at")
    result = fields.get("result")
    return Job(
        user_id=int(fields["user_id"]),
        request=request,
        expires_at=mono_now if expires_at is None else expires_at,
        user_name=fields.get("user_name", ""),
        guild_id=_optional_int(fields.get("guild_id")),
        channel_id=_optional_int(fields.get("channel_id")),
        private=fields.get("private") == "1",
        created_at=mono_now if created_at is None else created_at,
        state=JobState(fields["state"]),
        started_at=mono("started_at"),
        finished_at=mono("finished_at"),
        tokens_so_far=int(fields.get("tokens_so_far", "0")),
        attempts=int(fields.get("attempts", "0")),
        regenerated=fields.get("regenerated") == "1",
        error=fields.get("error"),
        cancel_note=fields.get("cancel_note"),
        result=None if result is None else decode_result(result),
        delivery=decode_delivery(fields),
        parent_job_id=fields.get("parent_job_id"),
        kind=fields.get("kind", "create"),
    )


def encode_result(result: GenerationResult) -> str:
    """A GenerationResult as JSON."""
    return json.dumps(
        {
            "request_id": result.request_id,
            "text": result.text,
            "finish_reason": result.finish_reason.value,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "time_to_first_token_s": result.time_to_first_token_s,
            "total_s": result.total_s,
        },
        ensure_ascii=False,
    )


def decode_result(text: str) -> GenerationResult:
    """The inverse of :func:`encode_result`."""
    data = json.loads(text)
    return GenerationResult(
        request_id=str(data["request_id"]),
        text=str(data["text"]),
        finish_reason=FinishReason(data["finish_reason"]),
        prompt_tokens=int(data["prompt_tokens"]),
        generated_tokens=int(data["generated_tokens"]),
        time_to_first_token_s=float(data["time_to_first_token_s"]),
        total_s=float(data["total_s"]),
    )


def encode_delivery(delivery: DeliveryInfo) -> dict[str, str]:
    """The ``delivery_*`` fields (the token among them: a secret)."""
    return {
        "delivery_application_id": str(delivery.application_id),
        "delivery_token": delivery.token,
        "delivery_interaction_id": str(delivery.interaction_id),
        "delivery_shard_id": str(delivery.shard_id),
        "delivery_attachment_limit": str(delivery.attachment_limit),
    }


def decode_delivery(fields: Mapping[str, str]) -> DeliveryInfo | None:
    """The job's DeliveryInfo, or None when it was stored without one."""
    if "delivery_token" not in fields:
        return None
    return DeliveryInfo(
        application_id=int(fields["delivery_application_id"]),
        token=fields["delivery_token"],
        interaction_id=int(fields["delivery_interaction_id"]),
        shard_id=int(fields.get("delivery_shard_id", "0")),
        attachment_limit=int(fields.get("delivery_attachment_limit", "0")),
    )


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _optional_int(value: str | None) -> int | None:
    return None if value is None or value == "" else int(value)
