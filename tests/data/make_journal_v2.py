"""How tests/data/journal_v2/ was made: run once on the released code of schema 2 (commit b00b143),
`python tests/data/make_journal_v2.py tests/data/journal_v2`. Kept for the record; run on today's
code it would write today's schema, not schema 2.

The state dir holds a lane S0001/L01 with payments in every final and open state, made with
fixed clocks across two UTC days (and, in Asia/Shanghai, across a business-day boundary), one of
them deferred (so its full code, a test code, is in the file), and their outbox events, none sent.
"""

import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from appliance.journal import Journal, State

times = iter([datetime(2026, 11, 27, 15, 59, s, tzinfo=timezone.utc) for s in range(45, 60)]
             + [datetime(2026, 11, 27, 16, 0, s, tzinfo=timezone.utc) for s in range(0, 60)])
state_dir = Path(sys.argv[1])
j = Journal(state_dir, "S0001", "L01", clock=lambda: next(times))


def pay(order, code, amount, *moves):
    t = j.open_payment(order=order, amount_fen=amount, payment_type=code[0] == "2" and "alipay" or "wechat",
                       platform="sandbox", code=code)
    for to, reason, extra in moves:
        t = j.transition(t.txn_id, to, reason, **extra)
    return t


pay("A1", "134567890123450001", 1250, (State.PAID, "SUCCESS", {"platform_txn_id": "4200001", "funding_source": "CFT"}))
pay("A2", "134567890123450002", 990, (State.DECLINED, "NOTENOUGH: balance insufficient", {}))
pay("A3", "284567890123450003", 5000, (State.UNKNOWN, "USERPAYING", {}),
    (State.PAID, "TRADE_SUCCESS", {"platform_txn_id": "2026112722001", "funding_source": "ALIPAYACCOUNT"}))
pay("A4", "134567890123450004", 300, (State.PAID, "SUCCESS", {"platform_txn_id": "4200004", "funding_source": "CMB_DEBIT"}),
    (State.CANCEL_REQUESTED, "cancel card", {}), (State.CANCELLED, "reversed", {}))
pay("A5", "134567890123450005", 700, (State.PAID, "SUCCESS", {"platform_txn_id": "4200005"}),
    (State.CANCEL_REQUESTED, "cancel card", {}), (State.REFUNDED, "refund SUCCESS", {}))
pay("A6", "134567890123450006", 150, (State.UNKNOWN, "no answer", {}))
pay("A7", "134567890123450007", 180, (State.DEFERRED, "platform unreachable", {"auth_code": "134567890123450007"}))
pay("A8", "284567890123450008", 2100, (State.UNKNOWN, "USERPAYING", {}), (State.REVERSED, "closed", {}))
j.close()
conn = sqlite3.connect(state_dir / Journal.FILENAME, isolation_level=None)
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
conn.close()
for name in ("journal.sqlite-wal", "journal.sqlite-shm", "lane.lock"):
    (state_dir / name).unlink(missing_ok=True)
