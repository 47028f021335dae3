"""How many CPU threads torch uses in a run (``run.num_threads``).

On a 2-core machine under other load, torch's default (one thread per core) makes small models several
times slower: the threads spin waiting for a core. ``auto`` therefore counts the cores this process may
use, shares them among this machine's processes of the run, and leaves out the ones other work keeps
busy (the 1-minute load average when the run starts). A number is taken as it is; the demo recipes
use 1, which also makes their float reductions, and so their numbers, the same on every machine.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Union

logger = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_threads(cores: int, local_processes: int, load: Optional[float]) -> int:
    """``auto``: the process's share of the cores that other work leaves idle (at least 1)."""
    share = cores / max(local_processes, 1)
    if load is not None:  # measured before training starts: mostly other work (our imports add a little)
        share = min(share, (cores - load) / max(local_processes, 1))
    return max(1, math.floor(share + 0.5))


def choose_num_threads(setting: Union[str, int], local_processes: int = 1) -> tuple[int, str]:
    """``(threads, why)`` for ``run.num_threads``."""
    if setting != "auto":
        return int(setting), "run.num_threads"
    cores = available_cores()
    try:
        load: Optional[float] = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    threads = auto_threads(cores, local_processes, load)
    load_text = f"{load:.1f}" if load is not None else "unknown"
    return threads, f"auto: {cores} cores for {local_processes} process(es) here, 1-min load {load_text}"


def apply_num_threads(setting: Union[str, int], local_processes: int = 1) -> int:
    import torch

    threads, why = choose_num_threads(setting, local_processes)
    torch.set_num_threads(threads)
    logger.info("CPU threads per process: %d (%s)", threads, why)
    return threads
