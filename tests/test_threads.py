"""Each process sizes its thread pools to its share of the cores (core.threads): the affinity
cores other processes leave idle, or EMBEDDING_LAB_THREADS."""
import pytest
import torch

from core import threads
from core.threads import ENV, thread_share, use_share


@pytest.fixture
def fresh_share(monkeypatch):
    """No kept share, no override, no real waiting."""
    monkeypatch.setattr(threads, "_kept", None)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    previous = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(previous)


def fake_cores(monkeypatch, cores: set[int], busy_fraction: float):
    """/proc/stat says the cores were busy `busy_fraction` of the window, none of it this process's."""
    readings = iter([(0, 0), (1000, int(1000 * busy_fraction))])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: cores)
    monkeypatch.setattr(threads, "_core_times", lambda which: next(readings))
    monkeypatch.setattr(threads, "_own_cpu", lambda: 0.0)


@pytest.mark.parametrize("busy, expected", [(0.0, 4), (0.5, 2), (0.8, 1), (1.0, 1)])
def test_the_share_is_the_cores_others_leave_idle(fresh_share, busy, expected):
    fake_cores(fresh_share, {0, 1, 2, 3}, busy)
    assert thread_share() == expected


def test_the_share_is_kept_for_a_while_and_sets_torch(fresh_share):
    fake_cores(fresh_share, {0, 1}, 1.0)  # two busy loops on two cores
    torch.set_num_threads(2)
    assert use_share() == 1 and torch.get_num_threads() == 1
    assert thread_share() == 1  # kept: a second measure would need a third /proc/stat reading


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
