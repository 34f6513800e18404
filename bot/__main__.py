"""``python -m bot``: read the settings, load the model, run the bot until SIGINT/SIGTERM.

Start-up problems (bad settings, a rejected token, a model that can't load, Discord out of
reach) end with one line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import aiohttp
import discord

from bot.settings import Settings, SettingsError, load_settings

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


def load_engine(settings: Settings) -> Any:
    """Load the model and wrap it in the engine (blocking: run it in a thread)."""
    from model.errors import ModelError
    from model.loading import load_model
    from model.spec import resolve_spec
    from model.threads import configure_cpu_threads

    try:
        spec = resolve_spec(**settings.model_overrides())
        log.info("loading model %s (base %s, adapter %s)", spec.name, spec.base, spec.adapter)
        loaded = load_model(spec)
        threads = configure_cpu_threads(settings.cpu_threads, device=str(loaded.device))
        if loaded.device.type == "cpu":
            log.info("generating on the CPU with %d torch thread(s)", threads)
        on_gpu = loaded.device.type == "cuda"
        if settings.engine == "continuous" or (settings.engine == "auto" and on_gpu):
            engine = _continuous_engine(loaded, settings, on_gpu=on_gpu)
            if engine is not None:
                return engine
        from model.engine import Engine

        return Engine(loaded)
    except ModelError as exc:
        raise StartupError(f"model: {exc}", EXIT_MODEL) from None


def _continuous_engine(loaded: Any, settings: Settings, *, on_gpu: bool) -> Any | None:
    """The continuous-batching engine; None (ENGINE=auto) when the model can't use it."""
    from model.fast_engine import FastEngine, FastEngineOptions

    # An explicit MAX_BATCH also bounds the KV cache; unset, it is sized from free memory.
    # Each slot holds a whole prompt (the template's few dozen tokens plus MAX_PROMPT_CHARS at two
    # characters a token or more) and a whole answer, so no answer is cut short by the cache.
    prompt_tokens = 256 + settings.max_prompt_chars // 2
    options = FastEngineOptions(
        max_slots=settings.max_batch,
        max_seq_len=max(FastEngineOptions.max_seq_len, prompt_tokens + settings.max_new_tokens),
    )
    try:
        engine = FastEngine.from_loaded(loaded, options)
    except ValueError as exc:  # not a Llama-family model
        if settings.engine == "continuous":
            raise StartupError(f"ENGINE=continuous: {exc}", EXIT_MODEL) from None
        log.warning("continuous engine unavailable (%s); using the standard one", exc)
        return None
    if on_gpu:
        # Capture the CUDA graphs now (~30 s for a 7B model), not on users' first jobs.
        log.info("continuous-batching engine: capturing CUDA graphs")
        engine.warmup(settings.batch_size(engine))
    return engine


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
    from bot.client import HtmlBot, point_at_discord

    point_at_discord(settings)
    await check_token(settings)
    engine = await asyncio.to_thread(load_engine, settings)
    async with HtmlBot(settings, engine) as bot:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
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
