"""Shared fixtures: a lane config on a temporary state dir, wired lanes, journal snapshots."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

from appliance.config import from_dict

# Property tests must not flake on a slow CI machine: no per-example deadline. They draw the same
# examples on every run, so that CI's verdict is about the change; HYPOTHESIS_RANDOM=1 explores
# new ones (and found the order-pattern warning of tests/test_classify.py).
settings.register_profile("appliance", deadline=None, derandomize=not os.environ.get("HYPOTHESIS_RANDOM"))
settings.load_profile("appliance")

ROOT = Path(__file__).resolve().parent.parent
ALL_TYPES = ("wechat", "alipay", "unionpay", "ecny", "jdpay", "bestpay")

# Payment codes by sandbox outcome (see appliance/payments/sandbox.py).
WECHAT_PAID = "134567890123456700"
WECHAT_PAID_2 = "134567890123456701"
ALIPAY_NOTENOUGH = "286123456789012390"
WECHAT_EXPIRED = "134567890123456791"
WECHAT_PASSWORD_OK = "134567890123456792"
WECHAT_PASSWORD_GIVEUP = "134567890123456793"
WECHAT_SYSTEMERROR = "134567890123456794"
WECHAT_UNREACHABLE = "134567890123456795"
WECHAT_LOST_ANSWER = "134567890123456796"
WECHAT_SLOW = "134567890123456797"


def lane_dict(state_dir: Path, **sections) -> dict:
    """A complete config document for tests: sandbox for every type, fast timings."""
    doc = {
        # the service's status.json beside the state dir, never in the machine's /run/appliance
        "terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(state_dir),
                     "runtime_dir": str(Path(state_dir).with_name(Path(state_dir).name + "-run"))},
        "till": {"result_hold_s": 0.05, "duplicate_window_s": 10.0, "stale_pending_s": 0.5},
        "scanner": {"kind": "none"},
        "indicator": {"kind": "mock"},
        "providers": {"sandbox": {"kind": "sandbox", "first_query_after_s": 0.0, "query_every_s": 0.05,
                                  "reverse_after_s": 0.3, "slow_ms": 3000}},
        "routing": {t: "sandbox" for t in ALL_TYPES},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


@pytest.fixture
def cfg(tmp_path):
    return from_dict(lane_dict(tmp_path / "state"))


@pytest.fixture
def lane(cfg):
    from appliance import service
    from appliance.indicator import make_indicator

    lane = service.build(cfg, indicator=make_indicator(cfg.indicator))
    yield lane
    lane.close()


@pytest.fixture
def lane_broker(make_broker):
    """A broker whose ACL knows conftest.lane_dict's lane (S0001/L01), queueing without limit.
    (mosquitto 2.0.11 with max_queued_messages 0 drops a client whose publish its ACL denied.)"""
    return make_broker(lanes=[("S0001", "L01")], max_queued_messages=1_000_000)


@pytest.fixture
def lane_journal(tmp_path):
    """A real journal of lane S0001/L01 in tmp_path/state (where lane_dict's state dir is)."""
    from appliance.journal import Journal

    journal = Journal(tmp_path / "state", "S0001", "L01")
    yield journal
    journal.close()


@pytest.fixture
def uplinks():
    """`uplinks(cfg, journal, **kw)` makes an uplink (appliance.uplink.make_uplink) and starts it;
    teardown closes each."""
    from appliance.uplink import make_uplink

    made = []

    def make(cfg, journal, **kw):
        uplink = make_uplink(cfg, journal, **kw)
        made.append(uplink)
        uplink.start()
        return uplink

    yield make
    for uplink in made:
        uplink.close(1.0)


@pytest.fixture
def journal_socket(tmp_path):
    """A stand-in for journald's native socket (tests/journald_kit.py), bound in tmp_path."""
    from journald_kit import JournalSocket

    sock = JournalSocket(tmp_path / "journal.sock")
    yield sock
    sock.sock.close()


def journal_snapshot(journal) -> tuple:
    """Everything journaled: payments with their states and every outbox event."""
    return (tuple(journal.recent(limit=10_000)), tuple(e["event_id"] for e in journal.events()))


def write_config(path: Path, doc: dict) -> Path:
    """Write a config document as TOML (tests only need strings, numbers, booleans, arrays of
    those, tables)."""
    lines = []

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):  # e.g. backup_base_urls = [] from a simulator's table
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix, d):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", doc)
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(predicate, timeout: float = 20.0, every_s: float = 0.02) -> bool:
    """Poll predicate until it is true (True) or timeout passes (False). Generous by default:
    other test runs share the cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False


def resolve(lane, txn_id: int, timeout: float = 10.0):
    """Step `lane.resolver` until payment `txn_id` is final or `timeout` passes; return it as
    `lane.journal` has it."""
    from appliance.journal import OPEN_STATES

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lane.resolver.step()
        txn = lane.journal.get(txn_id)
        if txn.state not in OPEN_STATES:
            return txn
        time.sleep(0.02)
    return lane.journal.get(txn_id)


def appliance_cmd() -> list[str]:
    return [sys.executable, "-m", "appliance"]


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("APPLIANCE_CONFIG", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM",
                        "APPLIANCE_JOURNAL_SOCKET")}
    env.update(extra)
    return env


class SmallDisk:
    """A tmpfs of a few hundred KiB (needs root and mount): `fill()` takes every free byte, `free()`
    gives it back. Real ENOSPC for the journal, not a simulation."""

    def __init__(self, path: Path):
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextmanager
def tmpfs(path: Path, size: str = "4m"):
    """A real tmpfs mounted at `path` for the test's duration; skips the test where mount is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.system(f"mount -t tmpfs -o size={size} tmpfs {path} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): no small or read-only disk to test on")
    try:
        yield path
    finally:
        os.system(f"umount -l {path}")


def remount_read_only(path: Path) -> None:
    assert os.system(f"mount -o remount,ro {path}") == 0


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        yield SmallDisk(mnt)


class Recorder:
    """An Indicator that records what the cashier was shown."""

    def __init__(self):
        self.shown = []
        self.current = None

    def show(self, signal):
        self.current = signal
        self.shown.append(signal)

    def close(self):
        pass


@pytest.fixture
def make_broker(tmp_path_factory):
    """A factory of real mosquitto brokers (tests/broker.py), each in a directory of its own:
    `make_broker(prefix=..., lanes=..., autosave_interval=...)` returns a started `Broker`.
    Teardown kills every broker it made, whatever state the test left it in."""
    from broker import Broker

    made = []

    def make(**options):
        broker = Broker(tmp_path_factory.mktemp("broker"), **options)
        made.append(broker)
        return broker.start()

    yield make
    for broker in made:
        broker.kill()


@pytest.fixture
def broker(request, make_broker):
    """A fresh mosquitto for this test: users `lane-S001-01`..`03` and `hq`, topic prefix "lanes".
    Other options: `@pytest.mark.parametrize("broker", [{"prefix": "x", "lanes": [...]}], indirect=True)`."""
    return make_broker(**getattr(request, "param", {}))

#: The machine's PostgreSQL (Debian's, started before the session and in CI): trust auth on loopback.
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture(scope="session")
def postgres_server():
    """A database of its own on this machine's PostgreSQL for this test session, dropped after:
    `new_database()` returns the URL of another fresh database (dropped at the end too)."""
    import secrets

    import psycopg2

    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} (user postgres, trust) is needed: {e}")
    admin.autocommit = True
    made = []

    def new_database() -> str:
        name = f"hq_test_{os.getpid()}_{secrets.token_hex(4)}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"

    yield new_database
    with admin.cursor() as cur:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def hq_db_url(request, tmp_path):
    """A fresh, empty head-office database URL: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hq.sqlite'}"
    return request.getfixturevalue("postgres_server")()
