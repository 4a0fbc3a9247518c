"""`appliance demo`: the whole lane on a scripted morning, in a terminal, with nothing attached.

A temporary state directory, the sandbox platform for every payment type, the mock indicator
(gpiozero MockFactory) drawn as text, and a scripted sequence of scans fed to the running
service: a good payment, a decline, junk, a code with no order, a payment that needs the
customer's password (resolved by the resolver), and a cancel. Then the journal is printed.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from appliance import service
from appliance.cli import print_journal
from appliance.config import from_dict
from appliance.indicator import COLOUR_NAMES, Pattern, Signal, make_indicator
from appliance.logs import setup
from appliance.redact import mask
from appliance.scan import NoScanner, Scan

SCRIPT: list[tuple[str, str]] = [
    ("ORD:A1001:12.50", "order ticket A1001, 12.50 due"),
    ("134567890123456700", "customer shows a WeChat Pay code"),
    ("ORD:A1002:88.00", "order ticket A1002, 88.00 due"),
    ("286123456789012390", "an Alipay code whose balance is too low (sandbox: ends 90)"),
    ("HELLO-WORLD", "a barcode that is no payment code at all"),
    ("134567890123456711", "a payment code with no order pending"),
    ("ORD:A1003:1288.00", "order ticket A1003, 1288.00 due (above the password-free limit)"),
    ("6212345678901234566", "a UnionPay code: the customer must confirm a password"),
    ("CMD:CANCEL", "the cancel card"),
    ("ORD:A1001:12.50", "order ticket A1001 again: cancel its payment"),
]

_ANSI = {"red": "31", "green": "32", "blue": "34", "yellow": "33", "off": "90"}


def _render(signal: Signal, pattern: Pattern) -> None:
    name = COLOUR_NAMES[pattern.colour]
    dot = f"\033[{_ANSI[name]}m●\033[0m" if sys.stdout.isatty() else "●"
    print(f"      {dot} {signal.value:<15} {pattern.describe()}", flush=True)


def run_demo(pause: float = 0.6) -> int:
    setup("INFO")
    logging.getLogger("appliance.service").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp:
        cfg = from_dict({
            "terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(Path(tmp))},
            "till": {"result_hold_s": pause * 0.8},
            "scanner": {"kind": "none"},
            "indicator": {"kind": "mock"},
            "providers": {"sandbox": {"kind": "sandbox", "latency_ms": 120}},
            "routing": {t: "sandbox" for t in ("wechat", "alipay", "unionpay", "ecny", "jdpay", "bestpay")},
        })
        print(f"demo lane S0001/L01, state in {tmp}; sandbox platform; mock LED and buzzer:\n", flush=True)
        lane = service.build(cfg, indicator=make_indicator(cfg.indicator, on_render=_render))
        stop = threading.Event()
        runner = threading.Thread(target=service.run, args=(cfg,),
                                  kwargs={"stop": stop, "scanner": NoScanner(), "lane": lane})
        runner.start()
        try:
            time.sleep(pause)
            for text, what in SCRIPT:
                shown = text if not text.isdigit() else mask(text)
                print(f"\n  scan {shown:<22} {what}", flush=True)
                lane.till.post_scan(Scan(text, "demo"))
                time.sleep(pause)
                _wait_until_settled(lane, timeout=10)
        finally:
            stop.set()
            runner.join(timeout=10)
        from appliance.journal import Journal

        journal = Journal(cfg.terminal.state_dir, "S0001", "L01", readonly=True)
        print("\njournal (appliance journal):")
        print_journal(list(reversed(journal.recent(limit=20))))
        print(f"\n{len(journal.events())} head-office events waiting in the outbox.")
        journal.close()
    return 0


def _wait_until_settled(lane, timeout: float) -> None:
    """Wait while a payment of this lane is still open (e.g. the customer typing a password)."""
    deadline = time.monotonic() + timeout
    while lane.journal.open_txns() and time.monotonic() < deadline:
        time.sleep(0.1)
