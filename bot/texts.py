"""Everything the bot says to Discord users, in one place.

Plain strings and small functions that fill them in; no discord imports, so the texts can
be read, reviewed and changed (or translated) without touching the code that sends them.
"""

from __future__ import annotations

# -- status line of a job's message ---------------------------------------------------------

GENERATING = "⚙️ Generating your page…"
QUEUED = "⏳ Queued."
CANCELLED = "🛑 Cancelled."


def generating(tokens: int) -> str:
    return f"{GENERATING} {tokens} tokens so far." if tokens else GENERATING


def queued(position: int, queued_count: int, eta: str) -> str:
    return f"⏳ Queued: position {position} of {queued_count}, ready in about {eta}."


def cancelled_by(mention: str | None) -> str:
    return f"🛑 Cancelled by {mention}." if mention else CANCELLED


# -- how a job ended ------------------------------------------------------------------------

EXPIRED = (
    "⌛ Not run: Discord only lets a bot answer an interaction for 15 minutes, and your "
    "page would not have been ready in time. Please ask again when the queue is shorter."
)
SHUTDOWN_CANCELLED = (
    "🔌 The bot is restarting, so your queued request was cancelled. Please ask again in a "
    "few minutes."
)
SHUTDOWN_STOPPED = (
    "🔌 The bot is restarting and your page could not be finished in time. Please ask again "
    "in a few minutes."
)
SHUTDOWN_KEPT = (
    "🔌 The bot is restarting. Your request keeps its place in the queue and goes on when "
    "the bot is back (usually within a minute)."
)
NO_PAGE = "❌ The model's answer held no usable web page. Try rephrasing the prompt."
GENERATION_FAILED = "Generation failed."


def failed(error: str | None) -> str:
    return f"❌ {error or GENERATION_FAILED}"


def done(filename: str, job_id: str, *, kept: bool) -> str:
    """The job's message once its page goes out below it. It names ``/mypages`` too, so a
    message whose follow-up never arrives (the token died in between) still says where the
    page is."""
    where = f" It is also kept for you: `/mypages page:{job_id}`." if kept else ""
    return f"✅ Done: **{filename}** (below).{where}"


def done_in_thread(filename: str, label: str, thread_id: int) -> str:
    """A later version's message once the version is posted in the page's thread."""
    version = f" {label}" if label else ""
    return f"✅ Done: **{filename}**{version} is in the page's thread: <#{thread_id}>."


def upload_refused(status: int, job_id: str, *, kept: bool) -> str:
    again = (
        f"The page is kept: get it with `/mypages page:{job_id}`." if kept else "Please ask again."
    )
    return f"❌ Discord refused the upload ({status}). {again}"


# -- refusals and errors --------------------------------------------------------------------

SOMETHING_WRONG = "❌ Something went wrong on our side. It has been logged; please try again."
NOT_HERE = "⚠️ You can't use this command here."
UNKNOWN_COMMAND = (
    "⚠️ This command is not (or no longer) one of this bot's: Discord may still show an old "
    "version of it for a few minutes. Try `/html` again shortly."
)
QUEUE_UNAVAILABLE = "The queue is unavailable right now; please try again in a minute."
ALREADY_FINISHED = "This request has already finished or was cancelled."
ONLY_OWNER_CANCELS = "Only the person who asked for this page (or a server manager) can cancel it."


EMPTY_PROMPT = (
    "The prompt is empty. Describe the page you want, e.g. `a landing page for a bakery`."
)
NOT_IN_SERVER = "This bot isn't enabled in this server."
NOT_IN_CHANNEL = "This bot isn't enabled in this channel; try another channel."
ROLE_NEEDED = "You need one of the roles allowed to use this bot."
NO_PAGES_YET = "You have no saved pages yet. Make one with `/html`."
NO_SUCH_PAGE = "No saved page of yours has that id. `/mypages` lists them."
PAGES_HEADER = "**Your last pages** (get one again with `/mypages page:<id>`):"


def prompt_too_long(length: int, limit: int) -> str:
    return f"The prompt is {length} characters long; the limit is {limit}. Please shorten it."


def control_character(code_point: int) -> str:
    return f"The prompt contains a control character (U+{code_point:04X}). Please use plain text."


def unknown_style(style: str) -> str:
    return f"Unknown style {style!r}."


SHUTTING_DOWN = "The bot is shutting down and takes no new requests."


def user_limit(pending: int, limit: int) -> str:
    return (
        f"You already have {pending} request(s) pending (the limit is {limit}). "
        "Wait for one to finish, or cancel one."
    )


def queue_full(max_total: int, retry: str) -> str:
    return f"The queue is full ({max_total} requests). Please try again in about {retry}."


def warning(text: str) -> str:
    return f"⚠️ {text}"


def slow_down(retry_after_s: float) -> str:
    return f"⚠️ Slow down: try again in {retry_after_s:.0f} s."


# -- follow-ups of a page (its buttons) -------------------------------------------------------

PAGE_GONE = "That page is no longer kept, so it can't be changed. Make a new one with `/html`."
NOT_YOUR_PAGE = (
    "Only the person who made this page can refine, regenerate or restyle it. "
    "Make your own with `/html`."
)


def restyled(filename: str, label: str, style: str) -> str:
    return f"**{filename}** {label} · restyled: {style}"
