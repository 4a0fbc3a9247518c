"""The lane's status: what the running service knows, kept in a file for `appliance status`.

The service (`StatusWriter`, wired in service.py) keeps `status.json` in its runtime dir
(`$RUNTIME_DIRECTORY`, which systemd sets for `RuntimeDirectory=appliance`, else `[terminal]
runtime_dir`, default /run/appliance): the version, the scanner and indicator, each platform's
last result and last error, the lane state and its faults, the uplink and the outbox, the open
payments, the free space in the state dir and the clock's sync state. Schema:
appliance/schemas/service_status.json. The file is replaced atomically (a temporary file, then
rename), mode 0640 whatever the umask (the unit's UMask=0077), so that the service's group can
read it; nothing in it is secret (no payment code, no key, reasons masked).

Timing: the writer wakes every `EVERY_S` seconds and rewrites the file each time, so its age
says whether the service still runs; a reader calls it stale after `stale_after_s(every_s)`. The
timer is slow on purpose: an idle lane wakes less than once a second in all (issue 10), and this
timer was most of it at 5 s. Changes do not wait for it: the till pokes the writer after each
event it handles (a scan, a command, a resolved payment) and the journal after each commit (a
payment's step, the uplink's acknowledged rows, so the backlog shown is current); the file is then
rewritten within `MIN_GAP_S`, which also bounds a burst of events to one write a second. What
changes without a commit or an event (the uplink's connection lost, free space, the clock) shows
at the next timer write. Each time the one-line summary
("ready · backlog 0 · uplink connected · 2 open", plus "scanner fault" ... when faults are
raised) changes, it is sent to systemd as STATUS= (`systemctl status appliance` shows it), never
twice the same. At a stop the file is written once more with state "stopped", and nothing is
sent after STOPPING=1.

`report()` is `appliance status`: it runs as any user, with or without the service, takes no lock
and writes nothing. It reads the status file, whether the lane lock is held (`lanelock.held`),
the journal read-only (counts by state, the open payments, the outbox), the free space and the
clock itself. Schema of its JSON: appliance/schemas/status_report.json.

The clock: the service reads only systemd-timesyncd's flag file `TIMESYNCD_FLAG` (the unit's
SystemCallFilter=@system-service does not allow adjtimex: with SystemCallErrorNumber=EPERM a call
fails with EPERM, it does not kill the service); the
CLI asks the kernel with adjtimex(2) (read-only, any NTP daemon: TIME_ERROR or STA_UNSYNC mean
not synchronized), and falls back to the flag file when adjtimex is refused.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable

from appliance.journal import Journal, rfc3339, utc_now
from appliance.redact import mask_digit_runs

log = logging.getLogger(__name__)

FILENAME = "status.json"
#: Seconds between rewrites of the status file while the service runs (changes come sooner: pokes).
EVERY_S = 30.0
#: A poke (the till handled an event) rewrites the file this many seconds later, with every change
#: made meanwhile: a burst of scans makes one write a second, not one per scan.
MIN_GAP_S = 1.0
#: File mode of the status file: the service's user writes, its group reads.
FILE_MODE = 0o640
#: systemd-timesyncd creates this file once it has synchronized the clock (systemd >= 239).
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
#: The most open payments a report lists (the rest are counted).
OPEN_LISTED = 50


def stale_after_s(every_s: float) -> float:
    """A status file older than this is stale: three rewrites missed, with room for a loaded Pi."""
    return 3 * every_s + 5.0


def runtime_dir(cfg) -> Path:
    """Where status.json lives: the first path of $RUNTIME_DIRECTORY (systemd), else the config's."""
    env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(env) if env else Path(cfg.terminal.runtime_dir)


# --- what the lane's surroundings look like ----------------------------------------------------

def free_space(path: Path) -> dict:
    """{"path", "free_bytes", "total_bytes"} of the filesystem holding `path` (None, None if it
    cannot be read). free_bytes is what an unprivileged writer (the journal) may still use."""
    try:
        st = os.statvfs(path)
    except OSError:
        return {"path": str(path), "free_bytes": None, "total_bytes": None}
    return {"path": str(path), "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h), as glibc's adjtimex(2) takes it."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("_reserved", ctypes.c_int * 11)]


TIME_ERROR = 5  # adjtimex's answer when the clock is not synchronized
STA_UNSYNC = 0x0040  # status bit: the clock is not synchronized


def kernel_clock() -> dict | None:
    """The kernel's view of the clock by adjtimex(2) with modes 0 (reads, changes nothing):
    {"synced", "source": "adjtimex", "detail"}; None when the call is not possible here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (ctypes.util
        # would bring subprocess and its kin, issue 10)
        tx = _Timex()
        rc = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if rc == -1:
        return None  # EPERM under a seccomp filter, ENOSYS
    synced = rc != TIME_ERROR and not tx.status & STA_UNSYNC
    detail = (f"kernel: synchronized, max error {tx.maxerror / 1000:g} ms" if synced
              else "kernel: not synchronized (TIME_ERROR / STA_UNSYNC); no NTP daemon has set it")
    return {"synced": synced, "source": "adjtimex", "detail": detail}


def timesyncd_clock(flag: Path = TIMESYNCD_FLAG) -> dict:
    """systemd-timesyncd's view: {"synced", "source": "timesyncd", "detail"}; synced None when
    timesyncd does not run here (another NTP daemon may: ask the kernel)."""
    if flag.exists():
        return {"synced": True, "source": "timesyncd", "detail": f"{flag} exists"}
    if flag.parent.is_dir():
        return {"synced": False, "source": "timesyncd", "detail": f"timesyncd runs but has not synchronized ({flag} absent)"}
    return {"synced": None, "source": "timesyncd", "detail": "unknown: systemd-timesyncd does not run here"}


def clock_sync(*, kernel: bool) -> dict:
    """The clock's sync state: the kernel's (`kernel=True`, the CLI) when adjtimex works, else
    timesyncd's flag (the service: see the module docstring)."""
    return (kernel_clock() if kernel else None) or timesyncd_clock()


def scanner_view(scfg, faults: dict | None = None) -> dict:
    """{"kind", "device", "present"} of the configured scanner. `present` is None where there is no
    device to look for (stdin, none, evdev found by name); with the lane's `faults`, a raised
    scanner fault makes it False."""
    device = scfg.device or ("/dev/scanner" if scfg.kind == "serial" else "")
    if not device and scfg.kind == "evdev":
        device = "match " + " ".join(x for x in (scfg.match_vid_pid, scfg.match_name) if x)
    present = os.path.exists(device) if device.startswith("/") else None
    if faults is not None and scfg.kind not in ("stdin", "none"):
        present = "scanner" not in faults and present is not False
    return {"kind": scfg.kind, "device": device, "present": present}


def summary(lane: str, faults: dict, uplink: dict, open_payments: int | None) -> str:
    """The STATUS= line: "ready · backlog 0 · uplink connected · 2 open", then "<source> fault"
    for each raised fault."""
    if uplink.get("kind") == "none":
        link = "uplink off"
    else:
        link = "uplink connected" if uplink.get("connected") else "uplink down"
    parts = [lane.replace("_", " "), f"backlog {uplink['backlog']}" if "backlog" in uplink else "backlog ?", link,
             f"{open_payments} open" if open_payments is not None else "open ?"]
    return " · ".join(parts + [f"{source} fault" for source in sorted(faults)])


# --- the service's side --------------------------------------------------------------------------

class StatusSource:
    """The snapshot the service writes, from the lane's parts (each read is safe from any thread).

    `health` is Till.health, `platforms` Router.health, `uplink` Uplink.state; `journal` is read
    for the open payments' count. A part that cannot be read (the journal lost, say) is reported
    as such; the snapshot is still written."""

    def __init__(self, cfg, *, config_path: Path | None, health: Callable[[], dict],
                 platforms: Callable[[], dict], uplink: Callable[[], dict], uplink_kind: str, journal: Journal,
                 version: str, started_at: str, clock: Callable[[], datetime] = utc_now):
        self.cfg = cfg
        self._config_path = config_path
        self._health, self._platforms, self._uplink, self._uplink_kind = health, platforms, uplink, uplink_kind
        self._journal = journal
        self._version = version
        self._started_at = started_at
        self._clock = clock

    def release(self) -> None:
        """Close the calling thread's journal connection (the writer's thread, as it ends)."""
        self._journal.close()

    def snapshot(self, state: str, every_s: float = EVERY_S) -> dict:
        h = self._health()
        try:
            uplink = self._uplink()
        except Exception as e:  # the journal's outbox cannot be read: the link's part is still known
            uplink = {"kind": self._uplink_kind, "error": mask_digit_runs(str(e))[:200]}
        try:
            open_payments: int | None = sum(self._journal.open_counts().values())
        except Exception:  # as above: the journal itself is at fault, and the lane's faults say so
            open_payments = None
        t = self.cfg.terminal
        return {"kind": "service_status", "version": 1, "written_at": rfc3339(self._clock()), "every_s": every_s,
                "state": state, "pid": os.getpid(), "started_at": self._started_at,
                "software_version": self._version,
                "config_path": str(self._config_path) if self._config_path else None,
                "store_id": t.store_id, "terminal_id": t.terminal_id,
                "summary": summary(h["lane"], h["faults"], uplink, open_payments) if state == "running" else state,
                "lane": h["lane"], "faults": h["faults"],
                "scanner": scanner_view(self.cfg.scanner, h["faults"]), "indicator": {"kind": self.cfg.indicator.kind},
                "platforms": self._platforms(), "uplink": uplink, "open_payments": open_payments,
                "state_dir": free_space(t.state_dir), "clock": clock_sync(kernel=False)}


def write_atomically(path: Path, doc: dict, mode: int = FILE_MODE) -> None:
    """Replace `path` by `doc` as JSON: a temporary file beside it, fchmod'ed to `mode` (the umask
    does not apply), then renamed over it, so that a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
            f.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StatusWriter:
    """Keeps status.json and systemd's STATUS= line up to date while the service runs.

    `start()` starts a thread that writes a snapshot at once and then every `every_s` seconds, and
    soon after a `poke()` (any thread; returns at once; see MIN_GAP_S). `stop()` ends the thread
    and waits for it, so that nothing is notified after it returns (the service calls it before
    STOPPING=1); both idempotent. `write("stopped")` then writes the last snapshot. `notify` gets
    each new summary line of a running lane (the service sends it as STATUS=). A file that cannot be written
    (no runtime dir, no permission, disk full) is logged once; the service runs on without it.
    """

    def __init__(self, directory: Path, source: StatusSource, *, notify: Callable[[str], None] | None = None,
                 every_s: float = EVERY_S):
        self.path = Path(directory) / FILENAME
        self._source = source
        self._notify = notify
        self.every_s = every_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._sent: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it: no write and no notify happen after this returns."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def poke(self) -> None:
        """Something changed: rewrite the file soon."""
        self._wake.set()

    def _run(self) -> None:
        try:
            while True:
                self.write("running")
                if self._wake.wait(self.every_s) and not self._stop.wait(MIN_GAP_S):
                    self._wake.clear()  # the changes of the last MIN_GAP_S are in the next write
                if self._stop.is_set():
                    return
        finally:
            self._source.release()

    def write(self, state: str) -> dict | None:
        """Take a snapshot, write it, and notify its summary if it changed. Returns the snapshot."""
        try:
            doc = self._source.snapshot(state, self.every_s)
        except Exception:  # a bug here must not take the lane down; the file goes stale and says so
            log.exception("status: the snapshot failed")
            return None
        try:
            if not self.path.parent.is_dir():  # systemd makes it; elsewhere its parent must exist
                self.path.parent.mkdir(mode=0o750)
            write_atomically(self.path, doc)
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.warning("status file %s cannot be written (%s); appliance status will call the service "
                            "not running", self.path, os.strerror(e.errno) if e.errno else e)
        else:
            if self._failing:
                self._failing = False
                log.info("status file %s written again", self.path)
        if self._notify is not None and doc["summary"] != self._sent and state == "running" \
                and not self._stop.is_set():
            self._sent = doc["summary"]
            self._notify(doc["summary"])
        return doc


# --- appliance status --------------------------------------------------------------------------

def read_status_file(path: Path) -> tuple[dict | None, str | None]:
    """(the status file's document, None) or (None, why it cannot be used)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"no status file {path}"
    except OSError as e:
        return None, f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}"
    try:
        doc = json.loads(text)
    except ValueError:
        return None, f"{path} is not JSON (half written?)"
    if not isinstance(doc, dict) or doc.get("kind") != "service_status":
        return None, f"{path} is not a status file"
    return doc, None


def report(cfg, config_path: Path, *, now: datetime | None = None) -> dict:
    """Everything `appliance status` shows, as one dict (schema status_report.json). Reads only."""
    from appliance import __version__
    from appliance.lanelock import held

    now = now or utc_now()
    t = cfg.terminal
    path = runtime_dir(cfg) / FILENAME
    doc, problem = read_status_file(path)
    lock_held = held(t.state_dir)
    age = (now - datetime.fromisoformat(doc["written_at"])).total_seconds() if doc else None
    stale = doc is not None and age > stale_after_s(float(doc.get("every_s", EVERY_S)))
    running = doc is not None and doc.get("state") == "running" and not stale and lock_held is not False
    if running:
        reason = ""
    elif doc is None:
        reason = problem + ("; the lane is held (by a one-shot command, or a service that cannot write its "
                            "status)" if lock_held else "")
    elif doc.get("state") == "stopped":
        reason = f"stopped at {doc['written_at']}"
    elif lock_held is False:
        reason = f"the last status ({doc['written_at']}) says running, but nothing holds the lane: the service died"
    else:
        reason = f"the status file is stale: last written {doc['written_at']}" + (
            "; the lane is still held: the service may hang" if lock_held else "")
    service = {"running": running, "reason": reason, "summary": doc.get("summary") if running else None,
               "pid": doc.get("pid") if doc else None, "software_version": doc.get("software_version") if doc else None,
               "status_file": str(path), "status_age_s": round(age, 3) if age is not None else None,
               "stale": stale, "lane_held": lock_held}
    faults = doc.get("faults", {}) if running else {}
    journal, outbox = _journal_part(cfg, now)
    u = doc.get("uplink", {}) if doc else {}
    uplink = {"kind": u.get("kind") or ("mqtt" if cfg.mqtt.enabled else "none"),
              "connected": running and bool(u.get("connected")),
              "connected_since": u.get("connected_since") if running else None,
              "last_error": u.get("last_error") or u.get("error")}
    platforms = {name: {"kind": p.kind, "last_result": None, "last_error": None} for name, p in cfg.providers.items()}
    if doc:
        platforms.update({k: v for k, v in doc.get("platforms", {}).items() if k in platforms})
    return {"kind": "status_report", "version": 1, "at": rfc3339(now), "software_version": __version__,
            "config_path": str(config_path), "store_id": t.store_id, "terminal_id": t.terminal_id,
            "service": service, "lane": doc.get("lane") if running else None, "faults": faults,
            "scanner": scanner_view(cfg.scanner, faults if running else None),
            "indicator": {"kind": cfg.indicator.kind}, "platforms": platforms, "journal": journal,
            "outbox": outbox, "uplink": uplink, "state_dir": free_space(t.state_dir),
            "clock": clock_sync(kernel=True)}


def _journal_part(cfg, now: datetime) -> tuple[dict, dict | None]:
    """({"counts", "open", "open_more", "error"}, the outbox state or None), read-only."""
    import dataclasses

    from appliance.errors import JournalError

    t = cfg.terminal
    try:
        journal = Journal(t.state_dir, t.store_id, t.terminal_id, readonly=True)
    except JournalError as e:
        return {"counts": {}, "open": [], "open_more": 0, "error": str(e)}, None
    try:
        counts = journal.counts()
        txns = journal.open_txns()
        try:
            outbox = dataclasses.asdict(journal.outbox_state())
        except JournalError:  # an older schema: migrated at the service's next start
            outbox = None
    except JournalError as e:
        return {"counts": {}, "open": [], "open_more": 0, "error": str(e)}, None
    finally:
        journal.close()
    listed = [{"txn_id": x.txn_id, "order": x.order, "amount": x.as_dict()["amount"], "amount_fen": x.amount_fen,
               "state": str(x.state), "platform": x.platform, "code_masked": x.code_masked,
               "out_trade_no": x.out_trade_no, "created_at": x.created_at,
               "age_s": round(max(0.0, (now - datetime.fromisoformat(x.created_at)).total_seconds()), 3),
               "reason": mask_digit_runs(x.reason)[:200]} for x in txns[:OPEN_LISTED]]
    return {"counts": counts, "open": listed, "open_more": max(0, len(txns) - OPEN_LISTED), "error": None}, outbox

