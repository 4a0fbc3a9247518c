"""Composition root: config -> scanner -> till -> journal -> indicator, plus the resolver and the uplink.

The only place where adapters are chosen and wired. `run()` is `appliance run`: it stops cleanly
on SIGTERM/SIGINT within a few seconds (scanner closed, LED off, journal closed) and, after a
crash, resumes from the journal: the resolver finishes every payment left open.

One lane, one owner: `run()` takes the lane lock (`lanelock.py`) before it opens the journal and
holds it for its life; a second `run` on the same state dir waits up to `RUN_LOCK_WAIT_S`, then
exits 1. While it runs, its control socket (`control.py`) is the only way for the CLI (and later
the register and MQTT) to charge or cancel on this lane: the till runs those commands itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import appliance
from appliance.classify import Classifier, load_rules
from appliance.config import Config
from appliance.control import CommandHandler, ControlServer
from appliance.errors import JournalError
from appliance.filewatch import FileWatch
from appliance.indicator import Indicator, NullIndicator, make_indicator
from appliance.journal import Journal, rfc3339, utc_now
from appliance.lanelock import LaneBusy, LaneLock
from appliance.payments import Router
from appliance.resolver import InFlight, Resolver
from appliance.scan import Scanner, make_scanner
from appliance.status import StatusSource, StatusWriter, runtime_dir
from appliance.till import OfflinePolicy, Till
from appliance.uplink import Uplink, make_uplink
from appliance.uplink.commands import Commands
from appliance.wakeup import Stop, WakePipe, following

log = logging.getLogger(__name__)

def make_classifier(cfg: Config) -> Classifier:
    return Classifier(load_rules(cfg.classify.rules_file), cfg.classify.order_pattern,
                      {cfg.classify.cancel_card: "cancel"})


@dataclass
class Lane:
    """Everything one lane runs on, wired. `close()` releases it all, in order."""

    cfg: Config
    journal: Journal
    router: Router
    indicator: Indicator
    till: Till
    resolver: Resolver
    commands: CommandHandler
    uplink: Uplink

    def close(self) -> None:
        self.uplink.close(UPLINK_CLOSE_S)
        self.indicator.close()
        self.router.close()
        self.journal.close()


def build(cfg: Config, *, indicator: Indicator | None = None, uplink: bool = True) -> Lane:
    """Wire a lane. `indicator=None` builds the configured one (claims GPIO pins). `uplink=False`
    gives it the `none` uplink whatever `[mqtt]` says (one-shot commands never talk to head office).
    Nothing opens a socket until `run()` starts the uplink."""
    t = cfg.terminal
    journal = Journal(t.state_dir, t.store_id, t.terminal_id, time_zone=t.time_zone,
                      day_cutoff_hour=t.day_cutoff_hour, min_free_bytes=t.min_free_mb * 2**20)
    router = Router.from_config(cfg, t.state_dir)
    indicator = indicator if indicator is not None else make_indicator(cfg.indicator)
    in_flight = InFlight()
    till = Till(journal=journal, router=router, classifier=make_classifier(cfg), indicator=indicator,
                store_id=t.store_id, terminal_id=t.terminal_id,
                order_timeout_s=cfg.till.order_timeout_s, cancel_timeout_s=cfg.till.cancel_timeout_s,
                duplicate_window_s=cfg.till.duplicate_window_s, result_hold_s=cfg.till.result_hold_s,
                max_amount_fen=cfg.till.max_amount,
                offline=OfflinePolicy(cfg.offline.enabled, cfg.offline.max_amount, cfg.offline.max_count,
                                      cfg.offline.max_total),
                in_flight=in_flight)
    resolver = Resolver(journal, router, store_id=t.store_id, terminal_id=t.terminal_id,
                        stale_pending_s=cfg.till.stale_pending_s, forward_within_s=cfg.offline.forward_within_s,
                        in_flight=in_flight, on_change=till.post_resolved)
    uplink_cfg = cfg if uplink else dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, enabled=False))
    # Head office's commands and the uplink know each other: the uplink runs the commands, `sync`
    # reports the uplink's state. The lambda reaches `commands` once both exist (before any start).
    link = make_uplink(uplink_cfg, journal, commands=lambda name, payload: commands(name, payload),
                       health=till.health, platforms=list(cfg.providers))
    till.on_health_change(link.health_changed)  # the status follows the lane without polling it
    handler = CommandHandler(till, journal, uplink_state=link.state, sync_now=link.sync_now)
    commands = Commands(handler, till, link.state, link.sync_now, t.store_id, t.terminal_id)
    return Lane(cfg, journal, router, indicator, till, resolver, handler, link)


def build_headless(cfg: Config) -> Lane:
    """A lane for one-shot commands (charge, cancel): no scanner, no pins (the service holds them),
    no uplink (the service sends what they journal)."""
    return build(cfg, indicator=NullIndicator(), uplink=False)


def sd_notify(message: str) -> None:
    """Tell systemd about readiness/watchdog (Type=notify). A no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


#: On SIGTERM, how long the till may take to finish what it is doing (e.g. a platform call)
#: before the process exits anyway; systemd's TimeoutStopSec is 10 s, the contract here is 5 s.
STOP_GRACE_S = 3.0
#: At a stop, how long the uplink may take to send the last events and status `stopped` (after the
#: till stopped, so the last change goes out while the broker is up). With STOP_GRACE_S and the
#: resolver's second this stays well inside systemd's TimeoutStopSec.
UPLINK_CLOSE_S = 2.0
#: How long READY waits for the scanner's first attempt to open its device (it takes milliseconds;
#: past this the lane reports READY anyway, the scanner still being looked for).
SCANNER_OPEN_WAIT_S = 10.0
#: How long `appliance run` waits for a lane another process holds (an old instance still
#: stopping, a one-shot `charge`) before it exits 1 and lets systemd try again.
RUN_LOCK_WAIT_S = 15.0


def run(cfg: Config, *, stop: threading.Event | None = None, scanner: Scanner | None = None,
        lane: Lane | None = None, lock: LaneLock | None = None, lock_wait_s: float = RUN_LOCK_WAIT_S,
        config_path: Path | None = None) -> int:
    """The service. Returns the process exit code (0 after a clean stop, 1 if the lane stayed busy).

    SIGTERM, SIGINT and SIGHUP stop it cleanly (LED off, journal closed, exit 0). SIGHUP is the
    technician's "reload": under systemd (Restart=always) the service starts again at once and
    reads the config anew; a half-applied config in a running lane is never possible.

    The till runs in its own thread so that a stop request is honoured within seconds even while
    a platform call hangs: a payment cut off that way stays `pending` in the journal and is
    resolved (queried, never charged again) by the resolver at the next start. A client of the
    control socket waiting for that payment gets no answer (EOF).

    While it runs it keeps status.json in its runtime dir and systemd's STATUS= line
    (appliance/status.py); `config_path` is only reported there.
    """
    stop = following(stop) if stop is not None else Stop()  # a plain Event is followed (wakeup.py)
    previous = {}
    wake = None
    if threading.current_thread() is threading.main_thread():
        # A signal may be delivered to any thread, and Python runs its handler in the main thread
        # only once that thread runs again: the C handler writes the signal to `wake`, on which the
        # main thread sleeps (select), so it wakes for it wherever the kernel delivered it.
        wake = WakePipe()
        previous_fd = signal.set_wakeup_fd(wake.write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        return _run_owner(cfg, stop, scanner, lane, lock or LaneLock(cfg.terminal.state_dir), lock_wait_s,
                          config_path, wake)
    finally:
        for sig, handler in previous.items():  # run() in-process (tests, demo) leaves signals as it found them
            signal.signal(sig, handler)
        if wake is not None:
            signal.set_wakeup_fd(previous_fd)
            wake.close()


def _run_owner(cfg: Config, stop: Stop, scanner: Scanner | None, lane: Lane | None, lock: LaneLock,
               lock_wait_s: float, config_path: Path | None, wake: WakePipe | None = None) -> int:
    """Take the lane lock, then run the lane."""
    try:
        if not lock.acquire(lock_wait_s, stop=stop, on_wait=lambda pid: log.warning(
                "lane %s is held by %s; waiting up to %gs", lock.path, f"pid {pid}" if pid else "another process",
                lock_wait_s)):
            return 0  # stopped while waiting
    except LaneBusy as e:
        log.error("not starting: %s; only one process may drive this lane's journal", e)
        return 1
    still_busy = False
    try:
        still_busy = _run_locked(cfg, stop, scanner, lane, config_path, wake)
    finally:
        if not still_busy:  # else a thread may still write the journal: the lock goes with the process
            lock.release()
    return 0


def _run_locked(cfg: Config, stop: Stop, scanner: Scanner | None, lane: Lane | None,
                config_path: Path | None = None, wake: WakePipe | None = None) -> bool:
    """Run the lane until stop is set. True if a thread still waits on a platform call."""
    scanner = scanner or make_scanner(cfg.scanner)  # may raise ConfigError: before any pin is claimed
    lane = lane or build(cfg)
    open_count = len(lane.journal.open_txns())
    log.info("lane %s/%s starting: scanner %s, indicator %s, uplink %s, %d open payment(s) to resolve",
             cfg.terminal.store_id, cfg.terminal.terminal_id, cfg.scanner.kind, cfg.indicator.kind, lane.uplink.kind,
             open_count)
    watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
    _warn_of_calls_longer_than(watchdog_s, cfg)
    status = StatusWriter(runtime_dir(cfg), StatusSource(
        cfg, config_path=config_path, health=lane.till.health, platforms=lane.router.health, uplink=lane.uplink.state,
        uplink_kind=lane.uplink.kind, journal=lane.journal, version=appliance.__version__, started_at=rfc3339(utc_now())),
        notify=lambda summary: sd_notify(f"STATUS={summary}"))
    lane.journal.on_commit(status.poke)  # the backlog shown follows the uplink's acks, no timer
    watch = FileWatch(lane.journal.path, lane.till.post_journal_check)  # a lost journal shown at once, no timer
    resolver_thread = threading.Thread(target=lane.resolver.run, args=(stop,), name="resolver", daemon=True)
    till_thread = threading.Thread(
        target=lane.till.run, args=(stop,), name="till", daemon=True,
        kwargs={"heartbeat": (lambda: sd_notify("WATCHDOG=1")) if watchdog_s else None,
                "heartbeat_every_s": watchdog_s or 1.0, "on_event": status.poke,
                "journal_watched": watch.start()})
    control = ControlServer(cfg.terminal.state_dir, lane.commands)
    _lane_event(lane, "started", {"software_version": appliance.__version__, "open_payments": open_count,
                                  "uplink": lane.uplink.kind})
    try:
        scanner.start(lane.till.post_scan, lane.till.post_fault)
        resolver_thread.start()
        till_thread.start()
        control.start()
        lane.uplink.start()
        # READY once the config, the journal and the indicator (build()), the control socket and
        # the scanner are up. A missing scanner is not a failed start: the lane still takes charges
        # by command and resolves what is open, shows the fault and opens the scanner when it comes.
        if not scanner.wait_first_attempt(SCANNER_OPEN_WAIT_S):
            log.warning("scanner not open after %gs; reporting ready while it is still being opened",
                        SCANNER_OPEN_WAIT_S)
        sd_notify("READY=1")
        status.start()
        _sleep_until(stop, wake)
    finally:
        status.stop()  # no STATUS= after STOPPING=1
        sd_notify("STOPPING=1")
        log.info("stopping")
        stop.set()
        scanner.close()
        watch.close()
        control.stop_accepting()
        till_thread.join(timeout=STOP_GRACE_S)
        control.close()
        resolver_thread.join(timeout=1.0)
        busy = [t.name for t in (till_thread, resolver_thread) if t.is_alive()]
        if busy:
            log.warning("stopping while %s still waits on a platform call; open payments are resolved "
                        "at the next start", " and ".join(busy))
        _lane_event(lane, "stopped", {"waiting_on_platform": bool(busy)})
        lane.uplink.close(UPLINK_CLOSE_S)
        status.write("stopped")
        lane.close()
        log.info("stopped")
    return bool(busy)


def _warn_of_calls_longer_than(ping_every_s: float, cfg: Config) -> None:
    """The till pings the watchdog every `ping_every_s` (half systemd's WatchdogSec) and before each
    platform call, so a call that may take longer than that could get a healthy lane killed.
    The options refuse limits beyond half the unit's 30 s; this names a platform whose limit
    exceeds a shorter watchdog (a drop-in's WatchdogSec=)."""
    if not ping_every_s:
        return
    for name, provider in cfg.providers.items():
        limit = getattr(provider.options, "call_limit_s", None)
        if limit is not None and limit > ping_every_s:
            log.warning("providers.%s: one call may take %g s, longer than half the watchdog interval (%g s): "
                        "a slow platform can get the lane restarted; lower its timeouts or raise WatchdogSec",
                        name, limit, ping_every_s)


def _sleep_until(stop: Stop, wake: WakePipe | None) -> None:
    """Sleep until `stop` is set, without waking in between. In the main thread (`wake` given),
    on the signal wake-up pipe: an Event's wait would hold its lock while a signal handler that
    sets it may run in this very thread."""
    if wake is None:
        stop.wait()
        return
    unhook = stop.on_set(wake.wake)
    try:
        while not stop.is_set():
            select.select([wake.fd], [], [])
            wake.clear()  # a signal's handler has run by the time this call returns
    finally:
        unhook()


def _lane_event(lane: Lane, event: str, detail: dict) -> None:
    """Queue a lane event for head office, best effort: a journal that cannot take it (disk full)
    must not keep the lane from starting or stopping."""
    try:
        lane.journal.lane_event(event, detail)
    except JournalError as e:
        log.warning("lane event %s not queued for head office: %s", event, e)
