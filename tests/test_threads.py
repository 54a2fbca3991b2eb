"""Each process sizes its thread pools to its share of the cores (core.threads): the affinity
cores other processes leave idle, or EMBEDDING_LAB_THREADS."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import threads
from core.threads import ENV, thread_share, use_share


@pytest.fixture
def fresh_share(monkeypatch):
    """No kept share, no override, no real waiting."""
    monkeypatch.setattr(threads, "_kept", None)
    monkeypatch.setattr(threads, "_since", None)
    monkeypatch.setattr(threads, "_reading", None)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    previous = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(previous)


def fake_cores(monkeypatch, cores: set[int], busy_fraction: float, load: float = 0.0):
    """/proc/stat says the cores were busy `busy_fraction` of the window, none of it this
    process's; the 1-minute load average is `load` on a machine of just these cores."""
    readings = iter([(0, 0), (1000, int(1000 * busy_fraction))])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: cores)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: len(cores))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "_core_times", lambda which: next(readings))
    monkeypatch.setattr(threads, "_own_cpu", lambda: 0.0)


@pytest.mark.parametrize("busy, expected", [(0.0, 4), (0.5, 2), (0.8, 1), (1.0, 1)])
def test_the_share_is_the_cores_others_leave_idle(fresh_share, busy, expected):
    fake_cores(fresh_share, {0, 1, 2, 3}, busy)
    assert thread_share() == expected


def test_load_the_short_window_missed_still_counts(fresh_share):
    # idle in the 0.1 s window, but the last minute's load average says two other processes ran
    fake_cores(fresh_share, {0, 1}, 0.0, load=2.0)
    assert thread_share() == 1


def test_the_processs_own_recent_work_is_not_counted_as_load(fresh_share):
    cpu = iter([0.0, 60.0])  # 60 CPU-seconds of its own in the minute between the two looks
    fake_cores(fresh_share, {0, 1}, 0.0, load=1.0)
    fresh_share.setattr(threads, "_own_cpu", lambda: next(cpu))
    clock = iter([0.0, 60.0])
    fresh_share.setattr(threads.time, "monotonic", lambda: next(clock))
    threads._busy_lately()  # the first look
    assert threads._busy_lately() == 0.0  # the load of 1 was this process's own


def test_the_share_is_kept_for_a_while_and_sets_torch(fresh_share):
    fake_cores(fresh_share, {0, 1}, 1.0)  # two busy loops on two cores
    torch.set_num_threads(2)
    assert use_share() == 1 and torch.get_num_threads() == 1
    assert thread_share() == 1  # kept: a second measure would need a third /proc/stat reading


def test_a_later_measure_reads_the_time_since_the_last_one_without_waiting(fresh_share):
    """The first measure waits out a window; once the kept share expires, the next one measures
    over the time since the last reading (one busy core of two in that minute) and never sleeps."""
    fake_cores(fresh_share, {0, 1}, 0.0)
    readings = iter([(0, 0), (100, 0), (12_100, 6_000)])  # idle window, then half the ticks busy
    fresh_share.setattr(threads, "_core_times", lambda which: next(readings))
    now = [0.0]
    fresh_share.setattr(threads.time, "monotonic", lambda: now[0])
    slept = []
    fresh_share.setattr(threads.time, "sleep", slept.append)
    assert threads._busy_now(0.1) == 0.0 and slept == [0.1]
    now[0] = 60.0
    assert threads._busy_now(0.1) == pytest.approx(1.0)  # one of the two cores, over the 60 s between
    assert slept == [0.1]  # no second wait


def test_the_environment_overrides_the_measure(fresh_share):
    fresh_share.setenv(ENV, "3")
    assert thread_share() == 3
    fresh_share.setenv(ENV, "none")
    with pytest.raises(ValueError, match="EMBEDDING_LAB_THREADS must be a whole number >= 1, got 'none'"):
        thread_share()


def test_the_measure_reads_this_machine(monkeypatch):
    # the real /proc/stat (or the load average elsewhere): a number of busy cores, never negative
    monkeypatch.setattr(threads, "_kept", None)
    monkeypatch.delenv(ENV, raising=False)
    assert threads.others_busy_cores(0.01) >= 0
    assert 1 <= thread_share() <= threads.affinity_cores()


FREE_AND_MEASURE = """
import ctypes, ctypes.util, os, sys
sys.path.insert(0, {root!r})
from core.threads import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * page
size = 16 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
held = resident()
libc.free(block)
print(held - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("keep", [False, True])
def test_a_training_process_keeps_the_memory_a_step_frees(keep):
    """With keep_freed_memory (what build_training sets on a CPU) a freed 16 MB block stays
    resident for the next step; glibc's default gives it back to the system (a fresh mmap and
    page faults each step)."""
    root = str(Path(__file__).resolve().parent.parent)
    given_back = int(subprocess.run([sys.executable, "-c", FREE_AND_MEASURE.format(root=root, keep=keep)],
                                    capture_output=True, text=True, check=True, timeout=120).stdout)
    if keep:
        assert given_back < 1 << 20
    else:
        assert given_back >= 15 << 20
