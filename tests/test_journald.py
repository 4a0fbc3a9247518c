"""journald's native protocol, against a real datagram socket parsed by the protocol's text."""

import inspect
import io
import logging
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.journald import JournalHandler, JournalSender, encode, priority
from appliance.logs import PriorityFormatter
from journald_kit import REQUIRED_SEALS, JournalSocket, parse

KEYS = st.from_regex(r"[A-Z][A-Z0-9_]{0,63}", fullmatch=True)


@settings(max_examples=50)
@given(st.lists(st.tuples(KEYS, st.binary(max_size=200)), max_size=8))
def test_any_fields_come_back_as_sent(fields):
    assert parse(encode(fields)) == fields


def test_a_value_with_a_newline_is_sent_binary_safe_and_others_as_text():
    raw = encode([("MESSAGE", "two\nlines"), ("TXN_ID", "42")])
    assert raw == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" + b"TXN_ID=42\n"


@pytest.mark.parametrize("key", ["message", "_PID", "1ST", "A" * 65, "TXN-ID", ""])
def test_field_names_journald_would_refuse_are_refused(key):
    with pytest.raises(ValueError, match="journal field name"):
        encode([(key, "x")])


@pytest.fixture
def fallback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PriorityFormatter("%(name)s: %(message)s"))
    return handler


@pytest.fixture
def logger(journal_socket, fallback):
    handler = JournalHandler(fallback, path=journal_socket.path, identifier="appliance-test")
    log = logging.getLogger("test_journald")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers[:] = []
    handler.close()


def test_each_record_is_one_entry_with_its_priority_and_where_it_came_from(journal_socket, logger):
    levels = [(logging.DEBUG, "7"), (logging.INFO, "6"), (logging.WARNING, "4"), (logging.ERROR, "3"),
              (logging.CRITICAL, "2")]
    here = inspect.currentframe()
    for level, _ in levels:
        line = here.f_lineno + 1
        logger.log(level, "at %s", logging.getLevelName(level))
    got = [journal_socket.entry() for _ in levels]
    assert [(e["MESSAGE"], e["PRIORITY"]) for e in got] == [(f"at {logging.getLevelName(lv)}", p) for lv, p in levels]
    e = got[0]
    assert (e["SYSLOG_IDENTIFIER"], e["LOGGER"], e["THREAD"]) == ("appliance-test", "test_journald", "MainThread")
    assert (e["CODE_FILE"], e["CODE_LINE"], e["CODE_FUNC"]) == (__file__, str(line), here.f_code.co_name)
    assert not any(e.via_memfd for e in got)


def test_python_levels_between_syslog_ones_take_the_lower_priority():
    assert [priority(n) for n in (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60)] == [7, 7, 7, 6, 6, 4, 4, 3, 3, 2, 2]


def test_a_traceback_is_one_entry_sent_binary_safe(journal_socket, logger):
    try:
        raise RuntimeError("adapter bug")
    except RuntimeError:
        logger.exception("txn %d: platform call failed unexpectedly", 7)
    e = journal_socket.entry()
    lines = e["MESSAGE"].split("\n")
    assert lines[0] == "txn 7: platform call failed unexpectedly" and lines[1].startswith("Traceback")
    assert lines[-1] == "RuntimeError: adapter bug" and e["PRIORITY"] == "3"
    assert b"MESSAGE\n" + struct.pack("<Q", len(e["MESSAGE"].encode())) in e.raw
    assert journal_socket.entries() == []  # one entry, not one per line


def test_an_entry_too_large_for_a_datagram_goes_whole_through_a_sealed_memfd(journal_socket, logger):
    big = "x" * (4 << 20)  # beyond any default datagram limit (EMSGSIZE)
    logger.warning("large: %s", big)
    e = journal_socket.entry()
    assert e.via_memfd and e.seals & REQUIRED_SEALS == REQUIRED_SEALS  # journald refuses an unsealed one
    assert e["MESSAGE"] == f"large: {big}" and e["PRIORITY"] == "4"
    logger.info("small again")
    assert not journal_socket.entry().via_memfd


def test_extra_fields_of_a_record_are_sent(journal_socket, logger):
    logger.info("txn 3: paid", extra={"journal_fields": {"TXN_ID": 3, "ORDER": "A1", "STATE": "paid"}})
    e = journal_socket.entry()
    assert (e["TXN_ID"], e["ORDER"], e["STATE"]) == ("3", "A1", "paid")


def test_without_journald_records_go_to_stderr_and_the_outage_is_said_once(journal_socket, logger, fallback):
    journal_socket.close()  # journald stops: its socket is gone
    logger.info("first")
    logger.error("second\nwith a second line")
    err = fallback.stream.getvalue()
    assert err.count("journald unreachable") == 1
    assert err.splitlines()[1:] == ["<6>test_journald: first", "<3>test_journald: second", "<3>with a second line"]
    assert err.startswith("<4>appliance.journald: journald unreachable at ")

    back = JournalSocket(journal_socket.path)  # journald is back
    try:
        logger.info("third")
        assert back.entry()["MESSAGE"] == "third"
        note = back.entry()
        assert note["MESSAGE"].startswith("journald takes entries again") and note["PRIORITY"] == "6"
        assert "third" not in fallback.stream.getvalue()
    finally:
        back.sock.close()


def test_records_from_many_threads_each_arrive_whole(journal_socket, logger):
    def write(n):
        for i in range(50):
            logger.info("thread %d line %d\n%s", n, i, "y" * 1000)

    threads = [threading.Thread(target=write, args=(n,), name=f"w{n}") for n in range(4)]
    for t in threads:
        t.start()
    got = [journal_socket.entry() for _ in range(200)]
    for t in threads:
        t.join()
    assert sorted(e["MESSAGE"].split("\n")[0] for e in got) == sorted(
        f"thread {n} line {i}" for n in range(4) for i in range(50))
    assert all(e["THREAD"] == f"w{e['MESSAGE'].split()[1]}" for e in got)


def test_a_journald_that_takes_nothing_costs_a_send_its_timeout_then_an_error(journal_socket):
    sender = JournalSender(journal_socket.path, timeout_s=0.3)  # nobody reads: its queue fills up
    try:
        for sent in range(100_000):
            t0 = time.monotonic()
            try:
                sender.send(encode([("MESSAGE", f"line {sent}")]))
            except OSError as e:
                error, waited = e, time.monotonic() - t0
                break
        else:
            pytest.fail("every send was taken by a socket nobody reads")
    finally:
        sender.close()
    assert isinstance(error, BlockingIOError) and 0.25 <= waited < 5.0 and sent >= 10
