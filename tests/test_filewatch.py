"""FileWatch: told of a file's loss or change by the kernel (inotify), silent while nothing happens."""

import os
import threading
import time

import pytest

from appliance.filewatch import FileWatch
from conftest import wait_for


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"x" * 100)
    calls = []
    watch = FileWatch(path, lambda: calls.append(time.monotonic()))
    assert watch.start(), "inotify is missing on this machine"
    yield path, calls
    watch.close()


@pytest.mark.parametrize("lose", [
    pytest.param(lambda p: p.unlink(), id="deleted"),
    pytest.param(lambda p: (p.with_name("other").write_bytes(b"y"), os.replace(p.with_name("other"), p)),
                 id="renamed-over"),
    pytest.param(lambda p: os.truncate(p, 0), id="emptied"),
    pytest.param(lambda p: p.rename(p.with_name("moved")), id="moved-away"),
])
def test_each_way_of_losing_the_file_is_reported(watched, lose):
    path, calls = watched
    time.sleep(0.2)
    assert calls == [], "an event with nothing changed"
    lose(path)
    assert wait_for(lambda: calls, timeout=10)


def test_close_ends_the_thread_at_once(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    watch = FileWatch(path, lambda: None)
    assert watch.start()
    thread = next(t for t in threading.enumerate() if t.name == "filewatch")
    t0 = time.monotonic()
    watch.close()
    watch.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0


def test_a_missing_file_cannot_be_watched(tmp_path):
    assert FileWatch(tmp_path / "absent", lambda: None).start() is False
