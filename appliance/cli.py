"""`appliance` command line. Thin: each subcommand parses, calls one function, returns an exit code.

Exit codes: 0 ok/paid, 1 other error, 2 config (or usage) error, 3 declined (a cancel: refused by
the platform), 4 unknown (still being resolved), 5 refused (bad input, policy); the last three come
from `till.Result.exit_code`; 6 the journal is not whole (missing, empty, replaced, or its key or id
file does not belong to it: see docs/reliability.md). `DEBUG=1` shows tracebacks of unexpected errors.

`charge` and `cancel` go to the running service's till over its control socket; with no service
they hold the lane lock and run on a headless lane (`control.submit`). Either way the output is
the same. Also exit 1: the lane stayed busy (another one-shot command held it for 15 s) or the
service could not be reached; exit 4: the service stopped before it answered.

`sync` asks the running service for its uplink's state (and wakes the uplink to send at once);
with no service it reads the journal's outbox read-only and says the service is not running.
Exit 0: nothing waits to be sent, or the service's uplink is connected (what waits is on its
way); exit 1: events wait and nothing is sending them (no service, the broker not connected, or
`[mqtt]` disabled), as well as for any other error.

`status` reads the service's status file, the lane lock, the journal (read-only), the free space
and the clock; it works with or without the service (appliance/status.py). Exit 0: the service
runs and no fault is raised; exit 1: it does not run (or its status file is stale), a fault is
raised, or the journal cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from appliance import __version__
from appliance.config import DEFAULT_PATH, ENV_VAR, Config, ConfigError, config_path, load, to_toml
from appliance.errors import ApplianceError, BadInput, JournalIntegrityError
from appliance.money import format_amount, parse_amount

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_REFUSED, EXIT_INTEGRITY = 0, 1, 2, 5, 6


def _config(args) -> Config:
    return load(config_path(args.config))


def _two_malloc_arenas() -> None:
    """glibc gives threads that allocate at once malloc arenas of their own (up to 8 per core) and
    keeps what each freed; with a thread per control connection the lane's RSS creeps up with
    them. Two arenas serve its threads (which take turns on the GIL anyway): mallopt(M_ARENA_MAX),
    before any thread starts. Elsewhere than glibc, nothing happens."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def cmd_run(args) -> int:
    # The lane's journal is plain sqlite3 (no peewee: tests/test_journal_schema.py); should anything
    # bring peewee in after all, keep it from loading its PostgreSQL driver, which only head office
    # uses (psycopg2 with its own libpq, libssl and libcrypto: ~6 MB resident on a 512 MB Pi).
    # Nothing in `appliance run` imports head-office code; in a process that already has psycopg2
    # (tests) this changes nothing.
    sys.modules.setdefault("psycopg2", None)
    _two_malloc_arenas()
    from appliance import service
    from appliance.logs import setup

    path = config_path(args.config)
    cfg = load(path)
    setup(cfg.logging.level)
    return service.run(cfg, config_path=path)


def _print_result(result, as_json: bool) -> None:
    _print_reply(result.as_dict(), as_json)


def _print_reply(d: dict, as_json: bool) -> None:
    """Print a Result's dict (from this process or from the service's reply)."""
    if as_json:
        print(json.dumps(d, ensure_ascii=False))
    else:
        head = f"txn {d['txn_id']} {d['out_trade_no']}: " if d["txn_id"] else ""
        print(f"{head}{d['state']}" + (f" ({d['reason']})" if d["reason"] else ""))


def _wait_for_end(lane, result, wait_s: float):
    """Drive the resolver in-process until the payment is definite or wait_s passes."""
    from appliance.journal import OPEN_STATES
    from appliance.till import Result

    txn = result.txn
    deadline = time.monotonic() + wait_s
    while txn is not None and txn.state in OPEN_STATES and time.monotonic() < deadline:
        lane.resolver.step(only=txn.txn_id)
        txn = lane.journal.get(txn.txn_id)
        if txn.state in OPEN_STATES:
            time.sleep(0.1)
    return Result.of(txn, result.cancel) if txn is not None else result


def _headless(cfg: Config, args, operation) -> dict:
    """Run one till operation on a headless lane (the caller holds the lane lock)."""
    from appliance.control import reply_of
    from appliance.service import build_headless

    lane = build_headless(cfg)
    try:
        result = operation(lane.till)
        if args.wait:
            result = _wait_for_end(lane, result, args.wait)
    finally:
        lane.close()
    return reply_of(result)


def _one_shot(cfg: Config, args, request: dict, operation) -> int:
    """Run one charge or cancel on this lane, through the service if one runs, and print its result."""
    from appliance import control
    from appliance.logs import setup
    from appliance.till import Result

    setup("WARNING" if args.json else cfg.logging.level)

    def busy(pid):
        print(f"appliance: lane busy: held by {f'pid {pid}' if pid else 'another process'}; "
              f"waiting up to {control.LOCK_WAIT_S:g}s", file=sys.stderr)

    try:
        reply = control.submit(cfg.terminal.state_dir, request, lambda: _headless(cfg, args, operation),
                               on_wait=busy)
    except control.ServiceGone as e:
        print(f"appliance: {e}", file=sys.stderr)
        _print_result(Result("unknown", str(e), cancel=request["op"] == "cancel"), args.json)
        return control.GONE_EXIT
    if "error" in reply:
        print(f"appliance: {reply['error']}", file=sys.stderr)
        return reply["exit_code"]
    code = reply.pop("exit_code")
    _print_reply(reply, args.json)
    return code


def cmd_charge(args) -> int:
    from appliance.till import Result

    cfg = _config(args)
    code = sys.stdin.readline().rstrip("\r\n") if args.code == "-" else args.code
    try:
        amount = parse_amount(args.amount)
    except BadInput as e:
        print(f"appliance: refused: {e}", file=sys.stderr)
        _print_result(Result("refused", str(e)), args.json)
        return EXIT_REFUSED
    request = {"op": "charge", "order": args.order, "amount_fen": amount, "code": code, "source": "command",
               "wait_s": args.wait}
    return _one_shot(cfg, args, request, lambda till: till.charge(args.order, amount, code, source="command"))


def cmd_cancel(args) -> int:
    request = {"op": "cancel", "order": args.order, "wait_s": args.wait}
    return _one_shot(_config(args), args, request, lambda till: till.cancel(args.order))


def cmd_sync(args) -> int:
    from appliance import control
    from appliance.journal import Journal

    cfg = _config(args)
    t = cfg.terminal
    try:
        reply = control.call(t.state_dir, {"op": "sync"})
    except control.ServiceGone:  # it is stopping: what it leaves is in the journal
        reply = None
    if reply is not None and "error" in reply:
        print(f"appliance: {reply['error']}", file=sys.stderr)
        return reply["exit_code"]
    if reply is not None:
        running, uplink = True, reply["uplink"]
    else:
        journal = Journal(t.state_dir, t.store_id, t.terminal_id, readonly=True)
        try:
            outbox = dataclasses.asdict(journal.outbox_state())
        finally:
            journal.close()
        running = False
        uplink = {"kind": "mqtt" if cfg.mqtt.enabled else "none", "connected": False, "connected_since": None,
                  "last_error": None, **outbox}
    if args.json:
        print(json.dumps({"service_running": running, **uplink}, ensure_ascii=False))
    else:
        print_sync(running, uplink)
    return EXIT_OK if uplink["backlog"] == 0 or (running and uplink["connected"]) else EXIT_ERROR


def print_sync(running: bool, u: dict, out=None, now: datetime | None = None) -> None:
    """The outbox and the uplink as `appliance sync` shows them, times with their age."""
    out = out or sys.stdout
    now = now or datetime.now(timezone.utc)

    def ago(at: str) -> str:
        return _ago(at, now)

    if not running:
        link = "not running: nothing sends the outbox until `appliance run` starts"
    else:
        link = f"running, uplink {_uplink_text(u, now)}"
    print(f"service:   {link}", file=out)
    backlog = f"{u['backlog']} event(s) queued"
    if u["oldest_queued_seq"] is not None:
        backlog += f"; oldest seq {u['oldest_queued_seq']}, queued {ago(u['oldest_queued_at'])}"
    print(f"backlog:   {backlog}", file=out)
    last_ack = f"seq {u['last_ack_seq']} at {ago(u['last_ack_at'])}" if u["last_ack_seq"] is not None else "none yet"
    print(f"last ack:  {last_ack}", file=out)
    print(f"last seq:  {u['last_seq']}", file=out)


def _ago(at: str | None, now: datetime) -> str:
    """An RFC 3339 time with its age: "2026-11-29T08:00:00.000Z (2h 0m ago)"; None is "never"."""
    return f"{at} ({_age((now - datetime.fromisoformat(at)).total_seconds())} ago)" if at else "never"


def _uplink_text(u: dict, now: datetime) -> str:
    """The uplink's kind and connection, as `sync` and `status` show it."""
    if u["kind"] == "none":
        return "none: [mqtt] is disabled, events stay queued"
    if u["connected"]:
        return f"{u['kind']} connected since {_ago(u['connected_since'], now)}"
    return f"{u['kind']} not connected" + (f" ({u['last_error']})" if u["last_error"] else "")


def _age(seconds: float) -> str:
    """A duration as a person reads it: 42s, 3m 5s, 2h 10m, 4d 3h (a negative one, clock skew, is 0s)."""
    s = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86_400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s}s"


def cmd_status(args) -> int:
    from appliance.status import report

    path = config_path(args.config)
    r = report(load(path, check_secrets=False), path)  # the secrets are root's; a technician need not read them
    if args.json:
        print(json.dumps(r, ensure_ascii=False))
    else:
        print_status(r)
    healthy = r["service"]["running"] and not r["faults"] and r["journal"]["error"] is None
    return EXIT_OK if healthy else EXIT_ERROR


def print_status(r: dict, out=None, now: datetime | None = None) -> None:
    """`appliance status` for people: one aligned line per part, times with their age."""
    out = out or sys.stdout
    now = now or datetime.fromisoformat(r["at"])

    def ago(at: str | None) -> str:
        return _ago(at, now)

    def line(label: str, text: str) -> None:
        print(f"{label + ':':<11}{text}", file=out)

    s = r["service"]
    if s["running"]:
        line("service", f"running, pid {s['pid']}; {s['summary']} (status {_age(s['status_age_s'])} old)")
    else:
        line("service", f"NOT RUNNING: {s['reason']}")
    line("version", r["software_version"] + (f" (the service runs {s['software_version']})"
                                             if s["software_version"] not in (None, r["software_version"]) else ""))
    line("config", f"{r['config_path']} (lane {r['store_id']}/{r['terminal_id']})")
    faults = "; ".join(f"{k}: {v}" for k, v in sorted(r["faults"].items())) or "none"
    line("lane", f"{r['lane'] or 'unknown (service not running)'}; faults: {faults}")
    sc = r["scanner"]
    present = {True: "present", False: "MISSING", None: "presence not known"}[sc["present"]]
    line("scanner", f"{sc['kind']} {sc['device'] or '(no device)'}: {present}")
    line("indicator", r["indicator"]["kind"])
    for name, p in sorted(r["platforms"].items()):
        res, err = p["last_result"], p["last_error"]
        res_text = f"{res['status']} {res['code']} ({res['call']}) at {ago(res['at'])}" if res else "none"
        err_text = f"{err['reason']} ({err['call']}) at {ago(err['at'])}" if err else "none"
        line("platform", f"{name} ({p['kind']}): last result {res_text}; last error {err_text}")
    j = r["journal"]
    if j["error"]:
        line("journal", f"cannot be read: {j['error']}")
    else:
        line("journal", ", ".join(f"{n} {state}" for state, n in sorted(j["counts"].items())) or "no payments")
    for t in j["open"]:
        line("open", f"txn {t['txn_id']:<5} order {t['order']:<12} {t['amount']:>10}  {t['state']:<16} "
                     f"{_age(t['age_s']):>7} old  {t['platform']}  {t['code_masked']}")
    if j["open_more"]:
        line("open", f"... and {j['open_more']} more (appliance journal --state ...)")
    o = r["outbox"]
    if o is not None:
        oldest = f", oldest seq {o['oldest_queued_seq']} queued {ago(o['oldest_queued_at'])}" if o["backlog"] else ""
        last_ack = f"seq {o['last_ack_seq']} at {ago(o['last_ack_at'])}" if o["last_ack_seq"] is not None else "none yet"
        line("outbox", f"backlog {o['backlog']}{oldest}; last ack {last_ack}")
    line("uplink", _uplink_text(r["uplink"], now))
    d = r["state_dir"]
    line("state dir", f"{d['path']}: " + (f"{d['free_bytes'] // 2**20} MiB free of {d['total_bytes'] // 2**20} MiB"
                                          if d["free_bytes"] is not None else "cannot be read"))
    c = r["clock"]
    synced = {True: "synchronized", False: "NOT SYNCHRONIZED", None: "sync state unknown"}[c["synced"]]
    line("clock", f"{synced} ({c['detail']})")


def cmd_journal(args) -> int:
    from appliance.journal import Journal, State

    cfg = _config(args)
    states = [State(s) for s in args.state] if args.state else None
    journal = Journal(cfg.terminal.state_dir, cfg.terminal.store_id, cfg.terminal.terminal_id, readonly=True)
    try:
        if args.txn is not None:
            return _print_history(journal, args.txn, args.json)
        txns = journal.recent(limit=args.limit, states=states)
    finally:
        journal.close()
    print_journal(txns, as_json=args.json)
    return EXIT_OK


def _print_history(journal, txn_id: int, as_json: bool) -> int:
    """One payment and every state change it went through (its head-office events)."""
    txn = journal.get(txn_id)
    if txn is None:
        print(f"appliance: no transaction {txn_id} in the journal", file=sys.stderr)
        return EXIT_REFUSED
    events = journal.events(txn_id)
    if as_json:
        print(json.dumps({**txn.as_dict(), "retry_note": txn.retry_note, "attempts": txn.attempts,
                          "events": events}, ensure_ascii=False))
        return EXIT_OK
    print_journal([txn])
    if txn.retry_note:
        print(f"  open: {txn.retry_note} ({txn.attempts} attempts)")
    for e in events:
        print(f"  {e['at']}  {e['previous_state'] or '-':>16} -> {e['state']:<16} {e['reason']}")
    return EXIT_OK


def print_journal(txns, as_json: bool = False, out=None) -> None:
    out = out or sys.stdout
    if as_json:
        for t in txns:
            print(json.dumps(t.as_dict(), ensure_ascii=False), file=out)
        return
    print(f"{'txn':>5}  {'out_trade_no':<31}  {'order':<12} {'amount':>10}  {'type':<9} {'state':<16} "
          f"{'code':<20} reason", file=out)
    for t in txns:
        print(f"{t.txn_id:>5}  {t.out_trade_no:<31}  {t.order:<12} {format_amount(t.amount_fen):>10}  "
              f"{t.payment_type:<9} {t.state:<16} {t.code_masked:<20} {t.reason}", file=out)
    if not txns:
        print("(no transactions)", file=out)


def cmd_classify(args) -> int:
    from appliance.config import from_dict
    from appliance.service import make_classifier

    if args.config or os.environ.get(ENV_VAR) or DEFAULT_PATH.exists():
        cfg = _config(args)
    else:  # a pure tool: without any config, classify with the built-in defaults
        cfg = from_dict({"terminal": {"store_id": "S0", "terminal_id": "T0"}})
    classifier = make_classifier(cfg)
    texts = args.text if args.text != ["-"] else [line.rstrip("\r\n") for line in sys.stdin]
    for text in texts:
        c = classifier.classify(text)
        if args.json:
            print(json.dumps(c.as_dict(), ensure_ascii=False))
        else:
            detail = c.payment_type or c.command or (c.order and f"order {c.order} {format_amount(c.amount_fen)}") or ""
            print(f"{c.masked}\t{c.kind}\t{detail or c.reason}")
    return EXIT_OK


def cmd_check_config(args) -> int:
    from appliance.config import check_state_dir

    path = config_path(args.config)
    cfg = load(path)
    check_state_dir(cfg)  # the service user must be able to write it (systemd runs this first)
    print(f"# effective configuration from {path} (secrets shown as their files)")
    print(to_toml(cfg))
    return EXIT_OK


def cmd_test_feedback(args) -> int:
    from appliance.indicator import PATTERNS, Signal, make_indicator
    from appliance.logs import setup

    cfg = _config(args)
    setup(cfg.logging.level)
    indicator = make_indicator(cfg.indicator)
    try:
        for signal in Signal:
            if signal is Signal.OFF:
                continue
            print(f"{signal:<16} {PATTERNS[signal].describe()}", flush=True)
            indicator.show(signal)
            time.sleep(args.pause)
    finally:
        indicator.close()
    return EXIT_OK


def cmd_scan_test(args) -> int:
    from appliance.logs import setup
    from appliance.scan.tools import scan_test, scanner_for_test
    from appliance.service import make_classifier

    cfg = _config(args)
    setup(cfg.logging.level)
    scanner, trace_lines = scanner_for_test(cfg.scanner, args.trace)
    return scan_test(scanner, make_classifier(cfg), trace=args.trace, trace_lines=trace_lines)


def cmd_scanners(args) -> int:
    from appliance.scan.tools import list_scanners

    return list_scanners()


def cmd_demo(args) -> int:
    from appliance.demo import run_demo

    return run_demo(pause=args.pause)


def cmd_simulate(args) -> int:
    import signal
    import tempfile

    from appliance import simulators
    from appliance.simulators.ledger import Ledger

    with tempfile.TemporaryDirectory(prefix=f"appliance-sim-{args.kind}-") as tmp:
        ledger = Ledger(reverse_window_s=args.reverse_window_s, slow_s=args.slow_s)
        sim = simulators.simulator_class(args.kind)(Path(args.keys or tmp), ledger, port=args.port).start()
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"# {args.kind} simulator on {sim.url}; keys in {sim.keys_dir}"
              f"{'' if args.keys else ' (deleted on exit)'}; outcomes by the code's last two digits "
              f"(appliance/simulators/ledger.py). Ctrl-C stops it.\n[providers.{args.kind}]", flush=True)
        for key, value in sim.provider_options().items():
            print(f"{key} = {json.dumps(value)}")
        print(flush=True)  # an empty line ends the table
        stop.wait()
        sim.stop()
    return EXIT_OK


def _hq_config(args):
    """Head office's config: its own file (--config, optional) with the flags given applied on top."""
    from appliance.hq.config import load

    flags = {"db": args.db, "host": getattr(args, "host", None), "port": getattr(args, "port", None),
             "username": getattr(args, "username", None), "password_file": getattr(args, "password_file", None),
             "tls": getattr(args, "tls", None), "ca_file": getattr(args, "ca_file", None),
             "topic_prefix": getattr(args, "topic_prefix", None), "group": getattr(args, "group", None),
             "client_id": getattr(args, "client_id", None), "listen": getattr(args, "listen", None),
             "token_file": getattr(args, "token_file", None)}
    return load(Path(args.config) if args.config else None, {k: v for k, v in flags.items() if v is not None})


def cmd_hq_ingest(args) -> int:
    from appliance.hq import ingest
    from appliance.logs import setup

    file = _hq_config(args)
    setup(file.logging.level)
    return ingest.run(file.hq)


def cmd_hq_report(args) -> int:
    from appliance.business_day import business_date
    from appliance.hq import report
    from appliance.hq.store import Store
    from appliance.journal import utc_now

    cfg = _hq_config(args).hq
    day = args.date or business_date(utc_now(), cfg.time_zone, cfg.day_cutoff_hour).isoformat()
    return report.run(Store(cfg.db or None, create=False), day, args.store, args.json)


def cmd_hq_reconcile(args) -> int:
    import datetime as dt

    from appliance.hq import reconcile
    from appliance.hq.store import Store
    from appliance.logs import setup

    file = _hq_config(args)
    setup(file.logging.level)
    day = dt.date.fromisoformat(args.date) if args.date else None
    return reconcile.run(Store(file.hq.db or None), file, day=day, platform=args.platform, scheduled=args.due,
                         as_json_=args.json)


def cmd_hq_serve(args) -> int:
    from appliance.hq import web
    from appliance.logs import setup

    file = _hq_config(args)
    setup(file.logging.level)
    return web.run(file.hq)


def _date(text: str) -> str:
    import datetime as dt

    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {text[:40]!r}")


def _store_id(text: str) -> str:
    if not (1 <= len(text) <= 8 and text.isascii() and text.isalnum()):
        raise argparse.ArgumentTypeError(f"not a store id (1-8 letters or digits): {text[:40]!r}")
    return text


def add_hq(sub) -> None:
    """`appliance hq ingest|report|reconcile|serve`: head office's side (appliance/hq/). Needs no lane config."""
    help_ = ("head office: store every lane's MQTT messages (ingest), report the day's volume (report), match "
             "the platforms' bills (reconcile), show it on the web (serve)")
    hq = sub.add_parser("hq", help=help_, description=help_).add_subparsers(dest="hq_command", required=True,
                                                                            metavar="HQ_COMMAND")

    def add(name, func, help_):
        sp = hq.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", metavar="PATH", help="head office's config file ([hq] section); flags override it")
        sp.add_argument("--db", metavar="URL", help="sqlite:///path or postgresql://user@host:port/db "
                                                    "(default: hq.sqlite in $STATE_DIRECTORY or here)")
        sp.set_defaults(func=func)
        return sp

    sp = add("ingest", cmd_hq_ingest, "subscribe to every lane's txn, event, daily and status topics (a shared "
             "subscription) and store them until SIGTERM")
    sp.add_argument("--host", help="MQTT broker host (default localhost)")
    sp.add_argument("--port", type=NUMBER_ARGS["port"].type, help="MQTT broker port (default 1883)")
    sp.add_argument("--username")
    sp.add_argument("--password-file", dest="password_file", metavar="PATH", help="file holding the MQTT password")
    sp.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    sp.add_argument("--ca-file", dest="ca_file", metavar="PATH", help="CA certificates for --tls")
    sp.add_argument("--topic-prefix", dest="topic_prefix", help='the lanes\' topic prefix (default "lanes")')
    sp.add_argument("--group", help='shared subscription group (default "hq")')
    sp.add_argument("--client-id", dest="client_id", help="MQTT client id, one per process, stable across "
                                                          "restarts (default hq-<host name>-<group>)")
    sp = add("report", cmd_hq_report, "one business day's volume per store, terminal, payment type and funding "
             "source; lanes offline or with a backlog")
    sp.add_argument("--date", type=_date, help="business date YYYY-MM-DD (default: today in [hq] time_zone)")
    sp.add_argument("--store", type=_store_id, help="only this store")
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    sp = add("reconcile", cmd_hq_reconcile, "match each platform's daily bill (Beijing day) against the payments "
             "head office holds, and store the result; exit 0 no differences, 3 differences, 4 a bill error, "
             "75 not yet available (tried again by --due)")
    when = sp.add_mutually_exclusive_group()
    when.add_argument("--date", type=_date, help="the Beijing day YYYY-MM-DD (default: yesterday there)")
    when.add_argument("--due", action="store_true", help="what the schedule wants now: yesterday and earlier "
                                                         "days not yet reconciled whose next try has come, and "
                                                         "once more a day with differences after the next day's bill")
    sp.add_argument("--platform", metavar="NAME", help="only this [providers.NAME]")
    sp.add_argument("--json", action="store_true", help="print the results as one JSON object")
    sp = add("serve", cmd_hq_serve, "a read-only web day view of the database: the day's figures, lanes, "
             "payments and a CSV export")
    sp.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8080; beyond loopback it needs "
                                                         "--token-file")
    sp.add_argument("--token-file", dest="token_file", metavar="PATH", help="file holding the token users give")


class NumberArg(NamedTuple):
    type: type
    lo: int | float
    hi: int | float
    unit: str = ""


#: Every numeric option (by argparse dest): its type and the range main() accepts, ends included.
#: argparse refuses what is not a number (exit 2); main() refuses nan, inf and anything outside
#: the range with exit 5 before a command runs, so no sleep, wait or query ever sees them.
NUMBER_ARGS = {
    "limit": NumberArg(int, 1, 1_000_000, "transactions"),
    "txn": NumberArg(int, 1, 2**63 - 1),  # SQLite's largest integer
    "wait": NumberArg(float, 0.0, 3600.0, "seconds"),
    "pause": NumberArg(float, 0.0, 60.0, "seconds"),
    "port": NumberArg(int, 0, 65_535, "(a TCP port; 0 picks a free one)"),
    "slow_s": NumberArg(float, 0.0, 600.0, "seconds"),
    "reverse_window_s": NumberArg(float, 0.0, 366 * 86_400.0, "seconds"),
}


def out_of_range(args: argparse.Namespace) -> str | None:
    """The first numeric option of `args` outside its NUMBER_ARGS range, as a message; else None."""
    for dest, rule in NUMBER_ARGS.items():
        value = getattr(args, dest, None)
        if value is not None and not rule.lo <= value <= rule.hi:
            unit = f" {rule.unit}" if rule.unit else ""
            return f"--{dest.replace('_', '-')} must be between {_num(rule.lo)} and {_num(rule.hi)}{unit}, got {_num(value)}"
    return None


def _num(v: int | float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Scan-to-pay lane appliance.")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", metavar="PATH",
                        help=f"config file (default: ${ENV_VAR}, else {DEFAULT_PATH})")
        sp.set_defaults(func=func)
        return sp

    add("run", cmd_run, "run the lane service (scanner, till, journal, indicator, resolver)")
    sp = add("charge", cmd_charge, "charge one payment code for an order, without the scanner")
    sp.add_argument("--order", required=True, help="order number (1-32 letters, digits, _ or -)")
    sp.add_argument("--amount", required=True, help='amount in yuan with at most two decimals, e.g. "12.34"')
    sp.add_argument("--code", required=True, help="the payment code, or - to read it from stdin (keeps it out of ps)")
    sp.add_argument("--wait", type=NUMBER_ARGS["wait"].type, default=0.0, metavar="S",
                    help="if the outcome is uncertain, keep resolving it for up to S seconds")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sp = add("cancel", cmd_cancel, "cancel (reverse or refund) the paid payment of an order")
    sp.add_argument("--order", required=True)
    sp.add_argument("--wait", type=NUMBER_ARGS["wait"].type, default=0.0, metavar="S",
                    help="if the platform's answer is uncertain, keep trying for up to S seconds")
    sp.add_argument("--json", action="store_true")
    sp = add("sync", cmd_sync, "show the outbox backlog, the last event head office acknowledged and the uplink's "
             "connection (exit 0: nothing waits or the uplink is connected; 1: events wait and nothing sends them)")
    sp.add_argument("--json", action="store_true", help="one JSON object: service_running plus the uplink's state")
    sp = add("status", cmd_status, "show the service, the lane, its scanner and platforms, the open payments, the "
             "outbox, the free space and the clock (exit 0: running, no fault; 1: not running or a fault raised)")
    sp.add_argument("--json", action="store_true", help="one JSON object (appliance/schemas/status_report.json)")
    sp = add("journal", cmd_journal, "list journaled transactions, newest first")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument("--limit", type=NUMBER_ARGS["limit"].type, default=50)
    sp.add_argument("--txn", type=NUMBER_ARGS["txn"].type, metavar="N",
                    help="one transaction with every state change it went through")
    sp.add_argument("--state", action="append", help="only this state (repeatable)",
                    choices=["pending", "paid", "declined", "unknown", "reversed", "deferred",
                             "cancel_requested", "cancelled", "refunded"])
    sp = add("classify", cmd_classify, "classify scan texts (payment code, order ticket, command card)")
    sp.add_argument("text", nargs="+", help="texts to classify, or - to read lines from stdin")
    sp.add_argument("--json", action="store_true", help="one JSON object per input")
    add("check-config", cmd_check_config, "validate the config and print it with secrets redacted")
    sp = add("test-feedback", cmd_test_feedback, "play every LED/buzzer pattern in turn")
    sp.add_argument("--pause", type=NUMBER_ARGS["pause"].type, default=2.0, metavar="S", help="seconds per pattern")
    sp = add("scan-test", cmd_scan_test, "print each scan of the configured scanner (masked, classified) "
             "until Ctrl-C; touches no journal")
    sp.add_argument("--trace", action="store_true", help="also print the raw key/byte trace (digits masked)")
    sp = sub.add_parser("scanners", help="list candidate input and serial devices with their stable paths",
                        description="list candidate input and serial devices with their stable paths")
    sp.set_defaults(func=cmd_scanners)
    sp = sub.add_parser("demo", help="run a scripted lane on a temporary state dir with the sandbox platform",
                        description="run a scripted lane on a temporary state dir with the sandbox platform")
    sp.add_argument("--pause", type=NUMBER_ARGS["pause"].type, default=0.6, metavar="S",
                    help="seconds between scripted scans")
    sp.set_defaults(func=cmd_demo)
    help_ = "run a payment platform's simulator on 127.0.0.1 and print the [providers] table for it"
    sp = sub.add_parser("simulate", help=help_, description=help_)
    sp.add_argument("kind", choices=_SimulatorKinds(), metavar="KIND", help="the adapter kind to simulate: %(choices)s")
    sp.add_argument("--port", type=NUMBER_ARGS["port"].type, default=0, help="TCP port (default 0: a free one)")
    sp.add_argument("--keys", metavar="DIR", help="keep the generated keys here (default: a temporary directory)")
    sp.add_argument("--slow-s", dest="slow_s", type=NUMBER_ARGS["slow_s"].type, default=8.0, metavar="S",
                    help="how late a code ending 97 is answered")
    sp.add_argument("--reverse-window-s", dest="reverse_window_s", type=NUMBER_ARGS["reverse_window_s"].type,
                    default=7 * 86_400.0, metavar="S", help="older paid trades cannot be reversed, only refunded")
    sp.set_defaults(func=cmd_simulate)
    add_hq(sub)
    return p


class _SimulatorKinds:
    """`simulate`'s choices, read from appliance.simulators (HTTP servers, TLS) only when argparse
    checks or shows them: every other command, `run` above all, never imports it."""

    def _kinds(self) -> list[str]:
        from appliance.simulators import KINDS

        return sorted(KINDS)

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds()

    def __iter__(self):
        return iter(self._kinds())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refused = out_of_range(args)
    if refused:
        print(f"appliance: refused: {refused}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"appliance: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except JournalIntegrityError as e:
        print(f"appliance: journal refused: {e}", file=sys.stderr)
        return EXIT_INTEGRITY
    except ApplianceError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"appliance: unexpected error: {type(e).__name__}: {e} (DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR
