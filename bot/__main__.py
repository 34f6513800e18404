"""``python -m bot``: read the settings, load the model, run the bot until SIGINT/SIGTERM.

With ``QUEUE_BACKEND=redis`` no model is loaded here: ``python -m bot.worker`` processes
serve the shared queue, and any number of these (shards) share it.

Start-up problems (bad settings, a rejected token, a model that can't load, Discord out of
reach) end with one line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord

from bot.settings import Settings, SettingsError, load_settings
from model.build import EngineConfig, GeneratingEngine, build_engine
from model.errors import ModelError
from model.spec import resolve_spec

log = logging.getLogger("bot")

EXIT_SETTINGS = 2
EXIT_TOKEN = 3
EXIT_MODEL = 4
EXIT_DISCORD = 5


class StartupError(Exception):
    """A start-up failure; the message is the one line shown, ``code`` the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class RedactingFilter(logging.Filter):
    """Replaces the token wherever it would appear in a log record."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secret:
            return True
        message = record.getMessage()
        if self.secret in message:
            record.msg = message.replace(self.secret, "[redacted]")
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1])
            if self.secret in text:
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} (exception details hidden: they held the token)"
        return True


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``LOG_LEVEL``, never printing the token."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(settings.discord_token.get_secret_value()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # discord.py's DEBUG logs include gateway payloads; keep them at INFO unless asked.
    logging.getLogger("discord").setLevel(max(logging.INFO, root.level))


def engine_config(settings: Settings) -> EngineConfig:
    """The engine part of the settings (``ENGINE``, ``MAX_BATCH``...), for ``build_engine``."""
    return EngineConfig(
        kind=settings.engine,
        max_batch=settings.max_batch,
        max_new_tokens=settings.max_new_tokens,
        max_prompt_chars=settings.max_prompt_chars,
        cpu_threads=settings.cpu_threads,
        kv_cache=settings.kv_cache,
        speculation=settings.speculation,
    )


def load_engine(settings: Settings) -> GeneratingEngine:
    """Load the model and wrap it in the engine (blocking: run it in a thread)."""
    try:
        spec = resolve_spec(**settings.model_overrides())
        return build_engine(spec, engine_config(settings)).engine
    except ModelError as exc:
        raise StartupError(f"model: {exc}", EXIT_MODEL) from None


async def check_token(settings: Settings) -> None:
    """Log in over REST once, so a bad token fails fast, before the model loads."""
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        await http.static_login(settings.discord_token.get_secret_value())
    except discord.LoginFailure:
        raise StartupError(
            "DISCORD_TOKEN was rejected by Discord (401 Unauthorized); copy the bot token again "
            "from the Developer Portal.",
            EXIT_TOKEN,
        ) from None
    except (aiohttp.ClientError, OSError, discord.HTTPException) as exc:
        raise StartupError(
            f"cannot reach Discord at {settings.discord_api_base}: {type(exc).__name__}: {exc}",
            EXIT_DISCORD,
        ) from None
    finally:
        await http.close()


async def run(settings: Settings) -> None:
    """Check the token, load the model off the loop, run until a signal, shut down."""
    from bot.client import create_bot, point_at_discord

    point_at_discord(settings)
    await check_token(settings)
    # With Redis the model runs in `python -m bot.worker` processes, not here.
    engine = None
    if settings.queue_backend == "local":
        engine = await asyncio.to_thread(load_engine, settings)
    async with create_bot(settings, engine) as bot:
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []

        def on_signal(name: str) -> None:
            if not stopping:
                log.info("%s received: shutting down", name)
                stopping.append(asyncio.create_task(bot.close()))
            elif bot.worker is not None:
                # A second signal: don't wait for the deadline.
                log.info("%s received again: cancelling the running jobs", name)
                bot.worker.cancel_running()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig.name)
            except NotImplementedError:  # Windows: Ctrl-C raises KeyboardInterrupt instead
                break
        try:
            await bot.start(settings.discord_token.get_secret_value())
        except discord.LoginFailure:
            raise StartupError("DISCORD_TOKEN was rejected by Discord.", EXIT_TOKEN) from None
        except discord.PrivilegedIntentsRequired as exc:
            raise StartupError(f"Discord refused the connection: {exc}", EXIT_DISCORD) from None
        except (aiohttp.ClientError, OSError, discord.GatewayNotFound) as exc:
            raise StartupError(f"lost Discord: {type(exc).__name__}: {exc}", EXIT_DISCORD) from None
        if stopping:
            await stopping[0]


def print_settings_error(exc: SettingsError) -> None:
    """One ``error:`` line on stderr per problem, each naming its variable."""
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print_settings_error(exc)
        return EXIT_SETTINGS
    configure_logging(settings)
    try:
        asyncio.run(run(settings))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
