"""Logging for journald: no timestamps (journald adds them), one line per state change, each line
with its syslog priority, each line about a payment with that payment's fields.

Where the lines go, decided once by `setup()`:

- **Under journald** (systemd connected our stderr to the journal: `$JOURNAL_STREAM` holds the
  `device:inode` of that stream, and it is stderr's, per fstat(2); a child whose stderr was
  redirected elsewhere inherits the variable but does not match), each record is a native
  journal entry (appliance/journald.py) with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=appliance,
  CODE_FILE/CODE_LINE/CODE_FUNC, LOGGER, THREAD and, when it is about one payment, TXN_ID,
  ORDER, STATE and OUT_TRADE_NO. So `journalctl -u appliance -p warning` shows the warnings and
  worse, and `journalctl -u appliance TXN_ID=42` one payment's whole life. When journald's
  socket is missing or a send fails, the record goes to stderr instead (see below): nothing is
  lost, only the payment fields.
- **On stderr under journald** (the fallback, and when there is no native socket), every line
  starts with its syslog priority `<N>`: `<2>` critical, `<3>` error, `<4>` warning, `<6>` info,
  `<7>` debug. journald (SyslogLevelPrefix=yes, its default) strips it and files the line with that
  priority; a multi-line record (a traceback) has the prefix on each of its lines, since journald
  files each line of a stream as its own entry.
- **Anywhere else** (a technician's terminal, a pipe, a file): plain `LEVEL logger: message`
  lines, no `<N>` noise.

Payment fields: the till and the resolver handle one payment at a time per thread; they wrap that
handling in `enter(txn)` ... `leave(token)` (in a `finally`), and every line logged in between on
that thread (adapters' included) carries the payment's fields. A line that states a payment's new
state passes `extra=state_of(new)`: it carries the new STATE, and so do the lines after it until
`leave()`. Lines about an order without a payment pass `extra=order(...)`. Payment codes never go
in a field: ORDER and OUT_TRADE_NO are not secret, the code is logged only masked, in MESSAGE.

`APPLIANCE_JOURNAL_SOCKET` overrides journald's socket path: tests only (a socket of their own).
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from typing import Protocol, TextIO

from appliance.journald import SOCKET_PATH, JournalHandler, priority

#: Libraries that log secrets at DEBUG: peewee logs every SQL statement with its parameters, among
#: them the full payment code of a payment accepted offline. They log at INFO at most, whatever the
#: configured level.
_QUIET_BELOW_INFO = ("peewee",)
#: Libraries that log every request at INFO (httpx: each platform call's URL and status). The
#: adapters log what changed, once; these log warnings only.
_QUIET_BELOW_WARNING = ("httpx", "httpcore")
#: Tests point the native handler at a socket of their own with this variable.
SOCKET_ENV = "APPLIANCE_JOURNAL_SOCKET"

TERMINAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"  # the priority says the level


def setup(level: str = "INFO", *, stream: TextIO | None = None, identifier: str = "appliance") -> None:
    """Send the process's log records where the module docstring says, at `level` and above."""
    stream = stream if stream is not None else sys.stderr
    under_journald = is_journal_stream(stream)
    text = logging.StreamHandler(stream)
    text.setFormatter(PriorityFormatter(JOURNAL_FORMAT) if under_journald else logging.Formatter(TERMINAL_FORMAT))
    handler: logging.Handler = text
    path = os.environ.get(SOCKET_ENV, SOCKET_PATH)
    if under_journald and os.path.exists(path):
        handler = JournalHandler(text, path=path, identifier=identifier)
        handler.addFilter(PaymentFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET_BELOW_INFO:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    for name in _QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)


def is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journal stream systemd gave us ($JOURNAL_STREAM is its dev:ino)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed, or not a file (pytest's capture)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class PriorityFormatter(logging.Formatter):
    """Formats a record with its syslog priority `<N>` at the start of each of its lines."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


# --- the payment a line is about ------------------------------------------------------------------


class _Payment(Protocol):
    txn_id: int
    order: str
    state: object
    out_trade_no: str


_about: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("appliance_payment", default=None)


def payment_fields(txn: _Payment) -> dict[str, str]:
    """The journal fields of a payment: TXN_ID, ORDER, STATE, OUT_TRADE_NO (nothing secret)."""
    return {"TXN_ID": str(txn.txn_id), "ORDER": txn.order, "STATE": str(txn.state), "OUT_TRADE_NO": txn.out_trade_no}


def enter(txn: _Payment) -> contextvars.Token:
    """From now on, every record logged on this thread is about `txn` (carries its fields), until
    `leave()` with the token returned: call it in a `finally`."""
    return _about.set(payment_fields(txn))


def leave(token: contextvars.Token) -> None:
    """End the scope `enter()` began (and return to the one before it, if any)."""
    _about.reset(token)


def state_of(txn: _Payment) -> dict:
    """`extra=` for the line that states a payment's new state (it need not be the one in scope)."""
    return {"journal_fields": payment_fields(txn)}


def order(value: str) -> dict:
    """`extra=` for a line about an order that has no payment yet (a valid order id: not secret)."""
    return {"journal_fields": {"ORDER": value}}


def txn_id(value: int) -> dict:
    """`extra=` for a line about a payment known only by its id here."""
    return {"journal_fields": {"TXN_ID": str(value)}}


class PaymentFields(logging.Filter):
    """Gives each record the fields of the payment in scope (`enter`), overridden by its own
    (`extra=state_of(...)`). A record's own fields of the payment in scope update the scope: the
    lines after a state change carry the new STATE."""

    def filter(self, record: logging.LogRecord) -> bool:
        scope = _about.get()
        own = getattr(record, "journal_fields", None)
        if scope is not None and own and own.get("TXN_ID") == scope["TXN_ID"]:
            scope.update(own)
        record.journal_fields = {**(scope or {}), **(own or {})}
        return True
