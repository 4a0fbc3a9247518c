"""The fuzz harness: hostile input into a real lane, and the invariants every input surface keeps.

A surface (the scanner adapters today, the MQTT commands later) is fuzzed in three steps:

1. a hypothesis strategy draws its raw input (bytes, key events, lines, messages);
2. the surface's own code turns it into what it hands to the till (Scans today), which the test
   posts with `FuzzLane.deliver` exactly as the service wires it;
3. `FuzzLane.check()` then asserts the invariants below on the real lane (journal, sandbox
   platform, till) and on every log line captured meanwhile.

Invariants:
  * No exception escapes the till (`drain` runs the handlers unguarded, unlike the till's loop).
  * Nothing is charged unless allowed: every journaled payment is for an order ticket the test
    inserted on purpose (`inserted_order`) and for a code that reached the till as one whole scan;
    the platform's own ledger holds no other trade and no code twice. Garbage is generated without
    ':' (`NO_COLON`), so with the default order pattern it can never be an order ticket itself.
  * No full payment code in any log line: neither a code the test inserted, nor any delivered
    text the classifier calls a payment code, nor any run of 16 or more digits delivered.
  * Bounded state: the till's duplicate-scan memory never holds more entries than payments made.

To add a surface, write its strategy and a `deliver_*` driver that ends in `FuzzLane.deliver`;
the checks stay as they are (a surface that is not a scan, e.g. an MQTT charge command, records
what it asked for with `inserted_order`/`inserted_code`, and the same ledger check applies).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hypothesis import strategies as st

from appliance.scan import Scan

#: Garbage never contains ':': the default order pattern (ORD:<order>:<amount>) needs it.
NO_COLON = ":"
#: Delivered digit runs at least this long are treated as secrets in the log check.
SECRET_DIGITS = 16


# --- strategies ------------------------------------------------------------------------------


def garbage_text(max_size: int = 80) -> st.SearchStrategy[str]:
    """Any text without ':': control characters, NUL, non-ASCII, digits, lone surrogates."""
    return st.text(st.characters(codec=None, exclude_characters=NO_COLON), max_size=max_size)


def code_like() -> st.SearchStrategy[str]:
    """Digit strings around real code lengths (8-30), many of them valid-looking payment codes."""
    return st.one_of(st.from_regex(r"[0-9]{8,30}", fullmatch=True),
                     st.from_regex(r"1[0-5][0-9]{16}", fullmatch=True),  # WeChat-shaped
                     st.from_regex(r"2[5-9][0-9]{14,22}", fullmatch=True))  # Alipay-shaped


def _run(byte_values: st.SearchStrategy[int], max_len: int) -> st.SearchStrategy[bytes]:
    """One byte repeated up to `max_len` times: long lines cost hypothesis nothing to draw."""
    return st.builds(lambda b, n: bytes([b]) * n, byte_values, st.integers(1, max_len))


def garbage_bytes(max_run: int = 70_000) -> st.SearchStrategy[bytes]:
    """Bytes without ':' as a scanner could send them: random bytes (invalid UTF-8, NULs, every
    control), CR/LF/CRLF, code-like digits, and long runs up to 64 KiB and more."""
    no_colon = st.integers(0, 255).filter(lambda b: b != ord(NO_COLON))
    piece = st.one_of(
        st.binary(max_size=64).map(lambda b: b.replace(NO_COLON.encode(), b"")),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"]Q1"]),
        code_like().map(str.encode),
        _run(no_colon, max_run),
    )
    return st.lists(piece, max_size=20).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (any values; reduced modulo its length, sorted)."""
    if not data:
        return []
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# --- the lane under fuzz ---------------------------------------------------------------------


class FuzzLane:
    """A real lane (see conftest `lane`) plus the record the invariants are checked against."""

    def __init__(self, lane, caplog) -> None:
        self.lane = lane
        self.caplog = caplog
        self.delivered: list[Scan] = []
        self.orders: set[str] = set()
        self.codes: set[str] = set()

    # -- feeding --

    def deliver(self, scan: Scan) -> None:
        """Hand one scan to the till as the service does (post, then the till's thread handles it)."""
        self.delivered.append(scan)
        self.lane.till.post_scan(scan)

    def inserted_order(self, order: str, amount: str) -> str:
        """An order ticket the test sends on purpose; returns its text."""
        self.orders.add(order)
        return f"ORD:{order}:{amount}"

    def inserted_code(self, code: str) -> str:
        self.codes.add(code)
        return code

    def drain(self) -> None:
        """Handle every posted scan now; any exception escapes to the test."""
        self.lane.till.drain()
        self.lane.till.tick()

    # -- invariants --

    def check(self) -> None:
        self.check_charges()
        self.check_logs()
        assert len(self.lane.till._recent_codes) <= len(self.lane.journal.recent(limit=100_000))

    def check_charges(self) -> None:
        journal = self.lane.journal
        payments = journal.recent(limit=100_000)
        whole = {s.text for s in self.delivered if not s.defect} | self.codes
        charged = {t for t in whole if journal.code_used(t)}
        for p in payments:
            assert p.order in self.orders, f"txn {p.txn_id}: order {p.order!r} was never inserted"
        assert len(charged) == len(payments), "a payment for a code that never arrived as one whole scan"
        trades = ledger_trades(journal.state_dir)
        assert len(trades) <= len(payments), "the platform holds a trade the journal does not"
        assert len(set(trades)) == len(trades), "a code charged twice"

    def check_logs(self) -> None:
        text = "\n".join(r.getMessage() for r in self.caplog.records)
        for secret in self.secrets():
            assert secret not in text, f"a full payment code {secret[:4]}... was logged"

    def secrets(self) -> set[str]:
        out = set(self.codes)
        classify = self.lane.till.classifier.classify
        for s in self.delivered:
            if s.defect:
                continue
            out.update(re.findall(rf"[0-9]{{{SECRET_DIGITS},}}", s.text))
            if classify(s.text).kind == "payment":
                out.add(s.text)
        return out

    def assert_nothing_charged(self) -> None:
        assert self.lane.journal.recent(limit=10) == []
        assert ledger_trades(self.lane.journal.state_dir) == []


def ledger_trades(state_dir: Path) -> list[str]:
    """The code digests of every trade in the sandbox platform's own ledger (read-only)."""
    path = Path(state_dir) / "sandbox-ledger.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT code_sha256 FROM trade")]
    except sqlite3.OperationalError:  # created, no table yet
        return []
    finally:
        db.close()


# --- memory ----------------------------------------------------------------------------------


class _Discard(logging.Handler):
    """Formats every record, as journald's handler would, then drops it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


@contextmanager
def logs_discarded() -> Iterator[None]:
    """The appliance's logs formatted and dropped instead of kept by pytest's capture: a flood
    measured for memory must not be charged for the test's own log buffer."""
    logger = logging.getLogger("appliance")
    handler, propagate, level = _Discard(), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


def peak_bytes(work: Callable[[], object]) -> int:
    """Peak of traced memory allocated while `work()` runs, above what was allocated before."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base
