"""The bot's exceptions. Each carries the message a Discord user sees.

Handlers raise these and one place (``bot.commands.user_message_for``, used by
``tree.on_error`` and the button handler) turns any exception into a reply; only the
unexpected ones are logged with a traceback.
"""

from __future__ import annotations


class BotError(Exception):
    """Base class: ``str(error)`` is a message fit for the user who caused it."""


class InvalidPrompt(BotError):
    """The prompt is empty, too long or holds control characters."""


class NotAllowed(BotError):
    """This guild, channel or role may not use the bot."""


class QueueFull(BotError):
    """The queue holds ``queue_max_total`` jobs already."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UserLimitReached(BotError):
    """The user has ``queue_max_per_user`` jobs pending already."""


class QueueUnavailable(BotError):
    """The shared queue (Redis) can't be reached; the bot keeps running and retries."""

    def __init__(
        self, message: str = "The queue is unavailable right now; please try again in a minute."
    ) -> None:
        super().__init__(message)


class ShuttingDown(BotError):
    """The bot is stopping and takes no new jobs."""


class JobNotFound(BotError):
    """No such job (finished, cancelled, or never existed)."""


class NotPermitted(BotError):
    """The user may not act on this job (e.g. cancel someone else's)."""


class ResultNotFound(BotError):
    """No stored page with that id for this user."""


class GenerationFailed(BotError):
    """The engine raised for this job's batch; the job is failed with this message."""


class DeliveryExpired(BotError):
    """Discord answered 401/404: the interaction token can no longer be used."""
