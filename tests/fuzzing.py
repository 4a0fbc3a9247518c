"""The fuzz harness: hostile input into a real lane, and the invariants every input surface keeps.

A surface (the scanner adapters today, the MQTT commands later) is fuzzed in three steps:

1. a hypothesis strategy draws its raw input (bytes, key events, lines, messages);
2. the surface's own code turns it into what it hands to the till (Scans today), which the test
   posts with `FuzzLane.deliver` exactly as the service wires it;
3. `FuzzLane.check()` then asserts the invariants below on the real lane (journal, sandbox
   platform, till) and on every log line captured meanwhile.

A command surface (the control socket today, the MQTT uplink later) ends in
`CommandHandler.handle(request)` instead of a Scan: its driver records each request with
`FuzzLane.sent` (and the valid ones it builds on purpose with `inserted_command`); the same checks
apply. The request strategies below (`garbage_requests`, `valid_charges`, `valid_cancels`) are shared
by every command surface.

Invariants:
  * No exception escapes the till (`drain` runs the handlers unguarded, unlike the till's loop).
  * Nothing is charged unless allowed: every journaled payment is for an order ticket the test
    inserted on purpose (`inserted_order`) and for a code that reached the till as one whole scan;
    the platform's own ledger holds no other trade and no code twice. Garbage is generated without
    ':' (`NO_COLON`), so with the default order pattern it can never be an order ticket itself.
  * No full payment code in any log line: neither a code the test inserted, nor any delivered
    text the classifier calls a payment code, nor any run of 16 or more digits delivered (for a
    command: in any string of the request but its order id, which is public and logged).
  * No traceback: no log record carries exception info (the till's run loop and the resolver log
    a bug with its traceback and carry on, so a crash there shows only in the log).
  * Bounded state: the till's duplicate-scan memory never holds more entries than payments made.

To add a surface, write its strategy and a `deliver_*` driver that ends in `FuzzLane.deliver`;
the checks stay as they are (a surface that is not a scan, e.g. an MQTT charge command, records
what it asked for with `inserted_order`/`inserted_code`, and the same ledger check applies).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hypothesis import strategies as st

from appliance.control import MAX_WAIT_S
from appliance.scan import Scan
from appliance.till import ORDER_ID

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


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Any text (control characters, NUL, lone surrogates, non-ASCII, digits), sometimes 64 KiB
    and more (a few characters repeated: long strings cost hypothesis nothing to draw)."""
    chars = st.characters(codec=None)
    return st.one_of(st.text(chars, max_size=max_size),
                     st.builds(lambda t, n: t * n, st.text(chars, min_size=1, max_size=3), st.integers(1, 70_000)))


#: Integers no JSON parser refuses but many a float conversion does (10**400), and the largest
#: Python's json reads (4300 digits); plus the machine-word edges.
HUGE_INTS = (2**31, 2**63, -(2**63), 2**64, 10**400, -(10**400), 10**4299)


def json_scalars() -> st.SearchStrategy[object]:
    """What a JSON parser can return for a scalar, in Python: None, bools, any int (huge ones
    too), any float (nan, +-inf, -0.0, subnormals), any text."""
    return st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS), st.floats(),
                     hostile_text(), code_like())


def json_values() -> st.SearchStrategy[object]:
    """Any parsed JSON value: scalars, lists and objects nested a few levels, or one list nested
    up to 300 deep (hypothesis prints a failing example recursively)."""
    nested = st.recursive(json_scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(hostile_text(10), inner, max_size=4)), max_leaves=10)
    return st.one_of(nested, st.integers(1, 300).map(_deep_list))


def _deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


CHARGE_FIELDS = ("op", "order", "amount_fen", "code", "source", "wait_s")
CANCEL_FIELDS = ("op", "order", "wait_s")
_SOURCE_OK = re.compile(r"[a-z][a-z0-9_-]{0,15}")
#: With the default payment-code rules (payment_types.toml), every code has 16 to 24 digits.
CODE_DIGITS = (16, 24)


def valid_waits() -> st.SearchStrategy[float]:
    return st.one_of(st.integers(0, int(MAX_WAIT_S)), st.floats(0, MAX_WAIT_S),
                     st.sampled_from([0, 0.0, 5e-324, MAX_WAIT_S, int(MAX_WAIT_S)]))


#: An order id that `FuzzLane.inserted_command` replaces with one never used before (hypothesis
#: draws the same few strings again and again: most orders would be paid already).
FRESH_ORDER = "<fresh>"


def valid_orders() -> st.SearchStrategy[str]:
    """Order ids the till takes: mostly new ones (`FRESH_ORDER`), else any, or one of a few that
    repeat (so that orders are paid twice, cancelled, cancelled again...)."""
    fresh = st.just(FRESH_ORDER)
    return st.one_of(fresh, fresh, st.from_regex(ORDER_ID, fullmatch=True), st.sampled_from(["F1", "F2", "F3", "F4"]))


def payment_codes() -> st.SearchStrategy[str]:
    """Codes of the default rules' shapes (WeChat, Alipay), whatever their sandbox outcome."""
    return st.one_of(st.builds(lambda p, n: f"{p}{n:016d}", st.integers(10, 15), st.integers(0, 10**16 - 1)),
                     st.builds(lambda p, n, k: f"{p}{n:022d}"[:k], st.integers(25, 30), st.integers(0, 10**22 - 1),
                               st.integers(16, 24)))


def valid_charges(max_amount_fen: int, codes: list[str]) -> st.SearchStrategy[dict]:
    """Charge requests built valid on purpose: an order id the till takes, an amount within the
    lane's limit (mostly below the sandbox's password limit), a payment code (new, one of `codes`
    - the sandbox's table - or any `code_like()`); optional fields sometimes left out. The till may
    still refuse one (order paid, code used, not a payment code)."""
    return st.fixed_dictionaries(
        {"op": st.just("charge"), "order": valid_orders(),
         "amount_fen": st.one_of(st.integers(1, 1000_00), st.integers(1, max_amount_fen), st.sampled_from([1, max_amount_fen])),
         "code": st.one_of(payment_codes(), payment_codes(), st.sampled_from(codes), code_like())},
        optional={"source": st.from_regex(_SOURCE_OK, fullmatch=True), "wait_s": valid_waits()})


def valid_cancels() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({"op": st.just("cancel"), "order": valid_orders()}, optional={"wait_s": valid_waits()})


def _not(pattern: re.Pattern) -> Callable[[str], bool]:
    return lambda s: not pattern.fullmatch(s)


def _non(*types: type) -> st.SearchStrategy[object]:
    """JSON scalars of none of these types (a bool counts as none: JSON's true is no number)."""
    return json_scalars().filter(lambda v: isinstance(v, bool) or not isinstance(v, types))


def _bad_values(max_amount_fen: int) -> dict[str, st.SearchStrategy[object]]:
    """For each field, values that make a request invalid whatever the other fields are."""
    lo, hi = CODE_DIGITS
    return {
        "op": json_values().filter(lambda v: v not in ("charge", "cancel", "sync")),
        "order": st.one_of(_non(str), st.just(""), hostile_text(70).filter(_not(ORDER_ID)),
                           st.from_regex(r"[A-Za-z0-9_-]{33,70}", fullmatch=True)),
        "amount_fen": st.one_of(_non(int), st.integers(max_value=0),
                                st.integers(min_value=max_amount_fen + 1), st.sampled_from(HUGE_INTS)),
        "code": st.one_of(_non(str), st.just(""), hostile_text(140).filter(lambda s: not (s.isascii() and s.isdigit())),
                          st.from_regex(rf"[0-9]{{1,{lo - 1}}}|[0-9]{{{hi + 1},140}}", fullmatch=True)),
        "source": st.one_of(_non(str), hostile_text(20).filter(_not(_SOURCE_OK))),
        "wait_s": st.one_of(_non(int, float), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                            st.floats(max_value=-5e-324), st.floats(min_value=MAX_WAIT_S, exclude_min=True),
                            st.integers(max_value=-1), st.integers(min_value=int(MAX_WAIT_S) + 1),
                            st.sampled_from(HUGE_INTS)),
    }


@st.composite
def _broken_commands(draw, max_amount_fen: int, codes: list[str]) -> dict:
    """A charge or cancel, each field valid or any JSON value, then broken for sure: at least one
    field gets a value it refuses, a required field goes, or a field it does not know comes."""
    bad = _bad_values(max_amount_fen)
    op = draw(st.sampled_from(["charge", "cancel"]))
    base = draw(valid_charges(max_amount_fen, codes) if op == "charge" else valid_cancels())
    fields = CHARGE_FIELDS if op == "charge" else CANCEL_FIELDS
    for key in fields[1:]:
        if draw(st.integers(0, 7)) == 0:
            base[key] = draw(json_values())  # maybe valid, maybe not
    required = [k for k in fields if k not in ("source", "wait_s")]
    unknown = st.one_of(st.sampled_from(CHARGE_FIELDS + ("pin", "Op", "order ")), hostile_text(20))
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["bad", "bad", "bad", "missing", "extra"]))
        if how == "bad":
            key = draw(st.sampled_from(fields))
            base[key] = draw(bad[key])
        elif how == "missing":
            base.pop(draw(st.sampled_from(required)), None)
        else:
            base[draw(unknown.filter(lambda k: k not in fields))] = draw(json_values())
    return base


def garbage_requests(max_amount_fen: int, codes: list[str]) -> st.SearchStrategy[object]:
    """Requests that must be refused: any JSON value (an object that does not even name an op, in
    most cases), or a charge or cancel broken for sure (see `_broken_commands`)."""
    return st.one_of(json_values().filter(lambda v: not (isinstance(v, dict) and v.get("op") in ("charge", "cancel", "sync"))),
                     _broken_commands(max_amount_fen, codes))


def strings_in(value: object) -> Iterator[str]:
    """Every str in a parsed JSON value, object keys included (iterative: any depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


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
        self.requests: list[object] = []
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

    def sent(self, request: object) -> None:
        """Record a command request handed to the command path (for the log check)."""
        self.requests.append(request)

    def inserted_command(self, request: dict) -> dict:
        """A command the test builds valid on purpose: its order (and code) may be charged.
        Returns it with a `FRESH_ORDER` replaced by a new order id."""
        if request["order"] == FRESH_ORDER:
            request = {**request, "order": f"N{len(self.orders)}"}
        self.orders.add(request["order"])
        if "code" in request:
            self.codes.add(request["code"])
        return request

    def clear(self) -> None:
        """Forget what was delivered and logged (the next example starts a new record; what was
        inserted stays allowed, since its payments stay in the journal)."""
        self.delivered.clear()
        self.requests.clear()
        self.caplog.clear()

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
        records = self.caplog.records
        tracebacks = [f"{r.name}: {r.getMessage()}" for r in records if r.exc_info or r.exc_text]
        assert not tracebacks, f"logged with a traceback: {tracebacks[:3]}"
        text = "\n".join(r.getMessage() for r in records)
        for secret in self.secrets():
            assert secret not in text, f"a full payment code {secret[:4]}... was logged"

    def secrets(self) -> set[str]:
        classify = self.lane.till.classifier.classify
        out = {c for c in self.codes if len(c) >= SECRET_DIGITS or classify(c).kind == "payment"}
        texts = [s.text for s in self.delivered if not s.defect]
        orders = set()
        for request in self.requests:
            order = request.get("order") if isinstance(request, dict) else None
            if isinstance(order, str):
                orders.add(order)
            texts += [s for s in strings_in(request) if s is not order]
        for text in texts:
            out.update(re.findall(rf"[0-9]{{{SECRET_DIGITS},}}", text))
            if classify(text).kind == "payment":
                out.add(text)
        # An order id is public (logged by design): a secret inside one was published by its sender.
        return {s for s in out if not any(s in order for order in orders)}

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


class JournalWatch:
    """Tells whether anything was committed to a journal since the last look: SQLite's
    `data_version` on a read-only connection of its own changes with every commit by any other
    connection (each journal transition commits its payment row and outbox row together)."""

    def __init__(self, state_dir: Path):
        self._db = sqlite3.connect(f"file:{Path(state_dir) / 'journal.sqlite'}?mode=ro", uri=True,
                                   check_same_thread=False)

    def version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@contextmanager
def thread_crashes() -> Iterator[list[str]]:
    """Collect the exceptions that end any thread while the block runs (pytest would only warn)."""
    crashes: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: crashes.append(f"{args.thread and args.thread.name}: "
                                                       f"{args.exc_type.__name__}: {args.exc_value}"[:300])
    try:
        yield crashes
    finally:
        threading.excepthook = previous


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
