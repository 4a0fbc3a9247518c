"""The state directory's identity: which journal lives here, and proof that its files belong together.

Three files carry one journal id (a random hex string made when the journal is created):

    journal.sqlite     the journal; its `meta` table holds the id, the lane (store/terminal), and a
                       check value of the code-digest key
    code-digest.key    the device secret behind the code digests, with the id it belongs to
    journal.id         the id and the lane, in plain text beside the journal, for the technician

A writer (the service, `charge`, `cancel`) opens the journal only when the three agree with each
other and with the configured lane. Anything else is refused with `JournalIntegrityError`
(exit code 6) before a payment can be taken, because each of these loses the memory of what was
charged and would let a paid order or a used code be charged again:

    * the journal missing or empty where a key or an id file shows that one existed;
    * a key or id file missing, or belonging to another journal;
    * a journal of another lane (a state dir copied or swapped from elsewhere).

A genuinely new installation is a state dir with no trace of a journal at all: none of the three
files. Creating one is a two-phase commit, so that a power cut during the very first start is
not mistaken for a lost journal: every file is first written completely under a `.new` name,
then each is renamed into place. At the next open, `.new` files that form a complete set are
rolled forward; an incomplete set with no final file yet is discarded and creation starts over.

A state dir written before journal ids existed (a code-digest.key of bare hex, no journal.id, no
id in the journal) is upgraded in place once, keeping its key.

All files are created 0600 and the directory 0700 when this module creates it; created by root,
files belong to the state dir's owner (the service user). Callers hold
`settle()`'s directory lock only while it runs; it serialises processes that open one state dir
at the same moment.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from appliance.errors import JournalError, JournalIntegrityError

log = logging.getLogger(__name__)

JOURNAL = "journal.sqlite"
KEY = "code-digest.key"
ID = "journal.id"
ROLES = (JOURNAL, KEY, ID)
NEW = ".new"

#: What the documentation and every refusal point the technician to.
RECOVERY = ("restore the state dir from a backup; to start a new journal on purpose, stop the service and "
            "move every file of the state dir aside (see docs/reliability.md)")


@dataclass(frozen=True)
class Identity:
    """What a writer needs from the state dir once it is known to be whole."""

    journal_id: str
    code_key: bytes = field(repr=False)  # the device secret behind code digests: never in a repr


def key_check(key: bytes) -> str:
    """A value stored in the journal that proves a key file belongs to it, without revealing the key."""
    return hmac.new(key, b"appliance journal key check", hashlib.sha256).hexdigest()[:16]


def settle(state_dir: Path, store_id: str, terminal_id: str, init_schema: Callable[[Path], None],
           now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> Identity:
    """Make sure `state_dir` holds one whole journal of this lane and return its identity.

    Creates the journal when the directory has no trace of one (`init_schema(conn)` creates the
    tables in a fresh database file), finishes an interrupted creation, upgrades a pre-identity
    journal, and otherwise only checks. Raises JournalIntegrityError when the files do not belong
    together, JournalError when the directory cannot be used at all.
    """
    try:
        _make_dir(state_dir)
        with _dir_lock(state_dir):
            _finish_interrupted_creation(state_dir)
            present = [r for r in ROLES if (state_dir / r).exists()]
            if not present:
                _create(state_dir, store_id, terminal_id, init_schema, now())
            return _check(state_dir, store_id, terminal_id, present or list(ROLES))
    except OSError as e:
        raise JournalError(f"cannot open the journal in {state_dir}: {e.strerror or e} "
                           "(run as the service user, e.g. sudo -u appliance appliance ...)") from None


def _make_dir(state_dir: Path) -> None:
    if state_dir.is_dir():
        return
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        state_dir.mkdir(mode=0o700)
    except FileExistsError:
        if not state_dir.is_dir():
            raise
    os.chmod(state_dir, 0o700)  # the umask may have narrowed it; never widen what exists


@contextmanager
def _dir_lock(state_dir: Path):
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- creation --------------------------------------------------------------------------------


def _create(state_dir: Path, store_id: str, terminal_id: str, init_schema, at: datetime) -> None:
    journal_id = secrets.token_hex(16)
    key = secrets.token_bytes(32)
    stamp = at.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    # Phase 1: every file complete under its .new name.
    _write_identity(state_dir, journal_id, key, store_id, terminal_id, stamp)
    tmp = state_dir / f".{JOURNAL}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # SQLite's -wal/-shm copy mode and owner
    _give_to_dir_owner(fd, state_dir)
    os.close(fd)
    init_schema(tmp)
    alphabet = string.ascii_lowercase + string.digits
    _put_meta(tmp, journal_id, key, store_id, terminal_id, created_at=stamp,
              epoch="".join(secrets.choice(alphabet) for _ in range(3)))
    _fsync(tmp)
    os.rename(tmp, state_dir / (JOURNAL + NEW))
    _fsync(state_dir)
    # Phase 2: into place.
    _roll_forward(state_dir)
    log.info("new journal %s created in %s for lane %s/%s", journal_id, state_dir, store_id, terminal_id)


def _write_identity(state_dir: Path, journal_id: str, key: bytes, store_id: str, terminal_id: str,
                    created_at: str | None) -> None:
    """Phase 1 of a creation or an upgrade: the key file and journal.id, complete, under .new names."""
    _write_file(state_dir / (KEY + NEW), json.dumps({"journal_id": journal_id, "key": key.hex()}) + "\n")
    _write_file(state_dir / (ID + NEW), json.dumps({"journal_id": journal_id, "store_id": store_id,
                                                   "terminal_id": terminal_id, "created_at": created_at},
                                                  indent=1) + "\n")


def _put_meta(path: Path, journal_id: str, key: bytes, store_id: str, terminal_id: str, **more: str) -> None:
    """Record the journal's identity (id, key check, lane, and `more`) in its meta table, durably."""
    meta = {"journal_id": journal_id, "key_check": key_check(key), "store_id": store_id,
            "terminal_id": terminal_id, **more}
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
    finally:
        conn.close()


def _finish_interrupted_creation(state_dir: Path) -> None:
    """Roll a creation (or upgrade) forward when its .new files and the journal agree on one id;
    discard one the journal never took part in; refuse anything else."""
    for leftover in state_dir.glob(".*.tmp-*"):
        leftover.unlink()  # written before its rename: never part of anything
    pending = [r for r in ROLES if (state_dir / (r + NEW)).exists()]
    if not pending:
        return
    chosen = {_id_of(state_dir, r + NEW if r in pending else r) for r in ROLES}
    if len(chosen) == 1 and None not in chosen:
        log.warning("finishing the creation of journal %s interrupted in %s", chosen.pop(), state_dir)
        _roll_forward(state_dir)
    elif JOURNAL in pending or _id_of(state_dir, JOURNAL) not in {_id_of(state_dir, r + NEW) for r in pending}:
        log.warning("discarding an incomplete journal creation in %s", state_dir)
        for r in pending:
            (state_dir / (r + NEW)).unlink()
        _fsync(state_dir)
    else:
        raise JournalIntegrityError(f"{state_dir} holds parts of two journals; {RECOVERY}")


def _roll_forward(state_dir: Path) -> None:
    for r in ROLES:
        new = state_dir / (r + NEW)
        if new.exists():
            os.rename(new, state_dir / r)
    _fsync(state_dir)


def _write_file(path: Path, text: str) -> None:
    """Write a small file completely (0600, fsynced) under a temporary name, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _give_to_dir_owner(fd, path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync(path.parent)


def _give_to_dir_owner(fd: int, state_dir: Path) -> None:
    """Run as root (`sudo appliance charge` with the service stopped), hand a new file to the owner
    of the state dir, so that the service's user can still open it."""
    if os.geteuid() == 0:
        owner = os.stat(state_dir)
        os.fchown(fd, owner.st_uid, owner.st_gid)


def _fsync(path: Path) -> None:
    """fsync a file, or a directory (so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading and checking --------------------------------------------------------------------


def _id_of(state_dir: Path, name: str) -> str | None:
    """The journal id a file carries, or None when it carries none (unreadable, legacy, damaged)."""
    path = state_dir / name
    try:
        if name.startswith(JOURNAL):
            return _journal_meta(path).get("journal_id")
        return json.loads(path.read_text()).get("journal_id")
    except (OSError, ValueError, AttributeError, sqlite3.Error):
        return None


def _journal_meta(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def _check(state_dir: Path, store_id: str, terminal_id: str, present: list[str]) -> Identity:
    jpath, kpath, ipath = (state_dir / r for r in ROLES)
    if JOURNAL not in present:
        raise JournalIntegrityError(
            f"the journal {jpath} is missing, but {' and '.join(present)} show that this state dir held one: "
            f"its history (paid orders, used codes) is gone; {RECOVERY}")
    if jpath.stat().st_size == 0:
        raise JournalIntegrityError(f"the journal {jpath} is empty (0 bytes): its history is gone; {RECOVERY}")
    try:
        meta = _journal_meta(jpath)
    except sqlite3.Error as e:
        raise JournalIntegrityError(f"the journal {jpath} cannot be read ({e}); {RECOVERY}") from None
    if KEY not in present:
        raise JournalIntegrityError(
            f"the code-digest key {kpath} is missing: used payment codes could no longer be recognised; {RECOVERY}")
    key_doc = _read_key(kpath)
    if "journal_id" not in meta and key_doc.get("journal_id") is None and ID not in present:
        return _upgrade(state_dir, store_id, terminal_id, meta, key_doc)
    journal_id = meta.get("journal_id")
    if journal_id is None:
        raise JournalIntegrityError(f"the journal {jpath} carries no journal id but {kpath} or {ipath} do; {RECOVERY}")
    key = key_doc["key"]
    if key_doc.get("journal_id") != journal_id or not hmac.compare_digest(key_check(key), meta.get("key_check", "")):
        raise JournalIntegrityError(
            f"the code-digest key {kpath} does not belong to journal {journal_id}; {RECOVERY}")
    if ID not in present:
        raise JournalIntegrityError(f"{ipath} is missing beside journal {journal_id}; {RECOVERY}")
    try:
        id_doc = json.loads(ipath.read_text())
    except ValueError:
        id_doc = {}
    if not isinstance(id_doc, dict) or id_doc.get("journal_id") != journal_id:
        raise JournalIntegrityError(
            f"{ipath} names journal {id_doc.get('journal_id') if isinstance(id_doc, dict) else '?'}, but the journal "
            f"here is {journal_id}: the state dir was swapped or mixed; {RECOVERY}")
    lane = (meta.get("store_id"), meta.get("terminal_id"))
    if lane != (store_id, terminal_id):
        raise JournalIntegrityError(
            f"the journal in {state_dir} belongs to lane {lane[0]}/{lane[1]}, but this config is lane "
            f"{store_id}/{terminal_id}: wrong terminal.state_dir, or a state dir copied from another lane")
    return Identity(journal_id, key)


def _read_key(path: Path) -> dict:
    """{"journal_id": str | None, "key": bytes}; a legacy key file is bare hex with no id."""
    text = path.read_text().strip()
    try:
        doc = json.loads(text) if text.startswith("{") else {"journal_id": None, "key": text}
        key = bytes.fromhex(doc["key"])
    except (ValueError, KeyError, TypeError):
        raise JournalIntegrityError(f"the code-digest key {path} is damaged; {RECOVERY}") from None
    if len(key) != 32:
        raise JournalIntegrityError(f"the code-digest key {path} is damaged ({len(key)} bytes, expected 32); "
                                    f"{RECOVERY}")
    return {"journal_id": doc.get("journal_id"), "key": key}


def _upgrade(state_dir: Path, store_id: str, terminal_id: str, meta: dict, key_doc: dict) -> Identity:
    """Give a journal from before journal ids its identity, keeping its key (so used codes stay used).

    The same two phases as a creation: the new key and id files under .new names, then the id in
    the journal (the commit point), then the renames."""
    if "epoch" not in meta:
        raise JournalIntegrityError(f"{state_dir / JOURNAL} is not a lane journal; {RECOVERY}")
    journal_id = secrets.token_hex(16)
    key = key_doc["key"]
    _write_identity(state_dir, journal_id, key, store_id, terminal_id, None)
    _put_meta(state_dir / JOURNAL, journal_id, key, store_id, terminal_id)
    _roll_forward(state_dir)
    log.warning("journal in %s upgraded: it is now journal %s", state_dir, journal_id)
    return Identity(journal_id, key)
