"""Stop requests that wake every kind of sleeper, and the self-pipe for select()ing threads."""

import select
import threading
import time

from appliance.wakeup import Stop, WakePipe, following


def test_set_calls_every_hook_once_and_a_late_hook_at_once():
    stop, calls = Stop(), []
    stop.on_set(lambda: calls.append("a"))
    remove = stop.on_set(lambda: calls.append("removed"))
    remove()
    stop.set()
    assert stop.is_set() and calls == ["a"]
    stop.on_set(lambda: calls.append("late"))  # registered after the stop: called at once
    assert calls == ["a", "late"]


def test_wake_pipe_wakes_a_select_from_another_thread_and_clears():
    pipe = WakePipe()
    try:
        assert select.select([pipe.fd], [], [], 0)[0] == []
        t0 = time.monotonic()
        threading.Timer(0.1, pipe.wake).start()
        assert select.select([pipe.fd], [], [], 10)[0] == [pipe.fd]
        assert time.monotonic() - t0 < 5
        for _ in range(100_000):  # more than the pipe holds: wake() never blocks
            pipe.wake()
        pipe.clear()
        assert select.select([pipe.fd], [], [], 0)[0] == []
    finally:
        pipe.close()
        pipe.close()
        pipe.wake()  # after close: nothing to wake, no error


def test_a_plain_event_is_followed_by_a_stop():
    event = threading.Event()
    stop = following(event)
    assert following(stop) is stop
    woke = threading.Event()
    stop.on_set(woke.set)
    assert not woke.wait(0.1)
    event.set()
    assert woke.wait(5) and stop.is_set()
