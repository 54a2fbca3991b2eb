"""How many threads this process's pools (torch's intra-op threads, faiss's OpenMP threads) get:
its share of the machine, not every core.

Measured on this 2-core machine: under a load average of 12–17 a default training step took
2.0 s with torch on both cores against 0.013 s idle, because an OpenMP parallel region waits for
its slowest thread and a thread on a busy core is descheduled for a whole time slice. So a process
uses the cores of its affinity mask that other processes leave idle (others_busy_cores: measured
right now from /proc/stat and lately from the load average, each less this process's own CPU
time). At least one thread; `EMBEDDING_LAB_THREADS` (a whole number >= 1)
overrides the measure. The answer is kept for SHARE_SECONDS, so callers may ask per epoch or
per request.

A leaf module (os and time only): core.training and core.explore both size their pools here.
"""
from __future__ import annotations

import os
import time
from typing import Optional

ENV = "EMBEDDING_LAB_THREADS"
SAMPLE_SECONDS = 0.1  # the window the idle cores are measured over
SHARE_SECONDS = 30.0  # how long a measured share is reused

_kept: Optional[tuple[float, int]] = None  # (monotonic time, threads)


def affinity_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_share() -> int:
    """The threads this process's pools should use now: EMBEDDING_LAB_THREADS when set, else the
    affinity cores that other processes leave idle (at least 1)."""
    global _kept
    override = os.environ.get(ENV)
    if override is not None and override.strip():
        try:
            threads = int(override)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{ENV} must be a whole number >= 1, got {override!r}")
        return threads
    now = time.monotonic()
    if _kept is not None and now - _kept[0] < SHARE_SECONDS:
        return _kept[1]
    cores = affinity_cores()
    busy = others_busy_cores()
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    _kept = (now, threads)
    return threads


def others_busy_cores(window: float = SAMPLE_SECONDS) -> float:
    """How many of this process's cores other processes keep busy: the larger of two measures,
    since each misses what the other sees. Right now: /proc/stat's per-core busy time over the
    last `window` seconds, less this process's own CPU time (this catches load that just began).
    Lately: the 1-minute load average less what this process itself ran lately (this catches
    bursty load that a short window can miss: with 0.1 s alone, a training process on a shared
    2-core machine once picked 2 threads and its epoch took 4× the CPU time)."""
    return max(_busy_now(window), _busy_lately())


RECENT_SECONDS = 90.0  # a reading this recent starts the next window: no wait
_reading: Optional[tuple[float, tuple[int, int], float]] = None  # (monotonic, _core_times, _own_cpu) last read


def _busy_now(window: float) -> float:
    """Other processes' busy cores over the time since this process last read /proc/stat, when
    that was between `window` and RECENT_SECONDS ago; else over a fresh `window` it waits out.
    So a process that asks every SHARE_SECONDS (a training epoch, a search request) waits only
    the first time: a 0.1 s wait each time was 0.1 s of an app's request, and a third of a
    percent of a training epoch."""
    global _reading
    try:
        cores = os.sched_getaffinity(0)
        now = time.monotonic()
        if _reading is not None and window <= now - _reading[0] <= RECENT_SECONDS:
            started, before, own_before = _reading
        else:
            started, before, own_before = now, _core_times(cores), _own_cpu()
            time.sleep(window)
        after, own_after, ended = _core_times(cores), _own_cpu(), time.monotonic()
    except (OSError, AttributeError, ValueError):
        return 0.0
    _reading = (ended, after, own_after)
    elapsed = ended - started
    total = after[0] - before[0]
    if total <= 0:
        return 0.0
    busy_fraction = (after[1] - before[1]) / total  # of the cores' time, summed over them
    own = (own_after - own_before) / max(elapsed, 1e-9)  # cores this process used meanwhile
    return max(0.0, busy_fraction * len(cores) - own)


_since: Optional[tuple[float, float]] = None  # (monotonic time, own CPU seconds) at the last look


def _busy_lately() -> float:
    """The 1-minute load average less the cores this process used since it last looked."""
    global _since
    try:
        load = float(os.getloadavg()[0])  # over the whole machine: scaled to this process's cores
        load *= affinity_cores() / max(os.cpu_count() or 1, affinity_cores())
    except (OSError, AttributeError):
        return 0.0
    now, cpu = time.monotonic(), _own_cpu()
    # at the first look this process has barely entered the 1-minute average: count none of it
    own = 0.0 if _since is None else (cpu - _since[1]) / max(now - _since[0], 1e-9)
    _since = (now, cpu)
    return max(0.0, load - own)


def _core_times(cores: set[int]) -> tuple[int, int]:
    """(total, busy) clock ticks of `cores` since boot, from /proc/stat's cpuN lines."""
    total = busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) not in cores:
                continue
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    if total == 0:
        raise ValueError("/proc/stat has no line for this process's cores")
    return total, busy


def _own_cpu() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = os.times()
    return times.user + times.system


def use_share() -> int:
    """Set torch's intra-op threads to this process's share (thread_share); returns it."""
    import torch

    threads = thread_share()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_kept_memory = False


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step, instead of
    giving it back to the system and faulting it in again: blocks up to 32 MB come from the heap
    (not a fresh mmap each), and the heap is trimmed only past 1 GB free. Measured on this 2-core
    machine: the small CNN's backward at batch 256 took 70 ms instead of 81–92 ms (the CPU share
    of the faults). The process keeps its peak memory until it exits, which suits a training
    worker and not a long-lived app, so only training calls this. True when set (glibc only;
    elsewhere nothing changes)."""
    global _kept_memory
    if _kept_memory:
        return True
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    _kept_memory = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) \
        & bool(mallopt(_M_TOP_PAD, 64 << 20))
    return _kept_memory
