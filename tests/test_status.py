"""appliance/status.py and `appliance status`: the status file a real `appliance run` keeps, systemd's
STATUS= line, and the report with the service up, stopped, killed and hung."""

import io
import json
import os
import signal
import stat
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from conftest import (WECHAT_PAID, WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE, appliance_cmd, lane_dict,
                      subprocess_env, wait_for, write_config)
from notify import NotifySocket

from appliance import schemas
from appliance.config import from_dict
from appliance.lanelock import LaneLock, held
from appliance.status import FILENAME, read_status_file, scanner_view, summary, timesyncd_clock, write_atomically

pytestmark = pytest.mark.integration

CODES = (WECHAT_PAID, WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE)


def _doc(tmp_path):
    """A lane whose uncertain payments stay open: the first query comes after ten minutes, and a
    payment to an unreachable platform is accepted offline (deferred) and stays so."""
    doc = lane_dict(tmp_path / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"},
                    terminal={"runtime_dir": str(tmp_path / "run")},
                    offline={"enabled": True, "forward_within_s": 3600.0})
    doc["providers"]["sandbox"].update(first_query_after_s=600.0, query_every_s=600.0, reverse_after_s=3600.0)
    return doc


def _cli(conf, *args, timeout=60):
    return subprocess.run(appliance_cmd() + list(args) + ["--config", str(conf)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def _status(conf):
    r = _cli(conf, "status", "--json")
    assert r.stdout.strip(), r.stderr
    return r.returncode, schemas.check("status_report", r.stdout), r


def _charge(conf, order, code):
    return _cli(conf, "charge", "--order", order, "--amount", "1.00", "--code", code, "--json")


def _no_code_in(*texts):
    for text in texts:
        for code in CODES:
            assert code not in text


@pytest.fixture
def service(tmp_path):
    """A running `appliance run` under its own NOTIFY_SOCKET, with umask 0077 as the unit sets it.
    Yields (conf, proc, notify socket); stops it at the end if the test did not."""
    conf = write_config(tmp_path / "a.toml", _doc(tmp_path))
    sock = NotifySocket(tmp_path / "notify.sock")
    proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=0o077,
                            env=subprocess_env(**sock.env()))
    try:
        assert wait_for(lambda: (tmp_path / "run" / FILENAME).exists() and (tmp_path / "state" / "control.sock").exists())
        yield conf, proc, sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        sock.close()


def _with_open_payments(conf, tmp_path):
    """One paid, one unknown (SYSTEMERROR, not queried for ten minutes), one deferred."""
    assert _charge(conf, "A1", WECHAT_PAID).returncode == 0
    assert _charge(conf, "A2", WECHAT_SYSTEMERROR).returncode == 4
    assert _charge(conf, "A3", WECHAT_UNREACHABLE).returncode == 4
    path = tmp_path / "run" / FILENAME
    assert wait_for(lambda: (read_status_file(path)[0] or {}).get("open_payments") == 2)


def test_running_service_status_file_status_line_and_report(service, tmp_path):
    conf, proc, sock = service
    _with_open_payments(conf, tmp_path)
    path = tmp_path / "run" / FILENAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # group-readable although the umask is 0077
    text = path.read_text()
    doc = schemas.check("service_status", text)
    assert (doc["state"], doc["pid"], doc["faults"]) == ("running", proc.pid, {})
    lane = doc["lane"].replace("_", " ")  # resolving while the till waits out A2 for the command
    assert doc["summary"] == f"{lane} · backlog {doc['uplink']['backlog']} · uplink off · 2 open"
    sandbox = doc["platforms"]["sandbox"]
    assert sandbox["last_result"]["status"] == "unknown" and sandbox["last_result"]["code"] == "SYSTEMERROR" \
        or sandbox["last_error"]["reason"].startswith("ProviderUnavailable: ")  # the resolver may have retried A3
    assert sandbox["last_error"]["call"] == "pay"

    code, r, raw = _status(conf)
    assert code == 0, raw.stdout + raw.stderr
    s = r["service"]
    assert (s["running"], s["pid"], s["stale"], s["lane_held"], s["reason"]) == (True, proc.pid, False, True, "")
    assert s["summary"].endswith("· uplink off · 2 open")
    assert r["journal"]["counts"] == {"paid": 1, "unknown": 1, "deferred": 1}
    opened = {t["order"]: t for t in r["journal"]["open"]}
    assert {(o, t["state"], t["amount"]) for o, t in opened.items()} == {("A2", "unknown", "1.00"),
                                                                        ("A3", "deferred", "1.00")}
    assert opened["A2"]["code_masked"] == "1345**********6794" and opened["A2"]["age_s"] >= 0
    assert r["outbox"]["backlog"] == doc["uplink"]["backlog"] > 0 and r["outbox"]["last_ack_seq"] is None
    assert r["uplink"] == {"kind": "none", "connected": False, "connected_since": None, "last_error": None}
    assert r["state_dir"]["free_bytes"] > 0 and r["clock"]["source"] in ("adjtimex", "timesyncd")
    assert r["config_path"] == str(conf)

    human = _cli(conf, "status")
    assert human.returncode == 0
    assert f"service:   running, pid {proc.pid}; {lane} · backlog" in human.stdout
    assert "order A2" in human.stdout and "1345**********6794" in human.stdout and "deferred" in human.stdout
    assert "journal:   1 deferred, 1 paid, 1 unknown" in human.stdout
    _no_code_in(text, raw.stdout, raw.stderr, human.stdout, human.stderr)

    lines = [m.removeprefix("STATUS=") for _, m in sock.messages if m.startswith("STATUS=")]
    assert lines and lines[-1] == doc["summary"]
    assert all(a != b for a, b in zip(lines, lines[1:]))  # sent only when the text changes
    assert lines[0].startswith("ready · backlog ") and lines[0].endswith("· uplink off · 0 open")


def test_stopped_service_is_reported_and_the_journal_still_read(service, tmp_path):
    conf, proc, _ = service
    _with_open_payments(conf, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    code, r, raw = _status(conf)
    assert code == 1
    assert r["service"]["running"] is False and r["service"]["reason"].startswith("stopped at ")
    assert r["service"]["lane_held"] is False and r["lane"] is None
    assert {t["order"] for t in r["journal"]["open"]} == {"A2", "A3"}
    human = _cli(conf, "status")
    assert human.returncode == 1 and "service:   NOT RUNNING: stopped at " in human.stdout
    _no_code_in(raw.stdout, human.stdout, human.stderr, err)


def test_killed_service_and_hung_service(service, tmp_path):
    conf, proc, _ = service
    path = tmp_path / "run" / FILENAME
    # Hung: the process holds the lane but writes no more; its last status ages past stale.
    proc.send_signal(signal.SIGSTOP)
    doc, _ = read_status_file(path)
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    write_atomically(path, {**doc, "written_at": hour_ago.isoformat(timespec="milliseconds").replace("+00:00", "Z")})
    code, r, _ = _status(conf)
    assert code == 1 and r["service"]["stale"] is True and r["service"]["running"] is False
    assert r["service"]["status_age_s"] > 3500 and "the service may hang" in r["service"]["reason"]
    assert "NOT RUNNING: the status file is stale" in _cli(conf, "status").stdout
    proc.send_signal(signal.SIGCONT)  # it writes again within EVERY_S
    assert wait_for(lambda: _status(conf)[1]["service"]["running"])
    # Killed: the file still says running, but nothing holds the lane.
    proc.kill()
    proc.communicate(timeout=10)
    code, r, _ = _status(conf)
    assert code == 1 and r["service"]["running"] is False and r["service"]["stale"] is False
    assert "nothing holds the lane: the service died" in r["service"]["reason"]


def test_never_started_lane(tmp_path):
    conf = write_config(tmp_path / "a.toml", _doc(tmp_path))
    code, r, raw = _status(conf)
    assert code == 1 and r["service"]["running"] is False
    assert r["service"]["reason"] == f"no status file {tmp_path / 'run' / FILENAME}"
    assert "no journal" in r["journal"]["error"] and r["outbox"] is None
    assert r["platforms"] == {"sandbox": {"kind": "sandbox", "last_result": None, "last_error": None}}


# --- the parts, without a service ----------------------------------------------------------------

def test_summary_line():
    assert summary("ready", {}, {"kind": "mqtt", "connected": True, "backlog": 0}, 2) == \
        "ready · backlog 0 · uplink connected · 2 open"
    assert summary("awaiting_code", {"scanner": "not found", "journal": "disk full"},
                   {"kind": "mqtt", "connected": False, "backlog": 7}, 0) == \
        "awaiting code · backlog 7 · uplink down · 0 open · journal fault · scanner fault"
    assert summary("ready", {}, {"kind": "none", "error": "journal lost"}, None) == \
        "ready · backlog ? · uplink off · open ?"


def test_lane_lock_seen_held_without_taking_it(tmp_path):
    assert held(tmp_path) is False  # no lock file at all
    lock = LaneLock(tmp_path)
    assert lock.try_acquire()
    before = (tmp_path / "lane.lock").read_bytes()
    assert held(tmp_path) is True
    assert (tmp_path / "lane.lock").read_bytes() == before  # nothing written
    lock.release()
    assert held(tmp_path) is False
    assert held(tmp_path, locks=tmp_path / "no-such-proc-locks") is None


def test_timesyncd_flag(tmp_path):
    flag = tmp_path / "timesync" / "synchronized"
    assert timesyncd_clock(flag)["synced"] is None  # no timesyncd here
    flag.parent.mkdir()
    assert timesyncd_clock(flag)["synced"] is False
    flag.touch()
    assert timesyncd_clock(flag) == {"synced": True, "source": "timesyncd", "detail": f"{flag} exists"}


def test_scanner_presence(tmp_path):
    dev = tmp_path / "scanner"
    cfg = from_dict(lane_dict(tmp_path, scanner={"kind": "serial", "device": str(dev)}))
    assert scanner_view(cfg.scanner) == {"kind": "serial", "device": str(dev), "present": False}
    dev.touch()
    assert scanner_view(cfg.scanner)["present"] is True
    assert scanner_view(cfg.scanner, {"scanner": "permission denied"})["present"] is False
    cfg = from_dict(lane_dict(tmp_path, scanner={"kind": "evdev", "match_vid_pid": "05e0:1200"}))
    assert scanner_view(cfg.scanner) == {"kind": "evdev", "device": "match 05e0:1200", "present": None}
    assert scanner_view(cfg.scanner, {})["present"] is True


def test_write_atomically_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomically(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.json").st_mode) == 0o640
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left


def test_print_status_aligns_and_ages():
    from appliance.cli import print_status

    at = "2026-11-29T10:00:00.000Z"
    r = {"kind": "status_report", "version": 1, "at": at, "software_version": "0.2.0", "config_path": "/etc/a.toml",
         "store_id": "S1", "terminal_id": "L1",
         "service": {"running": True, "reason": "", "summary": "ready · backlog 0 · uplink connected · 1 open",
                     "pid": 42, "software_version": "0.1.0", "status_file": "/run/appliance/status.json",
                     "status_age_s": 3.2, "stale": False, "lane_held": True},
         "lane": "ready", "faults": {"scanner": "scanner not found: /dev/scanner"},
         "scanner": {"kind": "serial", "device": "/dev/scanner", "present": False}, "indicator": {"kind": "gpio"},
         "platforms": {"wx": {"kind": "wechat_v3", "last_result": {"at": "2026-11-29T09:59:00.000Z", "call": "pay",
                                                                    "status": "paid", "code": "SUCCESS"},
                              "last_error": None}},
         "journal": {"counts": {"paid": 3, "deferred": 1}, "open_more": 0, "error": None, "open": [
             {"txn_id": 7, "order": "A7", "amount": "12.00", "amount_fen": 1200, "state": "deferred",
              "platform": "wx", "code_masked": "1345**********6795", "out_trade_no": "S1_L1_x", "created_at": at,
              "age_s": 125.0, "reason": "accepted offline"}]},
         "outbox": {"backlog": 0, "oldest_queued_seq": None, "oldest_queued_at": None, "last_seq": 9,
                    "last_ack_seq": 9, "last_ack_at": "2026-11-29T09:58:00.000Z"},
         "uplink": {"kind": "mqtt", "connected": True, "connected_since": "2026-11-29T08:00:00.000Z",
                    "last_error": None},
         "state_dir": {"path": "/var/lib/appliance", "free_bytes": 5 * 2**30, "total_bytes": 28 * 2**30},
         "clock": {"synced": True, "source": "adjtimex", "detail": "kernel: synchronized, max error 16 ms"}}
    schemas.check("status_report", json.dumps(r))
    out = io.StringIO()
    print_status(r, out)
    assert out.getvalue().splitlines() == [
        "service:   running, pid 42; ready · backlog 0 · uplink connected · 1 open (status 3s old)",
        "version:   0.2.0 (the service runs 0.1.0)",
        "config:    /etc/a.toml (lane S1/L1)",
        "lane:      ready; faults: scanner: scanner not found: /dev/scanner",
        "scanner:   serial /dev/scanner: MISSING",
        "indicator: gpio",
        "platform:  wx (wechat_v3): last result paid SUCCESS (pay) at 2026-11-29T09:59:00.000Z (1m 0s ago); "
        "last error none",
        "journal:   1 deferred, 3 paid",
        "open:      txn 7     order A7                12.00  deferred           2m 5s old  wx  1345**********6795",
        "outbox:    backlog 0; last ack seq 9 at 2026-11-29T09:58:00.000Z (2m 0s ago)",
        "uplink:    mqtt connected since 2026-11-29T08:00:00.000Z (2h 0m ago)",
        "state dir: /var/lib/appliance: 5120 MiB free of 28672 MiB",
        "clock:     synchronized (kernel: synchronized, max error 16 ms)"]


class _BacklogSource:
    """A StatusSource that reports only the journal's backlog (the writer's own contract:
    snapshot(state, every_s) -> document, release())."""

    def __init__(self, journal):
        self.journal = journal

    def snapshot(self, state, every_s):
        backlog = self.journal.outbox_state().backlog
        return {"state": state, "every_s": every_s, "summary": f"backlog {backlog}", "backlog": backlog}

    def release(self):
        pass


def test_a_journal_commit_rewrites_the_file_long_before_the_timer(tmp_path):
    """The service hooks the writer to the journal's commits: the backlog shown follows the
    uplink's acknowledgements (or new events) within about MIN_GAP_S, while the timer sleeps."""
    from appliance.journal import Journal
    from appliance.status import MIN_GAP_S, StatusWriter

    journal = Journal(tmp_path / "state", "S001", "01")
    sent = []
    writer = StatusWriter(tmp_path, _BacklogSource(journal), notify=sent.append, every_s=3600.0)
    journal.on_commit(writer.poke)
    writer.start()
    try:
        assert wait_for(lambda: sent == ["backlog 0"])
        journal.lane_event("started", {})
        assert wait_for(lambda: json.loads((tmp_path / FILENAME).read_text())["backlog"] == 1,
                        timeout=MIN_GAP_S + 5)
        assert sent == ["backlog 0", "backlog 1"]
    finally:
        writer.stop()
        journal.close()
