"""`appliance hq report`: one business day's volume per store, terminal, payment type and funding
source, the lanes that need attention, and a cross-check against the lanes' own day totals.

Totals have the definitions of the `daily` payload (docs/mqtt.md), computed from the stored txn
events: a payment is counted by its latest event (its highest seq; a payment's events all come
from one journal, so their seqs are in order), and its key is `(store, terminal, out_trade_no)`,
which stays unique when a lane's journal is re-created (its txn ids and seqs start again):

* `count`/`amount_fen`: paid or cancel_requested (money held);
* `declined`: declined or reversed (a count);
* `cancelled`/`cancelled_amount_fen`: cancelled or refunded;
* `open`: pending, unknown or deferred (a count).

Attention: lanes whose latest status is offline or stopped, or reports a backlog > 0.
Cross-check: for each lane with a `daily` of that date, head office's totals over the events up
to that message's `as_of_seq` must equal its totals; a difference is reported (with whether head
office still misses events up to that seq), never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import peewee as pw

from appliance.hq.store import Store
from appliance.journal import State
from appliance.money import format_amount

S = State
#: The state groups of the day totals (the `daily` payload's definitions).
HELD = (S.PAID, S.CANCEL_REQUESTED)
DECLINED = (S.DECLINED, S.REVERSED)
CANCELLED = (S.CANCELLED, S.REFUNDED)
OPEN = (S.PENDING, S.UNKNOWN, S.DEFERRED)
CURRENCY = "CNY"


@dataclass
class Report:
    business_date: str
    store_id: str | None
    totals: list[dict] = field(default_factory=list)      # per store, terminal, payment type, funding source
    attention: list[dict] = field(default_factory=list)   # lanes offline/stopped or with a backlog
    mismatches: list[dict] = field(default_factory=list)  # lanes whose daily disagrees with the events

    def as_dict(self) -> dict:
        return {"business_date": self.business_date, "store_id": self.store_id, "currency": CURRENCY,
                "totals": self.totals, "stores": store_sums(self.totals), "attention": self.attention,
                "mismatches": self.mismatches}


def day_totals(store: Store, business_date: str, *, store_id: str | None = None,
               terminal_id: str | None = None, max_seq: int | None = None) -> list[dict]:
    """The day's totals per (store, terminal, payment type, funding source), each a `daily` totals
    entry plus store_id and terminal_id, sorted. `max_seq` counts only events up to that seq (a
    lane's totals as of a `daily` message)."""
    E = store.Event
    where = [E.kind == "txn", E.business_date == business_date]
    if store_id is not None:
        where.append(E.store_id == store_id)
    if terminal_id is not None:
        where.append(E.terminal_id == terminal_id)
    if max_seq is not None:
        where.append(E.seq <= max_seq)
    latest = (E.select(E.store_id, E.terminal_id, E.out_trade_no, pw.fn.MAX(E.seq).alias("last"))
              .where(*where).group_by(E.store_id, E.terminal_id, E.out_trade_no).alias("latest"))
    L = E.alias("l")
    on = ((L.store_id == latest.c.store_id) & (L.terminal_id == latest.c.terminal_id)
          & (L.out_trade_no == latest.c.out_trade_no) & (L.seq == latest.c.last) & (L.kind == "txn"))

    def count(states):
        return pw.fn.SUM(pw.Case(None, [(L.state.in_([str(s) for s in states]), 1)], 0))

    def amount(states):
        return pw.fn.SUM(pw.Case(None, [(L.state.in_([str(s) for s in states]), L.amount_fen)], 0))

    rows = (L.select(L.store_id, L.terminal_id, L.payment_type, L.funding_source, count(HELD), amount(HELD),
                     count(DECLINED), count(CANCELLED), amount(CANCELLED), count(OPEN))
            .join(latest, on=on)
            .group_by(L.store_id, L.terminal_id, L.payment_type, L.funding_source).tuples())
    with store.guard():
        out = [_entry(t, f, int(n), int(a), int(d), int(c), int(ca), int(o), store_id=s, terminal_id=term)
               for s, term, t, f, n, a, d, c, ca, o in rows]
    out.sort(key=lambda r: (r["store_id"], r["terminal_id"], r["payment_type"], r["funding_source"] or ""))
    return out


def _entry(payment_type, funding_source, n, a, d, c, ca, o, **ids) -> dict:
    return {**ids, "payment_type": payment_type, "funding_source": funding_source, "count": n, "amount_fen": a,
            "amount": format_amount(a), "declined": d, "cancelled": c, "cancelled_amount_fen": ca,
            "cancelled_amount": format_amount(ca), "open": o}


_SUMMED = ("count", "amount_fen", "declined", "cancelled", "cancelled_amount_fen", "open")


def sum_lines(lines: list[dict], **ids) -> dict:
    """The sums of `lines`' counts and amounts (zeros when there are none), with `ids` beside them."""
    s = {**ids, **dict.fromkeys(_SUMMED, 0)}
    for t in lines:
        for k in _SUMMED:
            s[k] += t[k]
    s["amount"], s["cancelled_amount"] = format_amount(s["amount_fen"]), format_amount(s["cancelled_amount_fen"])
    return s


def store_sums(totals: list[dict]) -> list[dict]:
    """Per store: the sums of its lines' counts and amounts."""
    by_store: dict[str, list[dict]] = {}
    for t in totals:
        by_store.setdefault(t["store_id"], []).append(t)
    return [sum_lines(by_store[k], store_id=k) for k in sorted(by_store)]


def attention(store: Store, store_id: str | None = None) -> list[dict]:
    """Lanes whose latest status is not online, or that report a backlog, by store and terminal."""
    La = store.Lane
    q = La.select().where((La.state != "online") | (La.backlog > 0))
    if store_id is not None:
        q = q.where(La.store_id == store_id)
    with store.guard():
        rows = list(q.order_by(La.store_id, La.terminal_id))
    return [{"store_id": r.store_id, "terminal_id": r.terminal_id, "state": r.state, "at": r.at,
             "backlog": r.backlog, "last_ack_seq": r.last_ack_seq, "received_at": r.received_at} for r in rows]


def cross_check(store: Store, business_date: str, store_id: str | None = None) -> list[dict]:
    """Lanes whose latest `daily` of the date disagrees with head office's totals as of its as_of_seq."""
    D, E = store.Daily, store.Event
    q = D.select().where(D.business_date == business_date)
    if store_id is not None:
        q = q.where(D.store_id == store_id)
    out = []
    with store.guard():
        dailies = list(q.order_by(D.store_id, D.terminal_id))
    for d in dailies:
        theirs = json.loads(d.payload)["totals"]
        ours = [{k: v for k, v in t.items() if k not in ("store_id", "terminal_id")}
                for t in day_totals(store, business_date, store_id=d.store_id, terminal_id=d.terminal_id,
                                    max_seq=d.as_of_seq)]
        if ours == theirs:
            continue
        with store.guard():
            have = (E.select(pw.fn.MAX(E.seq)).where(E.store_id == d.store_id, E.terminal_id == d.terminal_id)
                    .scalar()) or 0
        out.append({"store_id": d.store_id, "terminal_id": d.terminal_id, "closed": d.closed,
                    "as_of_seq": d.as_of_seq, "hq_last_seq": have, "missing_events": have < d.as_of_seq,
                    "lane_totals": theirs, "hq_totals": ours})
    return out


def build_report(store: Store, business_date: str, store_id: str | None = None) -> Report:
    return Report(business_date, store_id, totals=day_totals(store, business_date, store_id=store_id),
                  attention=attention(store, store_id), mismatches=cross_check(store, business_date, store_id))


def render(report: Report) -> str:
    """The report as text tables for a terminal."""
    cols = ("store", "term", "type", "funding", "count", "amount", "declined", "cancelled", "cancelled amt", "open")
    lines = [f"Business date {report.business_date}" + (f", store {report.store_id}" if report.store_id else "")
             + f" ({CURRENCY})", ""]
    rows = [(t["store_id"], t["terminal_id"], t["payment_type"], t["funding_source"] or "-", t["count"], t["amount"],
             t["declined"], t["cancelled"], t["cancelled_amount"], t["open"]) for t in report.totals]
    rows += [(s["store_id"], "all", "", "", s["count"], s["amount"], s["declined"], s["cancelled"],
              s["cancelled_amount"], s["open"]) for s in store_sums(report.totals)]
    lines += _table(cols, rows) if report.totals else ["(no transactions)"]
    lines += ["", "Lanes needing attention:"]
    lines += [f"  {a['store_id']}/{a['terminal_id']}: {a['state']} (status at {a['at']})"
              + (f", backlog {a['backlog']}" if a["backlog"] else "")
              + (f", last ack seq {a['last_ack_seq']}" if a["last_ack_seq"] is not None else "")
              for a in report.attention] or ["  (none)"]
    if report.mismatches:
        lines += ["", "Lanes whose own day totals differ from head office's events:"]
        for m in report.mismatches:
            why = (f"head office has events up to seq {m['hq_last_seq']} only" if m["missing_events"]
                   else "with every event up to that seq stored")
            lines.append(f"  {m['store_id']}/{m['terminal_id']}: daily as of seq {m['as_of_seq']}"
                         f"{' (closed)' if m['closed'] else ''} differs, {why}")
    return "\n".join(lines)


def _table(cols, rows) -> list[str]:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    right = {i for i, c in enumerate(cols) if i >= 4}

    def fmt(r):
        return "  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(cols)] + [fmt(r) for r in rows]


def run(store: Store, business_date: str, store_id: str | None, as_json: bool) -> int:
    """`appliance hq report`: prints the report; exit 0 (mismatches are reported, not fatal)."""
    try:
        report = build_report(store, business_date, store_id)
    finally:
        store.close()
    print(json.dumps(report.as_dict(), ensure_ascii=False) if as_json else render(report))
    return 0
