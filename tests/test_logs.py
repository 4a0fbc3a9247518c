"""Log setup for journald: priorities on stderr, native entries with a payment's fields, chatty libraries held back."""

import json
import logging
import os
import pty
import signal
import subprocess
import sys
import threading

import pytest

import journald_kit
from appliance import logs
from appliance.journal import Journal, State
from appliance.logs import is_journal_stream, setup
from appliance.payments.sandbox import SandboxProvider
from appliance.scan import Scan
from conftest import (WECHAT_LOST_ANSWER, WECHAT_PAID, WECHAT_PAID_2, appliance_cmd, lane_dict, resolve,
                      subprocess_env, wait_for, write_config)
from journald_kit import real_journald_missing

LIBRARIES = ("peewee", "httpx", "httpcore")


@pytest.fixture
def restored_logging():
    """setup() changes process-wide loggers: put them back for the tests that follow."""
    root = logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level for name in ("", *LIBRARIES)}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_libraries_that_log_secrets_or_every_request_are_held_back(restored_logging, level):
    setup(level)
    configured = logging.getLevelName(level)
    assert logging.getLogger("peewee").level == max(logging.INFO, configured)  # SQL with parameters
    for name in ("httpx", "httpcore"):  # each platform call's URL
        assert logging.getLogger(name).level == max(logging.WARNING, configured)
    assert logging.getLogger().level == configured


# --- where the lines go: journald's stream, journald's socket, a terminal --------------------------

SCRIPT = """
import logging
from appliance.logs import setup
setup("DEBUG")
log = logging.getLogger("appliance.till")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed")
logging.getLogger("peewee").debug("SELECT with a payment code")
"""


def _run_script(stderr_fd: int, **env) -> None:
    subprocess.run([sys.executable, "-c", SCRIPT], stderr=stderr_fd, env=subprocess_env(**env), timeout=60,
                   check=True)


def _stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def _read_all(fd: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty's master after the slave's last close: EIO
            break
        if not chunk:
            break
        out += chunk
    return out.decode()


def test_under_journald_every_stderr_line_starts_with_its_priority(tmp_path):
    r, w = os.pipe()
    try:  # no native socket: the stream is all there is
        _run_script(w, JOURNAL_STREAM=_stream_id(w), APPLIANCE_JOURNAL_SOCKET=str(tmp_path / "none.sock"))
    finally:
        os.close(w)
    lines = _read_all(r).splitlines()
    os.close(r)
    assert lines[:6] == ["<7>appliance.till: d", "<6>appliance.till: i", "<4>appliance.till: w",
                         "<3>appliance.till: e", "<2>appliance.till: c", "<3>appliance.till: failed"]
    traceback = lines[6:]
    assert traceback[0] == "<3>Traceback (most recent call last):" and traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback)  # journald files each line on its own


def test_on_a_terminal_or_a_stream_that_is_not_journalds_lines_have_no_priority_prefix():
    pipe_r, pipe_w = os.pipe()  # a JOURNAL_STREAM inherited from a parent whose stderr was journald's
    master, slave = pty.openpty()
    try:
        _run_script(slave, JOURNAL_STREAM=_stream_id(pipe_w))
    finally:
        os.close(slave)
        os.close(pipe_w)
    lines = _read_all(master).splitlines()
    os.close(master)
    os.close(pipe_r)
    assert lines[:6] == ["DEBUG appliance.till: d", "INFO appliance.till: i", "WARNING appliance.till: w",
                         "ERROR appliance.till: e", "CRITICAL appliance.till: c", "ERROR appliance.till: failed"]
    assert lines[-1] == "ValueError: boom" and not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "12:notanumber"])
def test_a_missing_or_malformed_journal_stream_is_not_journald(value, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", value)
    r, w = os.pipe()
    with os.fdopen(w, "w") as stream:
        assert not is_journal_stream(stream)
    os.close(r)


def test_the_journal_stream_is_recognised_by_its_device_and_inode(monkeypatch):
    r, w = os.pipe()
    r2, w2 = os.pipe()
    monkeypatch.setenv("JOURNAL_STREAM", _stream_id(w))
    with os.fdopen(w, "w") as mine, os.fdopen(w2, "w") as other:
        assert is_journal_stream(mine) and not is_journal_stream(other)
    os.close(r)
    os.close(r2)


# --- the payment a line is about ----------------------------------------------------------------


@pytest.fixture
def under_journald(journal_socket, restored_logging, monkeypatch):
    """This process's logging as setup() makes it under journald: stderr a journal stream (a pipe
    here) and the native socket `journal_socket`."""
    r, w = os.pipe()
    with os.fdopen(r, "rb") as _, os.fdopen(w, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(w))
        monkeypatch.setenv("APPLIANCE_JOURNAL_SOCKET", journal_socket.path)
        setup("INFO", stream=stream)
        yield journal_socket


def test_lines_in_a_payment_scope_carry_its_fields_on_its_thread_only(lane_journal, under_journald):
    journal_logger = logging.getLogger("appliance.test_scope")
    txn = lane_journal.open_payment(order="A1", amount_fen=100, payment_type="wechat", platform="sandbox",
                                    code=WECHAT_PAID)
    other = lane_journal.open_payment(order="B2", amount_fen=200, payment_type="wechat", platform="sandbox",
                                      code=WECHAT_PAID_2)
    ids = {"TXN_ID": str(txn.txn_id), "ORDER": "A1", "OUT_TRADE_NO": txn.out_trade_no}
    collector = under_journald.collect()
    scope = logs.enter(txn)
    try:
        journal_logger.info("calling the platform")
        elsewhere = threading.Thread(target=journal_logger.info, args=("another thread",))
        elsewhere.start()
        elsewhere.join()
        paid = lane_journal.transition(txn.txn_id, State.PAID, "SUCCESS")
        journal_logger.info("pending -> paid", extra=logs.state_of(paid))
        journal_logger.info("after the change")
        journal_logger.info("about another payment", extra=logs.state_of(other))
        journal_logger.info("back to mine")
    finally:
        logs.leave(scope)
    journal_logger.info("outside")
    got = {e["MESSAGE"]: {k: e[k] for k in ("TXN_ID", "ORDER", "STATE", "OUT_TRADE_NO") if k in e}
           for e in _wait_entries(collector, 7)}
    assert got == {"calling the platform": {**ids, "STATE": "pending"},
                   "another thread": {},
                   "pending -> paid": {**ids, "STATE": "paid"},
                   "after the change": {**ids, "STATE": "paid"},
                   "about another payment": {"TXN_ID": str(other.txn_id), "ORDER": "B2", "STATE": "pending",
                                             "OUT_TRADE_NO": other.out_trade_no},
                   "back to mine": {**ids, "STATE": "paid"},
                   "outside": {}}


adapter_log = logging.getLogger("appliance.payments.chatty")


class Chatty(SandboxProvider):
    """The sandbox, saying a line in each call as the HTTP adapters do (a late answer, a signature)."""

    def pay(self, req):
        adapter_log.warning("platform %s: pay %s", self.name, req.out_trade_no)
        return super().pay(req)

    def query(self, out_trade_no):
        adapter_log.warning("platform %s: query %s", self.name, out_trade_no)
        return super().query(out_trade_no)


def test_an_adapters_lines_carry_the_payment_the_till_or_the_resolver_works_on(lane, under_journald):
    journal_socket = under_journald
    sandbox = lane.router.providers["sandbox"]
    lane.router.providers["sandbox"] = Chatty("sandbox", sandbox.options, lane.journal.state_dir)
    collector = journal_socket.collect()
    lane.till.handle_scan(Scan("ORD:A1:1.00", "test"))
    txn = lane.till.handle_scan(Scan(WECHAT_LOST_ANSWER, "test")).txn  # the till: pay, no answer
    assert resolve(lane, txn.txn_id).state is State.PAID  # the resolver: query, paid
    adapter_log.info("idle")
    entries = _wait_entries(collector, 1, lambda e: e["MESSAGE"] == "idle")
    said = [(e["MESSAGE"], e.get("TXN_ID"), e.get("ORDER"), e.get("STATE"), e.get("OUT_TRADE_NO"))
            for e in entries if e["LOGGER"] == adapter_log.name]
    ids = (str(txn.txn_id), "A1")
    assert said == [(f"platform sandbox: pay {txn.out_trade_no}", *ids, "pending", txn.out_trade_no),
                    (f"platform sandbox: query {txn.out_trade_no}", *ids, "unknown", txn.out_trade_no),
                    ("idle", None, None, None, None)]


def _wait_entries(collector, n: int, last=lambda entry: True) -> list:
    assert wait_for(lambda: len(collector.entries) >= n and last(collector.entries[-1]))
    return collector.stop()


@pytest.mark.integration
def test_one_payments_life_under_journald_carries_its_fields_and_never_its_code(tmp_path, journal_socket):
    """`appliance run` under journald (stderr is the JOURNAL_STREAM, the native socket is there):
    journalctl TXN_ID=1 would show the payment from its intent to its end, -p warning its problem."""
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state", scanner={"kind": "stdin"},
                                                       indicator={"kind": "log"}))
    collector = journal_socket.collect()
    r, w = os.pipe()
    proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=w, text=True,
                            env=subprocess_env(JOURNAL_STREAM=_stream_id(w), APPLIANCE_JOURNAL_SOCKET=journal_socket.path))
    os.close(w)
    journal = Journal(tmp_path / "state", "S0001", "L01")
    try:
        proc.stdin.write(f"ORD:A1:12.34\n{WECHAT_LOST_ANSWER}\n")  # charged, answer lost: unknown, then queried
        proc.stdin.flush()
        assert wait_for(lambda: any(t.state is State.PAID for t in journal.recent()))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdin.close()
    err = _read_all(r)
    os.close(r)
    entries = collector.stop()
    [txn] = journal.recent()
    journal.close()

    mine = [e for e in entries if e.get("TXN_ID") == str(txn.txn_id)]
    assert {(e["ORDER"], e["OUT_TRADE_NO"]) for e in mine} == {("A1", txn.out_trade_no)}
    changes = [(e["STATE"], e["PRIORITY"], e["THREAD"]) for e in mine if " -> " in e["MESSAGE"]]
    assert changes == [("unknown", "4", "till"), ("paid", "6", "resolver")]
    assert mine[0]["MESSAGE"].startswith(f"txn {txn.txn_id}: pending, order A1") and mine[0]["STATE"] == "pending"
    assert any(e["MESSAGE"].startswith("order A1: 12.34 due") for e in entries if e.get("ORDER") == "A1")
    warnings = [e["MESSAGE"] for e in entries if int(e["PRIORITY"]) <= 4]  # journalctl -p warning
    assert len(warnings) == 1 and warnings[0].startswith(f"txn {txn.txn_id}: pending -> unknown")
    assert all(e["SYSLOG_IDENTIFIER"] == "appliance" for e in entries)
    assert entries[-1]["MESSAGE"] == "stopped"  # to the last line
    assert not any(WECHAT_LOST_ANSWER.encode() in e.raw for e in entries) and WECHAT_LOST_ANSWER not in err
    assert err == ""  # every line went to the journal's socket


@pytest.mark.integration
@pytest.mark.skipif(real_journald_missing() is not None, reason=str(real_journald_missing()))
def test_a_real_journald_files_the_lines_by_priority_and_by_payment(tmp_path):
    """The proof: systemd-journald itself, in a private mount namespace, takes `appliance run`'s
    entries; journalctl -p warning, TXN_ID= and ORDER= answer as docs/operations.md says."""
    for identifier in ("appliance", "appliance-stream"):
        write_config(tmp_path / f"{identifier}.toml", lane_dict(tmp_path / identifier, scanner={"kind": "stdin"},
                                                                 indicator={"kind": "log"}))
    subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, journald_kit.__file__,
                    str(tmp_path), WECHAT_LOST_ANSWER], env=subprocess_env(), timeout=120, check=True)
    answers = json.loads((tmp_path / "answers.json").read_text())

    def said(name):
        return [(e["PRIORITY"], e["MESSAGE"]) for e in answers[name]]

    [(prio, warning)] = said("native -p warning")  # one problem: the lost answer
    assert prio == "4" and warning.startswith("txn 1: pending -> unknown (timeout")
    life = [(e["STATE"], e["MESSAGE"].split(" (")[0].split(",")[0]) for e in answers["native TXN_ID=1"]]
    assert life == [("pending", "txn 1: pending"), ("unknown", "txn 1: pending -> unknown"),
                    ("paid", "txn 1: unknown -> paid")]
    assert [m for _, m in said("native ORDER=A1")][0] == "order A1: 12.34 due, waiting for a payment code"
    assert len(said("native ORDER=A1")) == 4 and {e["THREAD"] for e in answers["native TXN_ID=1"]} == {"till", "resolver"}

    [(prio, warning)] = said("stream -p warning")  # the same, from the <N> prefix alone
    assert prio == "4" and warning.startswith("appliance.resolver: txn 1: pending -> unknown (timeout")
    stream = said("stream")
    assert len(stream) >= 10 and not [m for _, m in stream if m.startswith("<")]  # journald took every prefix
    assert {p for p, _ in stream} == {"4", "6"}
    assert all("TXN_ID" not in e for e in answers["stream"])  # the stream has no fields
    assert WECHAT_LOST_ANSWER.encode() not in (tmp_path / "export.bin").read_bytes()
    assert said("large") == [("4", "x" * journald_kit.LARGE)]  # journald took the sealed memfd whole
