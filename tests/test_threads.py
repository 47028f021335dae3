"""run.num_threads: auto shares the idle cores among this machine's processes; a number is taken as is."""
from __future__ import annotations

import pytest

from lever_plugins.runners.threads import auto_threads, choose_num_threads


@pytest.mark.parametrize("cores, processes, load, expected", [
    (2, 1, 0.0, 2),    # quiet 2-core machine
    (2, 1, 0.4, 2),    # quiet but for our own start-up
    (2, 1, 1.0, 1),    # one competing CPU-bound process: leave it its core
    (2, 1, 3.0, 1),    # overloaded: still one thread
    (16, 4, 0.2, 4),   # 4 ranks on 16 cores
    (16, 4, 8.0, 2),   # 8 cores busy elsewhere: the other 8 shared by 4 ranks
    (8, 1, None, 8),   # no load average (not Linux)
])
def test_auto_threads(cores, processes, load, expected):
    assert auto_threads(cores, processes, load) == expected


def test_a_number_is_taken_as_it_is_and_auto_says_why(monkeypatch):
    assert choose_num_threads(3) == (3, "run.num_threads")
    monkeypatch.setattr("os.getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr("lever_plugins.runners.threads.available_cores", lambda: 2)
    threads, why = choose_num_threads("auto")
    assert threads == 1 and why == "auto: 2 cores for 1 process(es) here, 1-min load 1.0"
