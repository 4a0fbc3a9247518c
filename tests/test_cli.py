"""The `appliance` command as a real process: exit codes, JSON, signals, crash and restart."""

import json
import signal
import subprocess
import time

import pytest

from appliance.journal import Journal, State
from conftest import (ALIPAY_NOTENOUGH, WECHAT_PAID, WECHAT_PAID_2, WECHAT_PASSWORD_OK, WECHAT_SLOW,
                      WECHAT_UNREACHABLE, appliance_cmd, lane_dict, subprocess_env, wait_for, write_config)

pytestmark = pytest.mark.integration


@pytest.fixture
def conf(tmp_path):
    return write_config(tmp_path / "appliance.toml", lane_dict(tmp_path / "state"))


def cli(conf, *args, stdin=None, timeout=60):
    return subprocess.run(appliance_cmd() + list(args) + ["--config", str(conf)], capture_output=True, text=True,
                          input=stdin, env=subprocess_env(), timeout=timeout)


def charge(conf, order, amount, code, *extra):
    r = cli(conf, "charge", "--order", order, "--amount", amount, "--code", code, "--json", *extra)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r


def test_help_for_every_subcommand():
    for sub in ("run", "charge", "cancel", "sync", "status", "journal", "classify", "check-config", "test-feedback", "demo",
                "scan-test", "scanners"):
        r = subprocess.run(appliance_cmd() + [sub, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage: appliance" in r.stdout, sub


def test_charge_exit_codes_and_json(conf):
    code, out, r = charge(conf, "A1", "12.34", WECHAT_PAID)
    assert code == 0, r.stderr
    assert set(out) == {"txn_id", "out_trade_no", "order", "payment_type", "platform", "amount", "state", "reason"}
    assert (out["order"], out["amount"], out["payment_type"], out["platform"], out["state"]) == (
        "A1", "12.34", "wechat", "sandbox", "paid")
    assert WECHAT_PAID not in r.stdout + r.stderr
    assert charge(conf, "A2", "1.00", ALIPAY_NOTENOUGH)[:2][0] == 3
    code, out, _ = charge(conf, "A3", "1.00", WECHAT_PASSWORD_OK)
    assert (code, out["state"]) == (4, "unknown")
    code, out, _ = charge(conf, "A4", "1.00", "134567890123450092", "--wait", "5")  # password, then paid
    assert (code, out["state"]) == (0, "paid")
    code, out, _ = charge(conf, "A5", "1.00", WECHAT_PASSWORD_OK)
    assert (code, out["state"]) == (5, "refused") and "already used" in out["reason"]
    code, out, _ = charge(conf, "A1", "12.34", WECHAT_PAID_2)
    assert (code, out["state"]) == (5, "refused") and "already paid" in out["reason"]


@pytest.mark.parametrize("amount,why", [("-1", "negative"), ("0", "zero"), ("1.005", "two decimals"),
                                        ("1e9", "not a decimal"), ("abc", "not a decimal"),
                                        ("100000000.01", "exceeds")])
def test_charge_bad_amount_refused_journal_unchanged(conf, amount, why):
    code, out, r = charge(conf, "A1", amount, WECHAT_PAID)
    assert code == 5 and why in out["reason"] and why in r.stderr
    assert cli(conf, "journal", "--json").stdout == ""


def test_charge_code_from_stdin_keeps_it_off_the_command_line(conf):
    r = cli(conf, "charge", "--order", "A1", "--amount", "1.00", "--code", "-", "--json", stdin=WECHAT_PAID + "\n")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "paid"


def test_cancel_and_journal(conf):
    charge(conf, "A1", "1.00", WECHAT_PAID)
    r = cli(conf, "cancel", "--order", "A1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "cancelled"
    r = cli(conf, "cancel", "--order", "NOPE", "--json")
    assert r.returncode == 5 and "no paid payment" in json.loads(r.stdout)["reason"]
    rows = [json.loads(line) for line in cli(conf, "journal", "--json").stdout.splitlines()]
    assert [(x["order"], x["state"]) for x in rows] == [("A1", "cancelled")]
    assert all(WECHAT_PAID not in json.dumps(x) for x in rows)
    table = cli(conf, "journal").stdout
    assert "cancelled" in table and "1345**********6700" in table
    assert cli(conf, "journal", "--state", "paid").stdout.strip().endswith("(no transactions)")
    history = json.loads(cli(conf, "journal", "--txn", str(rows[0]["txn_id"]), "--json").stdout)
    assert [(e["previous_state"], e["state"]) for e in history["events"]] == [
        (None, "pending"), ("pending", "paid"), ("paid", "cancel_requested"), ("cancel_requested", "cancelled")]
    assert WECHAT_PAID not in json.dumps(history)
    text = cli(conf, "journal", "--txn", str(rows[0]["txn_id"])).stdout
    assert "cancel_requested -> cancelled" in text
    assert cli(conf, "journal", "--txn", "999").returncode == 5


def test_classify_json(conf):
    r = cli(conf, "classify", "--json", WECHAT_PAID, "ORD:A1:1.00", "CMD:CANCEL", "junk")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["kind"] for x in rows] == ["payment", "order", "command", "unknown"]
    assert rows[0]["payment_type"] == "wechat" and WECHAT_PAID not in r.stdout
    assert rows[3]["reason"]


def test_classify_works_without_any_config():
    r = subprocess.run(appliance_cmd() + ["classify", WECHAT_PAID], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 0 and "wechat" in r.stdout


def test_unreachable_platform_is_refused_by_offline_policy(conf):
    code, out, _ = charge(conf, "A1", "1.00", WECHAT_UNREACHABLE)
    assert (code, out["state"]) == (3, "declined") and "offline acceptance is disabled" in out["reason"]


def _start_service(conf, stdin=subprocess.PIPE, extra_env=None):
    return subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(**(extra_env or {})))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_takes_scans_from_stdin_and_stops_cleanly_on_signal(tmp_path, sig):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state", scanner={"kind": "stdin"},
                                                       indicator={"kind": "log"}))
    proc = _start_service(conf)
    proc.stdin.write(f"ORD:A1:12.34\n{WECHAT_PAID}\n")
    proc.stdin.flush()
    journal = Journal(tmp_path / "state", "S0001", "L01")
    assert wait_for(lambda: any(t.state is State.PAID for t in journal.recent()))
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert proc.returncode == 0, err
    assert "indicator: paid" in err and "stopped" in err and "indicator: off" in err
    assert WECHAT_PAID not in err
    journal.close()


def _service_inside_a_slow_payment(tmp_path):
    """A running service whose till sits in a 30 s platform call that has already charged."""
    doc = lane_dict(tmp_path / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"})
    doc["providers"]["sandbox"]["slow_ms"] = 30_000
    conf = write_config(tmp_path / "a.toml", doc)
    proc = _start_service(conf)
    proc.stdin.write(f"ORD:K1:5.00\n{WECHAT_SLOW}\n")
    proc.stdin.flush()
    journal = Journal(tmp_path / "state", "S0001", "L01")
    assert wait_for(lambda: journal.recent() and journal.recent()[0].state is State.PENDING)
    time.sleep(0.3)  # inside the platform call: charged, no answer yet
    return conf, proc, journal


def _restart_and_resolve(conf, journal, txn) -> str:
    proc = _start_service(conf, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: journal.get(txn.txn_id).state is State.PAID, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert [e["state"] for e in journal.events(txn.txn_id)] == ["pending", "unknown", "paid"]
    from appliance.payments.sandbox import SandboxOptions, SandboxProvider

    ledger = SandboxProvider("sandbox", SandboxOptions(), journal.state_dir)
    assert ledger.charges(WECHAT_SLOW) == 1  # charged once, never again
    ledger.close()
    return err


def test_sigkill_mid_payment_then_restart_resolves_without_charging_twice(tmp_path):
    conf, proc, journal = _service_inside_a_slow_payment(tmp_path)
    proc.kill()
    proc.communicate(timeout=5)
    [txn] = journal.recent()
    assert txn.state is State.PENDING  # the intent journaled before the call survived the kill
    err = _restart_and_resolve(conf, journal, txn)
    assert "1 open payment(s) to resolve" in err
    journal.close()


def test_sigterm_during_a_hanging_platform_call_stops_within_5s_and_restart_resolves(tmp_path):
    conf, proc, journal = _service_inside_a_slow_payment(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert proc.returncode == 0 and "still waits on a platform call" in err and "indicator: off" in err
    [txn] = journal.recent()
    assert txn.state is State.PENDING
    _restart_and_resolve(conf, journal, txn)
    journal.close()


def test_demo_shows_the_flow():
    r = subprocess.run(appliance_cmd() + ["demo", "--pause", "0.2"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("awaiting_code", "paid", "declined", "unknown_code", "cancelled", "journal"):
        assert word in r.stdout
    # paid over the simulators' real protocols: Alipay's own decline code, WeChat's books
    assert "ACQ.BUYER_BALANCE_NOT_ENOUGH" in r.stdout
    books = next(line for line in r.stdout.splitlines() if line.startswith("the platforms' books"))
    assert books.count("REFUND") == 1 and books.count("SUCCESS") == 1 and "PAYERROR" in books
    assert "134567890123456700" not in r.stdout + r.stderr


def test_test_feedback_plays_every_pattern(conf):
    from appliance.indicator import Signal

    r = cli(conf, "test-feedback", "--pause", "0.01")
    assert r.returncode == 0, r.stderr
    shown = [line.split()[0] for line in r.stdout.splitlines()]
    assert shown == [s.value for s in Signal if s is not Signal.OFF]


# --- appliance sync ----------------------------------------------------------------------------

def _sync(conf):
    r = cli(conf, "sync", "--json")
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r


def test_sync_without_a_service_reads_the_journal_and_says_nothing_sends(conf, tmp_path):
    r = cli(conf, "sync")
    assert r.returncode == 1 and "no journal" in r.stderr  # the service never ran here
    assert charge(conf, "A1", "1.00", WECHAT_PAID)[0] == 0
    code, out, r = _sync(conf)
    journal = Journal(tmp_path / "state", "S0001", "L01")
    outbox = journal.outbox_state()
    assert code == 1, r.stderr  # events wait and nothing sends them
    assert out == {"service_running": False, "kind": "none", "connected": False, "connected_since": None,
                   "last_error": None, "backlog": outbox.backlog, "oldest_queued_seq": outbox.oldest_queued_seq,
                   "oldest_queued_at": outbox.oldest_queued_at, "last_seq": outbox.last_seq, "last_ack_seq": None,
                   "last_ack_at": None} and outbox.backlog == 2
    r = cli(conf, "sync")
    assert r.returncode == 1 and "service:   not running" in r.stdout
    assert f"backlog:   2 event(s) queued; oldest seq {outbox.oldest_queued_seq}, queued " in r.stdout
    assert "last ack:  none yet" in r.stdout
    journal.ack(row.seq for row in journal.claim())  # as if head office took them all
    journal.close()
    code, out, r = _sync(conf)
    assert (code, out["backlog"], out["last_ack_seq"]) == (0, 0, outbox.last_seq), r.stderr
    r = cli(conf, "sync")
    assert r.returncode == 0 and f"last ack:  seq {outbox.last_seq} at " in r.stdout


def test_sync_asks_the_running_service(tmp_path):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state", scanner={"kind": "stdin"},
                                                       indicator={"kind": "log"}))
    proc = _start_service(conf)
    try:
        assert wait_for(lambda: (tmp_path / "state" / "control.sock").exists())
        assert charge(conf, "A1", "1.00", WECHAT_PAID)[0] == 0
        code, out, r = _sync(conf)
        assert out["service_running"] is True and out["kind"] == "none" and out["backlog"] >= 2, r.stderr
        assert code == 1  # [mqtt] disabled: what waits is not being sent
        r = cli(conf, "sync")
        assert "service:   running, uplink none" in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_sync_prints_times_with_their_age():
    import io
    from datetime import datetime, timezone

    from appliance.cli import print_sync

    out = io.StringIO()
    print_sync(True, {"kind": "mqtt", "connected": True, "connected_since": "2026-11-29T08:00:00.000Z",
                      "last_error": None, "backlog": 3, "oldest_queued_seq": 7,
                      "oldest_queued_at": "2026-11-29T09:58:55.500Z", "last_seq": 9, "last_ack_seq": 6,
                      "last_ack_at": "2026-11-27T07:00:00.000Z"},
               out, now=datetime(2026, 11, 29, 10, 0, 0, tzinfo=timezone.utc))
    assert out.getvalue().splitlines() == [
        "service:   running, uplink mqtt connected since 2026-11-29T08:00:00.000Z (2h 0m ago)",
        "backlog:   3 event(s) queued; oldest seq 7, queued 2026-11-29T09:58:55.500Z (1m 4s ago)",
        "last ack:  seq 6 at 2026-11-27T07:00:00.000Z (2d 3h ago)",
        "last seq:  9"]
    out = io.StringIO()
    print_sync(True, {"kind": "mqtt", "connected": False, "connected_since": None,
                      "last_error": "connection refused", "backlog": 0, "oldest_queued_seq": None,
                      "oldest_queued_at": None, "last_seq": 0, "last_ack_seq": None, "last_ack_at": None}, out)
    assert out.getvalue().splitlines()[:2] == ["service:   running, uplink mqtt not connected (connection refused)",
                                               "backlog:   0 event(s) queued"]
