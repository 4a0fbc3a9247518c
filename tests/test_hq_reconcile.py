"""appliance.hq.reconcile: the matching rules (a table of head-office orders against bill lines), head
office's side read from stored events, storing and replacing a day's result, the retry schedule,
reconciliation by query against the aggregator's simulator, and `appliance hq reconcile`."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest

from appliance.hq import reconcile
from appliance.hq.reconcile import Kind, Order, DayState, Result
from appliance.hq.store import Store
from appliance.payments.bills import Bill, BillLine, BillState, LineKind, beijing_day, day_start
from appliance.simulators.jeepay import JeepaySimulator
from appliance.simulators.ledger import Ledger
from conftest import appliance_cmd, subprocess_env
from reconcile_kit import DAY, NEXT_MORNING, NOON, Clock, Shop, adapter

P = LineKind.PAYMENT
BEFORE = NOON - 86_400  # the day before DAY
AFTER = NOON + 86_400  # the day after


def order(n: int, state: str = "paid", fen: int = 1000, *, paid: float | None = NOON, asked: float | None = None,
          done: float | None = None, platform: str = "wx") -> Order:
    o = Order(f"S0001_L01_{n}", "S0001", "L01", platform, fen, state, paid_at=paid, asked_at=asked, done_at=done)
    o.event_days = tuple({beijing_day(t) for t in (paid, asked, done) if t is not None})
    return o


def line(n: int, kind: LineKind = P, fen: int = 1000, fee: int = 6) -> BillLine:
    return BillLine(f"S0001_L01_{n}", f"42{n:08d}", kind, fen, fee if kind is P else -fee, "2026-11-20 12:00:00",
                    "SUCCESS")


def kinds(diffs) -> list[tuple[str, str, str]]:
    return [(str(d.kind), d.out_trade_no.rsplit("_", 1)[1], d.movement) for d in diffs]


R = NOON + 600  # a cancel ten minutes after the payment
CASES = {
    "paid, on the bill": ([order(1)], [line(1)], {}, []),
    "refunded the same day: payment and refund lines": (
        [order(1, "refunded", asked=R, done=R)], [line(1), line(1, LineKind.REFUND)], {}, []),
    "cancelled by a reversal: payment and revoked lines": (
        [order(1, "cancelled", asked=R, done=R)], [line(1), line(1, LineKind.REVOKED)], {}, []),
    "an uncertain payment reversed after the money was taken: both lines": (
        [order(1, "reversed", paid=None, done=R)], [line(1), line(1, LineKind.REVOKED)], {}, []),
    "an uncertain payment reversed before any money moved: no line": (
        [order(1, "reversed", paid=None, done=R)], [], {}, []),
    "declined: no line": ([order(1, "declined", paid=None)], [], {}, []),
    "a bill missing an order": ([order(1), order(2)], [line(1)], {}, [("not_on_bill", "2", "payment")]),
    "a bill with an amount that differs": ([order(1)], [line(1, fen=990)], {}, [("amount", "1", "payment")]),
    "a bill line for an order head office never saw": ([order(1)], [line(1), line(7)], {},
                                                      [("not_at_hq", "7", "payment")]),
    "a refund head office has and the bill lacks": (
        [order(1, "refunded", asked=R, done=R)], [line(1)], {}, [("not_on_bill", "1", "refund")]),
    "declined here, paid there": ([order(1, "declined", paid=None)], [line(1)], {}, [("state", "1", "payment")]),
    "still unknown here, paid there": ([order(1, "unknown", paid=None)], [line(1)], {}, [("state", "1", "payment")]),
    "paid here, refunded there": ([order(1)], [line(1), line(1, LineKind.REFUND)], {}, [("state", "1", "refund")]),
    "cancel still open here, given back there": (
        [order(1, "cancel_requested", asked=R)], [line(1), line(1, LineKind.REVOKED)], {}, [("state", "1", "revoked")]),
    "reversed here, but the bill keeps the money": (
        [order(1, "reversed", paid=None, done=R)], [line(1)], {}, [("state", "1", "payment")]),
    "refund of the same amount differs": (
        [order(1, "refunded", asked=R, done=R)], [line(1), line(1, LineKind.REFUND, fen=500)], {},
        [("amount", "1", "refund")]),
    "two payment lines for one order": ([order(1)], [line(1), line(1)], {}, [("amount", "1", "payment")]),
    "paid yesterday, refunded today: only the refund is today's": (
        [order(1, "refunded", paid=BEFORE, asked=R, done=R)], [line(1, LineKind.REFUND)], {}, []),
    "paid just before midnight by head office's clock, on the other day's stored bill": (
        [order(1)], [], {"S0001_L01_1": {"payment"}}, []),
    "another platform's payment is not expected on this bill": ([order(1, platform="ali")], [], {}, []),
    "a refund asked today and done tomorrow: WeChat dates it today": (
        [order(1, "refunded", asked=R, done=AFTER)], [line(1)], {}, [("not_on_bill", "1", "refund")]),
    "every kind at once, sorted by kind": (
        [order(1), order(2), order(3, "declined", paid=None)], [line(2, fen=1), line(3), line(9)], {},
        [("amount", "2", "payment"), ("not_at_hq", "9", "payment"), ("not_on_bill", "1", "payment"),
         ("state", "3", "payment")]),
}


@pytest.mark.parametrize("orders, lines, other_days, expected", CASES.values(), ids=CASES.keys())
def test_match(orders, lines, other_days, expected):
    diffs, _ = reconcile.match(DAY, "wx", "wechat_v3", lines, {o.out_trade_no: o for o in orders}, other_days)
    assert kinds(diffs) == expected


def test_alipay_dates_a_refund_by_when_it_was_done():
    o = order(1, "refunded", asked=R, done=AFTER)
    diffs, _ = reconcile.match(DAY, "wx", "alipay", [line(1)], {o.out_trade_no: o}, {})
    assert diffs == []
    diffs, _ = reconcile.match(beijing_day(AFTER), "wx", "alipay", [], {o.out_trade_no: o}, {"S0001_L01_1": {"payment"}})
    assert kinds(diffs) == [("not_on_bill", "1", "refund")]


def test_match_counts_what_matched_and_names_the_lane():
    orders = {o.out_trade_no: o for o in (order(1, fen=700), order(2, "refunded", fen=300, asked=R, done=R),
                                          order(3, fen=50))}
    diffs, matched = reconcile.match(DAY, "wx", "wechat_v3", [line(1, fen=700), line(2, fen=300),
                                                             line(2, LineKind.REFUND, fen=300), line(3, fen=51)],
                                     orders, {})
    assert matched == {"payments": 2, "paid_fen": 1000, "returns": 1, "returned_fen": 300}
    (d,) = diffs
    assert (d.store_id, d.terminal_id, d.hq_amount_fen, d.bill_amount_fen, d.platform_txn_id) == \
        ("S0001", "L01", 50, 51, "4200000003")


# --- head office's side, stored ------------------------------------------------------------------


@pytest.fixture
def store(hq_db_url):
    """Head office's database: SQLite, then PostgreSQL."""
    s = Store(hq_db_url)
    yield s
    s.close()


class Books:
    """A provider without a network: its bill is what the test says (for the store-side tests)."""

    kind = "wechat_v3"
    has_bill = True

    def __init__(self, bill: Bill | Exception):
        self.name, self.answer = "wx", bill

    def bill(self, day):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def close(self):
        pass


def test_load_orders_reads_each_payment_from_all_its_events(store):
    shop = Shop(Books(None), store, Clock(BEFORE))
    shop.amounts["S0001_L01_1"] = 500
    shop.event("S0001_L01_1", "pending")
    shop.event("S0001_L01_1", "paid")
    shop.clock.t = R
    shop.event("S0001_L01_1", "cancel_requested")
    shop.clock.t = AFTER
    shop.event("S0001_L01_1", "refunded")
    shop.amounts["S0001_L01_2"] = 900
    shop.clock.t = NOON
    shop.event("S0001_L01_2", "pending", platform="ali")
    orders = reconcile.load_orders(store, DAY)
    assert set(orders) == {"S0001_L01_1", "S0001_L01_2"}  # both have an event on DAY
    o = orders["S0001_L01_1"]
    assert (o.state, o.amount_fen, o.platform, o.paid_at, o.asked_at, o.done_at) == \
        ("refunded", 500, "wx", BEFORE, R, AFTER)
    assert orders["S0001_L01_2"].platform == "ali"
    assert set(reconcile.load_orders(store, beijing_day(BEFORE) - dt.timedelta(days=1), ["S0001_L01_2"])) == \
        {"S0001_L01_2"}  # named by a bill line: found whatever its day


def test_a_rerun_replaces_the_day_and_a_failed_rerun_keeps_the_final_result(store):
    shop = Shop(Books(None), store, Clock())
    shop.amounts["S0001_L01_1"] = 1000
    shop.event("S0001_L01_1", "paid")
    first = reconcile.reconcile(store, Books(Bill("wx", DAY, BillState.FETCHED, (line(1), line(8)))), DAY)
    assert reconcile.save(store, first, NEXT_MORNING)
    (kept,) = reconcile.stored(store, DAY)
    assert (kept["state"], kept["attempts"], [d["kind"] for d in kept["differences"]]) == ("fetched", 1, ["not_at_hq"])
    assert store.BillLine.select().count() == 2

    again = reconcile.reconcile(store, Books(Bill("wx", DAY, BillState.FETCHED, (line(1),))), DAY)
    assert reconcile.save(store, again, NEXT_MORNING + 60)
    (kept,) = reconcile.stored(store, DAY)
    assert (kept["state"], kept["attempts"], kept["differences"]) == ("fetched", 2, [])
    assert store.BillLine.select().count() == 1 and store.Difference.select().count() == 0

    from appliance.payments.bills import BillUnavailable
    failed = reconcile.reconcile(store, Books(BillUnavailable("wx", DAY, "HTTP 500")), DAY)
    assert failed.state is DayState.ERROR and failed.retryable and "platform wx: bill of 2026-11-20" in failed.error
    assert not reconcile.save(store, failed, NEXT_MORNING + 120)
    (kept,) = reconcile.stored(store, DAY)
    assert (kept["state"], kept["attempts"]) == ("fetched", 3)


def test_no_transactions_on_the_bill_leaves_head_office_payments_unmatched(store):
    shop = Shop(Books(None), store, Clock())
    shop.amounts["S0001_L01_1"] = 1000
    shop.event("S0001_L01_1", "paid")
    r = reconcile.reconcile(store, Books(Bill("wx", DAY, BillState.NO_TRANSACTIONS)), DAY)
    assert r.state is DayState.NO_TRANSACTIONS and r.fee_fen == 0
    assert kinds(r.differences) == [("not_on_bill", "1", "payment")]


def test_a_bill_error_is_an_error_naming_platform_and_day_never_an_empty_match(store):
    from appliance.payments.bills import BillError
    r = reconcile.reconcile(store, Books(BillError("wx", DAY, "SHA-1 mismatch")), DAY)
    assert (r.state, r.retryable, r.differences) == (DayState.ERROR, False, [])
    assert r.error == "platform wx: bill of 2026-11-20: SHA-1 mismatch"
    assert reconcile.exit_code([r]) == reconcile.EXIT_ERROR


def test_today_is_refused():
    with pytest.raises(ValueError, match="not over yet in Beijing"):
        reconcile.reconcile(None, Books(None), beijing_day(NOON), now=NOON)


# --- the schedule --------------------------------------------------------------------------------


def test_next_try_is_spaced_never_before_ten_and_gives_up():
    ten = day_start(DAY) + 86_400 + 10 * 3600
    assert reconcile.next_try(DAY, ten - 3 * 3600, 1800, 3) == ten  # 07:00: not before 10:00
    assert reconcile.next_try(DAY, ten + 60, 1800, 3) == ten + 60 + 1800
    assert reconcile.next_try(DAY, day_start(DAY) + 4 * 86_400 + 1, 1800, 3) is None


def test_due_is_yesterday_and_the_retries_whose_time_has_come(store):
    now = NEXT_MORNING  # DAY is yesterday
    assert reconcile.due(store, ["wx", "ali"], now, 2) == [(DAY - dt.timedelta(days=1), "wx"),
                                                           (DAY - dt.timedelta(days=1), "ali"), (DAY, "wx"),
                                                           (DAY, "ali")]
    later = Result(DAY, "wx", "wechat_v3", "bill", DayState.NOT_YET, next_try_at=now + 1800)
    done = Result(DAY, "ali", "alipay", "bill", DayState.FETCHED)
    old = Result(DAY - dt.timedelta(days=1), "wx", "wechat_v3", "bill", DayState.ERROR, next_try_at=None)
    for r in (later, done, old):
        reconcile.save(store, r, now)
    assert reconcile.due(store, ["wx", "ali"], now, 2) == [(DAY - dt.timedelta(days=1), "ali")]
    assert reconcile.due(store, ["wx", "ali"], now + 1800, 2) == [(DAY - dt.timedelta(days=1), "ali"), (DAY, "wx")]


def test_a_day_with_differences_is_due_once_more_after_the_next_days_bill(store):
    day2 = DAY + dt.timedelta(days=1)
    now = day_start(day2) + 86_400 + 10 * 3600  # day2 is yesterday
    diff = reconcile.Difference(Kind.NOT_ON_BILL, "S0001_L01_1", "payment", "")
    reconcile.save(store, Result(DAY, "wx", "wechat_v3", "bill", DayState.FETCHED, differences=[diff]), now - 86_400)
    assert reconcile.due(store, ["wx"], now, 2) == [(day2, "wx")]  # day2 never tried; DAY waits for it
    reconcile.save(store, Result(day2, "wx", "wechat_v3", "bill", DayState.FETCHED), now)
    assert reconcile.due(store, ["wx"], now + 1800, 2) == [(DAY, "wx")]  # its bill may hold DAY's payment
    reconcile.save(store, Result(DAY, "wx", "wechat_v3", "bill", DayState.FETCHED, differences=[diff]), now + 1800)
    assert reconcile.due(store, ["wx"], now + 3600, 2) == []  # once: still different, it is a person's now


def test_exit_codes_take_the_worst():
    ok = Result(DAY, "a", "k", "bill", DayState.FETCHED)
    later = Result(DAY, "b", "k", "bill", DayState.NOT_YET)
    diff = Result(DAY, "c", "k", "bill", DayState.FETCHED, differences=[reconcile.Difference(Kind.STATE, "x", "payment",
                                                                                          "")])
    bad = Result(DAY, "d", "k", "bill", DayState.ERROR, error="x")
    assert [reconcile.exit_code(rs) for rs in ([ok], [ok, later], [later, diff], [diff, bad])] == [0, 75, 3, 4]


# --- by query: the aggregator, against its simulator ---------------------------------------------


@pytest.fixture
def jeepay(tmp_path):
    clock = Clock()
    with JeepaySimulator(tmp_path / "keys", Ledger(clock=clock)) as sim:
        p = adapter(sim, "jp", tmp_path)
        yield sim, p, clock
        p.close()


def test_an_aggregator_day_is_reconciled_by_query(store, jeepay):
    sim, provider, clock = jeepay
    shop = Shop(provider, store, clock)
    paid, refunded, cancelled = shop.pay(), shop.pay(fen=250), shop.pay(fen=300)
    declined = shop.pay("90")
    shop.cancel(refunded, refund=True)
    shop.cancel(cancelled)
    r = reconcile.reconcile(store, provider, DAY)
    assert (r.state, r.method, r.queried, r.differences) == (DayState.BY_QUERY, "query", 4, [])
    assert r.matched == {"payments": 1, "paid_fen": 1000, "returns": 2, "returned_fen": 550}
    assert "no bill API" in r.note and declined

    sim.ledger.refund(paid, "out-of-band", 1000)  # refunded in the aggregator's portal, not by the lane
    r = reconcile.reconcile(store, provider, DAY)
    assert kinds(r.differences) == [("state", paid.rsplit("_", 1)[1], "payment")]
    assert "paid at head office, refunded on the platform" in r.differences[0].detail

    sim.stop()  # unreachable: an error tried again later, not a clean day
    r = reconcile.reconcile(store, provider, DAY)
    assert (r.state, r.retryable) == (DayState.ERROR, True) and "4 of 4 queries" in r.error


# --- the command ---------------------------------------------------------------------------------


def hq_config(tmp_path, sim) -> str:
    """Head office's config file with the simulator's merchant account as [providers.jp]."""
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sim.provider_options().items())
    cfg = tmp_path / "hq.toml"
    cfg.write_text(f"[providers.jp]\n{table}\n")
    return str(cfg)


def test_the_command_refuses_today_and_a_platform_it_does_not_know(tmp_path, jeepay):
    cfg = hq_config(tmp_path, jeepay[0])
    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    today = dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).date().isoformat()
    r = subprocess.run([*appliance_cmd(), "hq", "reconcile", "--config", cfg, "--db", db, "--date", today],
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and "not over yet in Beijing" in r.stderr, r.stderr
    r = subprocess.run([*appliance_cmd(), "hq", "reconcile", "--config", cfg, "--db", db, "--platform", "wx"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and "no [providers.wx]" in r.stderr, r.stderr


def test_the_command_reconciles_stores_and_prints_json(tmp_path, jeepay):
    sim, provider, clock = jeepay
    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    store = Store(db)
    shop = Shop(provider, store, clock)
    kept = shop.pay(fen=1234)
    shop.pay(fen=99, record=False)  # never reached head office: by query, invisible (the note says so)
    store.close()
    cfg = hq_config(tmp_path, sim)
    r = subprocess.run([*appliance_cmd(), "hq", "reconcile", "--config", cfg, "--db", db, "--date", DAY.isoformat(),
                                     "--json"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout)["results"]
    assert (result["platform"], result["state"], result["matched"]["paid_fen"], result["differences"]) == \
        ("jp", "by_query", 1234, [])
    r = subprocess.run([*appliance_cmd(), "hq", "reconcile", "--config", cfg, "--db", db, "--date", DAY.isoformat()],
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 0 and "2026-11-20 jp (jeepay, by query): reconciled by query" in r.stdout, r.stdout
    (row,) = reconcile.stored(Store(db, create=False), DAY)
    assert (row["attempts"], row["summary"]["queried"]) == (2, 1) and kept
