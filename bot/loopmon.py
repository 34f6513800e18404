"""Event-loop lag: how late a short sleep wakes up. Near zero unless something blocks."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class LagMonitor:
    """Measures the loop's lag every ``interval_s``; ``max_lag_s`` is the worst seen."""

    def __init__(self, interval_s: float = 0.1, warn_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.last_lag_s = 0.0
        self.max_lag_s = 0.0
        self.samples = 0

    async def run(self) -> None:
        """Loop forever; cancel the task to stop."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            self.last_lag_s = lag
            self.max_lag_s = max(self.max_lag_s, lag)
            self.samples += 1
            if lag > self.warn_s:
                log.warning("event loop lagged %.3f s", lag)
