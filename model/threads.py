"""How many threads torch uses for CPU inference.

torch starts one intra-op thread per core. That is right on an idle machine, but the bot
often shares a small one (2 cores) with other processes, and then a parallel matmul waits
at its barrier for whichever of its threads lost its core: measured in bench/RESULTS.md
("CPU threads").
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

# cgroup v2 and v1 files that may cap the CPU time of a container below its visible cores.
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def available_cpus() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), lowered to a
    container's CPU quota (``docker --cpus``) when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """The CPU quota in cores, or None when unlimited or unknown."""
    try:
        limit, period = _CPU_MAX.read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(_CFS_QUOTA.read_text())
        return None if quota <= 0 else quota / int(_CFS_PERIOD.read_text())
    except (OSError, ValueError):
        return None


def default_cpu_threads(cores: int) -> int:
    """The thread count to use on ``cores`` cores when none is configured: all but one,
    and so one thread on 2 cores.

    Measured on the 2-core machine (bench/RESULTS.md, "CPU threads"; the embedded model,
    standard engine) while other processes kept the cores busy, which is the bot's usual
    situation there: one thread made 5.6 tokens/s and two 0.59 (9.6x slower); with one more
    busy process 2.6 against 0.26. A thread that loses its core stalls every parallel op of
    the others at its barrier, so a thread count that only wins on an idle machine loses
    badly on a shared one. Leaving one core free also keeps room for the bot's own other
    work (event loop, Chromium previews). Above 2 cores this is a reasoned guess, not a
    measurement: set ``CPU_THREADS`` there after running ``python -m bench.cpu_threads``.
    """
    return max(1, cores - 1)


def configure_cpu_threads(requested: int | None, *, device: str = "cpu") -> int:
    """Set torch's intra-op thread count for a model running on ``device``; returns the
    count torch now uses.

    ``requested`` is the configured count (the ``CPU_THREADS`` setting); None picks
    :func:`default_cpu_threads` for :func:`available_cpus`. On any device other than the
    CPU torch is left alone (its CPU threads only launch GPU work there) and the current
    count is returned.
    """
    import torch

    if torch.device(device).type != "cpu":
        return int(torch.get_num_threads())
    if requested is not None and requested < 1:
        raise ValueError(f"CPU threads must be at least 1, got {requested}")
    cores = available_cpus()
    threads = requested if requested is not None else default_cpu_threads(cores)
    if threads > cores:
        log.warning("%d CPU threads on %d available cores: they will compete", threads, cores)
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s) (%d cores available)", threads, cores)
    return threads
