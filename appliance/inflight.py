"""What one process knows about its open payments, in memory and in monotonic time.

The till and the resolver of one process share one `InFlight`. It answers three questions:

* **Is a platform call running for this payment?** `claim`/`release`: the resolver leaves a
  claimed payment alone.
* **How old is this payment?** `age_s`, in monotonic seconds. A payment the till opened in this
  process (`opened`) is timed from the monotonic instant it was opened. A payment first seen in
  the journal (opened by another process, or before a restart or a reboot) is timed from its
  wall-clock age at first sight, `wall() - created_at` clamped at >= 0, and monotonically from
  then on: the wall clock is read once per payment, never again.
* **Is it due?** `defer` sets the monotonic instant of the next attempt in the payment's current
  state; `due` answers it. A transition (a new `state`/`updated_at`) makes the payment due at once,
  as the journal's own transition resets its `next_attempt_at`.

So a wall-clock step (NTP after a cold boot without RTC, a technician's `date -s`) changes only the
timestamps: it never makes a payment reversed early, nor stalls it. The journal's `attempts`,
`next_attempt_at` and `retry_note` are kept for display (`appliance journal --txn`); `defer`
returns the wall-clock time to record there, and nothing here reads it back.

Waking the resolver: it sleeps until its next payment is due (`due_in_s`) or until something
changes here: `release` (a platform call of the till ended: its payment may be left open) and
`poke` (new work of another kind, or a stop) bump a version that `wait_change` waits on. So no
thread polls the journal for work.

Memory: one entry per payment this process touched that was open at the last `retain`; the
resolver calls `retain` on every pass, so final payments are forgotten.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Protocol


class _Open(Protocol):
    """The part of a journal `Txn` read here."""

    txn_id: int
    state: str
    created_at: str  # RFC 3339 UTC, written by the journal from the wall clock
    updated_at: str


@dataclass
class _Entry:
    origin: float | None = None  # monotonic seconds at which the payment was opened
    due_at: float = 0.0  # monotonic seconds of the next attempt ...
    due_in: tuple[str, str] | None = None  # ... valid while the payment is in this (state, updated_at)
    touched: int = 0  # generation of the last write (see `retain`)


def wall_epoch(rfc3339: str) -> float:
    """Epoch seconds of a journal timestamp ("2024-05-01T12:00:00.000Z")."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


class InFlight:
    """Per-process, thread-safe register of open payments; see the module docstring.

    `clock` is monotonic seconds (timeouts); `wall` is epoch seconds (read only to age a payment
    at first sight and to stamp the display-only `next_attempt_at`).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock = clock
        self.wall = wall
        self._ids: set[int] = set()
        self._entries: dict[int, _Entry] = {}
        self._generation = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0

    # --- platform calls running -------------------------------------------------------------

    def claim(self, txn_id: int) -> bool:
        """Mark a platform call for `txn_id` as running. False if one already is."""
        with self._lock:
            if txn_id in self._ids:
                return False
            self._ids.add(txn_id)
            return True

    def release(self, txn_id: int, *, wake: bool = True) -> None:
        """The platform call for `txn_id` ended. `wake` (the till's calls) wakes the resolver: the
        payment may be left open; the resolver's own releases pass False."""
        with self._lock:
            self._ids.discard(txn_id)
            if wake:
                self._bump()

    # --- waking the resolver ----------------------------------------------------------------

    def poke(self) -> None:
        """Wake whoever waits in `wait_change` (new work, or a stop)."""
        with self._lock:
            self._bump()

    def version(self) -> int:
        """The change count to pass to `wait_change`; take it before looking for work."""
        with self._lock:
            return self._version

    def wait_change(self, seen: int, timeout_s: float | None) -> bool:
        """Sleep until the version differs from `seen` (True) or `timeout_s` seconds of the real
        monotonic clock passed (False; None waits without limit)."""
        with self._lock:
            return self._changed.wait_for(lambda: self._version != seen, timeout_s)

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    # --- monotonic timeline -----------------------------------------------------------------

    def opened(self, txn_id: int) -> None:
        """The till has just journaled payment `txn_id`: its age counts from now (monotonic)."""
        with self._lock:
            self._entry(txn_id).origin = self.clock()

    def age_s(self, txn: _Open) -> float:
        """Monotonic seconds since `txn` was opened (first sight: its wall-clock age, >= 0)."""
        with self._lock:
            now = self.clock()
            entry = self._entry(txn.txn_id)
            if entry.origin is None:
                entry.origin = now - max(0.0, self.wall() - wall_epoch(txn.created_at))
            return now - entry.origin

    def defer(self, txn: _Open, after_s: float) -> float:
        """Make `txn` due again `after_s` monotonic seconds from now, unless it changes state first.

        Returns the wall-clock epoch seconds of that instant, for the journal's display-only
        `next_attempt_at`.
        """
        with self._lock:
            entry = self._entry(txn.txn_id)
            entry.due_at = self.clock() + after_s
            entry.due_in = (str(txn.state), txn.updated_at)
        return self.wall() + after_s

    def due(self, txn: _Open) -> bool:
        """True when `txn` should be attempted now: never deferred, deferred in an earlier state,
        or its deferral has run out."""
        with self._lock:
            entry = self._entries.get(txn.txn_id)
            if entry is None or entry.due_in != (str(txn.state), txn.updated_at):
                return True
            return self.clock() >= entry.due_at

    def due_in_s(self, txn: _Open) -> float:
        """Seconds until `txn` is due (0.0 when `due(txn)`)."""
        with self._lock:
            entry = self._entries.get(txn.txn_id)
            if entry is None or entry.due_in != (str(txn.state), txn.updated_at):
                return 0.0
            return max(0.0, entry.due_at - self.clock())

    def mark(self) -> int:
        """A generation number to pass to `retain`; take it before reading the open payments."""
        with self._lock:
            return next(self._generation)

    def retain(self, open_ids: set[int], mark: int) -> None:
        """Forget the payments not in `open_ids` (read from the journal after `mark` was taken),
        except those touched since `mark`: they may have been opened after the read."""
        with self._lock:
            for txn_id in [i for i, e in self._entries.items() if i not in open_ids and e.touched < mark]:
                del self._entries[txn_id]

    def tracked(self) -> int:
        """How many payments have a timeline entry (memory stays bounded: see `retain`)."""
        with self._lock:
            return len(self._entries)

    def _entry(self, txn_id: int) -> _Entry:
        entry = self._entries.setdefault(txn_id, _Entry())
        entry.touched = next(self._generation)
        return entry
