"""The lane lock: one owner per state dir, released by the kernel when its holder dies."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from appliance import cli, control, service
from appliance.config import from_dict
from appliance.errors import ApplianceError
from appliance.journal import Journal, State
from appliance.lanelock import LaneBusy, LaneLock
from appliance.scan import NoScanner
from appliance.wakeup import Stop
from conftest import WECHAT_PAID, appliance_cmd, lane_dict, subprocess_env, wait_for, write_config


def test_one_holder_at_a_time_pid_written_file_private(tmp_path):
    a, b = LaneLock(tmp_path / "state"), LaneLock(tmp_path / "state")
    assert a.try_acquire() and a.held
    assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert b.holder() == os.getpid()
    assert not b.try_acquire()  # a second open file of the same process does not get it either
    a.release()
    a.release()  # idempotent
    assert b.try_acquire()
    b.release()
    assert a.path.exists() and a.holder() is None  # the file stays; it names no holder when free


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_as_root_the_lock_file_belongs_to_the_state_dirs_owner(tmp_path):
    (tmp_path / "state").mkdir()
    os.chown(tmp_path / "state", 4242, 4343)  # the service's user and group
    lock = LaneLock(tmp_path / "state")
    assert lock.try_acquire()
    lock.release()
    st = os.stat(lock.path)
    assert (st.st_uid, st.st_gid) == (4242, 4343)


def test_an_unusable_state_dir_is_a_clear_error(tmp_path):
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(ApplianceError, match="cannot open the lane lock .*run as the service user"):
        LaneLock(tmp_path / "state").try_acquire()


def test_acquire_waits_then_names_the_holder(tmp_path):
    holder = LaneLock(tmp_path)
    holder.try_acquire()
    waits = []
    t0 = time.monotonic()
    with pytest.raises(LaneBusy, match=f"lane busy: held by pid {os.getpid()}") as e:
        LaneLock(tmp_path).acquire(0.3, poll_s=0.02, on_wait=waits.append)
    assert time.monotonic() - t0 >= 0.3
    assert e.value.pid == os.getpid() and waits == [os.getpid()]  # told once, not once per retry
    threading.Timer(0.2, holder.release).start()
    waiter = LaneLock(tmp_path)
    assert waiter.acquire(10, poll_s=0.02)
    waiter.release()


def test_acquire_gives_up_quietly_when_stopped(tmp_path):
    holder = LaneLock(tmp_path)
    holder.try_acquire()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert LaneLock(tmp_path).acquire(30, poll_s=0.02, stop=stop) is False
    holder.release()


@pytest.mark.integration
def test_sigkilled_holder_frees_the_lane(tmp_path):
    code = ("import sys, time; from appliance.lanelock import LaneLock; "
            "assert LaneLock(sys.argv[1]).try_acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        lock = LaneLock(tmp_path)
        assert not lock.try_acquire() and lock.holder() == proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert lock.acquire(10, poll_s=0.02)  # no stale-lock logic needed: the kernel dropped it
    lock.release()


def test_run_on_a_held_lane_exits_1_naming_the_holder_and_opens_nothing(tmp_path, caplog):
    cfg = from_dict(lane_dict(tmp_path / "state"))
    holder = LaneLock(tmp_path / "state")
    holder.try_acquire()
    caplog.set_level(logging.INFO)
    try:
        assert service.run(cfg, stop=Stop(), scanner=NoScanner(), lock_wait_s=0.3) == 1
    finally:
        holder.release()
    assert not (tmp_path / "state" / Journal.FILENAME).exists()
    assert not (tmp_path / "state" / control.SOCKET_NAME).exists()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("waiting up to" in m for m in messages) == 1
    assert any(f"lane busy: held by pid {os.getpid()}" in m for m in messages)


def test_charge_on_a_lane_held_too_long_exits_1_lane_busy(tmp_path, monkeypatch, capsys):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state"))
    monkeypatch.setattr(control, "LOCK_WAIT_S", 0.4)  # the real wait is 15 s
    holder = LaneLock(tmp_path / "state")
    holder.try_acquire()
    try:
        rc = cli.main(["charge", "--order", "B1", "--amount", "1.00", "--code", WECHAT_PAID, "--json",
                       "--config", str(conf)])
    finally:
        holder.release()
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert f"lane busy: held by pid {os.getpid()}" in err
    assert WECHAT_PAID not in err
    assert not (tmp_path / "state" / Journal.FILENAME).exists()


@pytest.mark.integration
def test_charge_waits_for_a_held_lane_then_proceeds(tmp_path):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state"))
    holder = LaneLock(tmp_path / "state")
    holder.try_acquire()
    err_path = tmp_path / "charge.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(appliance_cmd() + ["charge", "--order", "B1", "--amount", "1.00", "--code", "-",
                                                   "--json", "--config", str(conf)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=subprocess_env())
        proc.stdin.write(WECHAT_PAID + "\n")
        proc.stdin.flush()
        try:
            assert wait_for(lambda: "lane busy" in err_path.read_text()), err_path.read_text()
            assert proc.poll() is None  # still waiting, nothing journaled
            assert not (tmp_path / "state" / Journal.FILENAME).exists()
        finally:
            holder.release()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, err_path.read_text()
    assert json.loads(out)["state"] == "paid"
    assert f"held by pid {os.getpid()}" in err_path.read_text()


@pytest.mark.integration
def test_second_run_waits_and_takes_over_only_when_the_first_stops(tmp_path):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state", scanner={"kind": "stdin"},
                                                       indicator={"kind": "log"}))
    sock = tmp_path / "state" / control.SOCKET_NAME
    first = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=subprocess_env())
    second = None
    try:
        assert wait_for(sock.exists)
        inode = sock.stat().st_ino
        err_path = tmp_path / "second.err"
        with open(err_path, "w") as err:
            second = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                      stderr=err, text=True, env=subprocess_env())
        assert wait_for(lambda: "waiting up to" in err_path.read_text())
        time.sleep(0.5)
        text = err_path.read_text()
        assert f"held by pid {first.pid}" in text and "starting" not in text  # no second till
        assert sock.stat().st_ino == inode
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=10)
        assert wait_for(lambda: "control socket" in err_path.read_text())  # the second one took over
        assert LaneLock(tmp_path / "state").holder() == second.pid
        second.stdin.write(f"ORD:T1:1.00\n{WECHAT_PAID}\n")
        second.stdin.flush()
        journal = Journal(tmp_path / "state", "S0001", "L01")
        assert wait_for(lambda: any(t.state is State.PAID for t in journal.recent()))
        journal.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=10)
    assert second.returncode == 0
