"""`appliance demo`: the whole lane on a scripted morning, in a terminal, with nothing attached.

A temporary state directory; WeChat Pay codes paid through the WeChat Pay APIv3 simulator and
Alipay codes through the Alipay simulator, each over loopback HTTP with signatures made and
checked both ways, with keys generated in the temporary directory; the in-process sandbox for the
other payment types; the mock indicator (gpiozero MockFactory) drawn as text. A scripted sequence
of scans is fed to the running service: a good payment, a decline, junk, a code with no order, a
payment that needs the customer's password (resolved by the resolver), a WeChat payment whose
answer is lost (found paid by the resolver's query) and a cancel (a WeChat reverse). Then the
journal is printed.
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
from appliance.simulators import simulator_class
from appliance.wakeup import Stop

SCRIPT: list[tuple[str, str]] = [
    ("ORD:A1001:12.50", "order ticket A1001, 12.50 due"),
    ("134567890123456700", "customer shows a WeChat Pay code"),
    ("ORD:A1002:88.00", "order ticket A1002, 88.00 due"),
    ("286123456789012390", "an Alipay code whose balance is too low (simulators: ends 90)"),
    ("HELLO-WORLD", "a barcode that is no payment code at all"),
    ("134567890123456711", "a payment code with no order pending"),
    ("ORD:A1003:1288.00", "order ticket A1003, 1288.00 due (above the password-free limit)"),
    ("6212345678901234566", "a UnionPay code: the customer must confirm a password (sandbox)"),
    ("ORD:A1004:23.00", "order ticket A1004, 23.00 due"),
    ("134567890123456796", "a WeChat code: charged, but the answer is lost on the way (ends 96)"),
    ("CMD:CANCEL", "the cancel card"),
    ("ORD:A1001:12.50", "order ticket A1001 again: cancel its payment"),
]

_ANSI = {"red": "31", "green": "32", "blue": "34", "yellow": "33", "off": "90"}


def _render(signal: Signal, pattern: Pattern) -> None:
    name = COLOUR_NAMES[pattern.colour]
    dot = f"\033[{_ANSI[name]}m●\033[0m" if sys.stdout.isatty() else "●"
    print(f"      {dot} {signal.value:<15} {pattern.describe()}", flush=True)


#: The demo resolves uncertain payments in seconds, not the platforms' official minute.
_QUICK = {"first_query_after_s": 1.0, "query_every_s": 1.0, "reverse_after_s": 8.0, "retry_every_s": 1.0,
          "backup_base_urls": []}


def run_demo(pause: float = 0.6) -> int:
    setup("INFO")
    logging.getLogger("appliance.service").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp, \
            simulator_class("wechat_v3")(Path(tmp) / "wechat-keys") as wechat, \
            simulator_class("alipay")(Path(tmp) / "alipay-keys") as alipay:
        cfg = from_dict({
            "terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(Path(tmp) / "state"),
                         "runtime_dir": tmp},
            "till": {"result_hold_s": pause * 0.8},
            "scanner": {"kind": "none"},
            "indicator": {"kind": "mock"},
            "providers": {"wechat": {**wechat.provider_options(), **_QUICK},
                          "alipay": {**alipay.provider_options(), **_QUICK},
                          "sandbox": {"kind": "sandbox", "latency_ms": 120}},
            "routing": {"wechat": "wechat", "alipay": "alipay",
                        **{t: "sandbox" for t in ("unionpay", "ecny", "jdpay", "bestpay")}},
        })
        print(f"demo lane S0001/L01, state in {tmp}/state; mock LED and buzzer;\n"
              f"  WeChat Pay codes: WeChat Pay APIv3 simulator on {wechat.url}\n"
              f"  Alipay codes:     Alipay simulator on {alipay.url}\n"
              f"  (signed requests and answers, keys generated in {tmp}); other codes: the sandbox\n", flush=True)
        lane = service.build(cfg, indicator=make_indicator(cfg.indicator, on_render=_render))
        stop = Stop()
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
                _wait_until_settled(lane, timeout=20)
        finally:
            stop.set()
            runner.join(timeout=10)
        from appliance.journal import Journal

        journal = Journal(cfg.terminal.state_dir, "S0001", "L01", readonly=True)
        print(f"\nthe platforms' books: WeChat Pay {_books(wechat)}; Alipay {_books(alipay)}")
        print("\njournal (appliance journal):")
        print_journal(list(reversed(journal.recent(limit=20))))
        print(f"\n{len(journal.events())} head-office events waiting in the outbox.")
        journal.close()
    return 0


def _books(sim) -> str:
    """What a simulator's books say: each trade's out_trade_no and state."""
    return ", ".join(f"{no} {t.state}" for no, t in sim.ledger.trades.items()) or "none"


def _wait_until_settled(lane, timeout: float) -> None:
    """Wait while a payment of this lane is still open (e.g. the customer typing a password)."""
    deadline = time.monotonic() + timeout
    while lane.journal.open_txns() and time.monotonic() < deadline:
        time.sleep(0.1)
