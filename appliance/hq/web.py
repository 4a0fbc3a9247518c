"""`appliance hq serve`: a read-only web day view over the database `hq ingest` fills.

Bottle (one module, no dependencies) served by waitress (pure Python, thread-per-request): the
rest of head office is sync and thread-based, peewee opens one connection per thread.

Pages (server-rendered HTML, CSS and a 15-line script shipped in appliance/hq/static, no CDN):

* `/?date=YYYY-MM-DD`: the day (default: today in `[hq] time_zone`): headline figures (the sums of
  report.day_totals, so they equal `appliance hq report --json`), volume per hour (inline SVG),
  per payment type and funding source, every store -> lane with its status, and the stored
  reconciliation of the Beijing day of that date (appliance/hq/reconcile.py): per platform a tick,
  or its differences with links to the lanes' pages, or why it is not done yet;
* `/lane/STORE/TERMINAL?date=`: that lane's payments (masked codes only), lane events, last faults;
* `/payments.csv?date=[&store=&terminal=]`: the day's payments, one row each (latest state);
* any page with `part=main` gives its <main> only: the script polls it every 2 s.

Read-only: SQLite is opened `mode=ro` with `query_only`; a PostgreSQL session is
`default_transaction_read_only`. Nothing here writes. Every query goes through peewee (bound
parameters); a bad date or id is a 400 before any query.

Security: a token (`[hq] token_file`) is required when listening beyond loopback (config error
otherwise) and, when set, on every request: `Authorization: Bearer TOKEN`, or the `hq_token` cookie
that `/?token=TOKEN` sets (HttpOnly, SameSite=Strict); compared in constant time.
"""

from __future__ import annotations

import csv
import datetime as dt
import hmac
import io
import json
import logging
import re
import zoneinfo
from html import escape
from pathlib import Path
from urllib.parse import quote, urlsplit

import bottle

from appliance.business_day import business_date
from appliance.errors import ConfigError
from appliance.hq import reconcile, report
from appliance.hq.config import parse_listen
from appliance.hq.store import Store, redacted
from appliance.journal import utc_now
from appliance.money import format_amount
from appliance.payments.http import loopback_host
from appliance.redact import mask_digit_runs

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "hq_token"
_ID = re.compile(r"^[A-Za-z0-9]{1,8}$")
#: Lane events (faults) shown on a lane page.
LAST_FAULTS = 20


def read_only_store(url: str) -> Store:
    """A Store over `url` that cannot write: SQLite mode=ro + query_only, PostgreSQL read-only sessions."""
    store = Store(url, create=False)
    if urlsplit(store.url).scheme == "sqlite":
        path = store.url[len("sqlite:///"):]
        store.db.init(f"file:{quote(str(Path(path).resolve()))}?mode=ro", uri=True,
                      pragmas={"query_only": 1, "busy_timeout": 10_000})
    else:
        store.db.connect_params["options"] = "-c default_transaction_read_only=on"
    return store


# --- the figures (report.py's functions; the per-payment rows for chart, lane page and CSV) ----------

def headline(totals: list[dict]) -> dict:
    """The sums over every store's lines (zeros on a day without payments), as report.py sums a store."""
    return report.sum_lines(totals, store_id="")


def grouped(totals: list[dict], key: str) -> list[dict]:
    """report.store_sums grouped by `key` (payment_type or funding_source) instead of the store."""
    return report.store_sums([{**t, "store_id": t[key] or "-"} for t in totals])


def payments(store: Store, day: str, store_id: str | None = None, terminal_id: str | None = None) -> list[dict]:
    """Each payment of `day` by its latest event (report's rule: highest seq per store, terminal,
    out_trade_no), sorted by time. `code` is the lane's masked code (digit runs masked again)."""
    E = store.Event
    q = E.select(E.store_id, E.terminal_id, E.out_trade_no, E.seq, E.state, E.payment_type, E.funding_source,
                 E.amount_fen, E.txn_kind, E.at, E.payload).where(E.kind == "txn", E.business_date == day)
    if store_id is not None:
        q = q.where(E.store_id == store_id)
    if terminal_id is not None:
        q = q.where(E.terminal_id == terminal_id)
    latest: dict[tuple, object] = {}
    with store.guard():
        for e in q.order_by(E.seq).iterator():
            latest[(e.store_id, e.terminal_id, e.out_trade_no)] = e
    out = []
    for e in latest.values():
        doc = json.loads(e.payload)
        out.append({"at": e.at, "store_id": e.store_id, "terminal_id": e.terminal_id,
                    "out_trade_no": e.out_trade_no, "state": e.state, "payment_type": e.payment_type,
                    "funding_source": e.funding_source or "", "amount": format_amount(e.amount_fen or 0),
                    "amount_fen": e.amount_fen or 0, "txn_kind": e.txn_kind,
                    "code": mask_digit_runs(str(doc.get("code_masked") or "")),
                    "reason": mask_digit_runs(str(doc.get("reason") or ""))[:80]})
    out.sort(key=lambda p: (p["at"], p["store_id"], p["terminal_id"], p["out_trade_no"]))
    return out


def per_hour(pays: list[dict], zone: str) -> list[int]:
    """Held money (report.HELD) per local hour 0-23 of the latest event's time, in fen."""
    tz, hours = zoneinfo.ZoneInfo(zone), [0] * 24
    held = {str(s) for s in report.HELD}
    for p in pays:
        if p["state"] in held:
            at = dt.datetime.fromisoformat(p["at"].replace("Z", "+00:00")).astimezone(tz)
            hours[at.hour] += p["amount_fen"]
    return hours


def lanes(store: Store, totals: list[dict]) -> list[dict]:
    """Every lane with a status or with payments that day: status, last seen, backlog, open payments."""
    La = store.Lane
    with store.guard():
        rows = {(r.store_id, r.terminal_id): r for r in La.select()}
    open_ = {}
    for t in totals:
        k = (t["store_id"], t["terminal_id"])
        open_[k] = open_.get(k, 0) + t["open"]
    out = []
    for k in sorted(set(rows) | set(open_)):
        r = rows.get(k)
        out.append({"store_id": k[0], "terminal_id": k[1], "state": r.state if r else "unknown",
                    "last_seen": r.received_at if r else "", "backlog": r.backlog if r and r.backlog is not None
                    else "", "open": open_.get(k, 0)})
    return out


def lane_events(store: Store, store_id: str, terminal_id: str, day: str) -> tuple[list[dict], list[dict]]:
    """(that day's lane events, the lane's last LAST_FAULTS faults of any day), newest first."""
    E = store.Event
    base = E.select(E.at, E.state, E.payload).where(E.kind == "lane", E.store_id == store_id,
                                                    E.terminal_id == terminal_id)
    with store.guard():
        day_rows = list(base.where(E.business_date == day).order_by(E.seq.desc()).limit(500))
        faults = list(base.where(E.state == "fault").order_by(E.seq.desc()).limit(LAST_FAULTS))

    def row(e):
        return {"at": e.at, "event": e.state,
                "detail": mask_digit_runs(json.dumps(json.loads(e.payload).get("detail") or {}))[:200]}
    return [row(e) for e in day_rows], [row(e) for e in faults]


# --- HTML ------------------------------------------------------------------------------------------

def _table(cols: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{escape(c)}</th>' for i, c in enumerate(cols))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{v}</td>' for i, v in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body or f'<tr><td colspan={len(cols)}>(none)</td></tr>'}</table>"


def _svg_hours(hours: list[int]) -> str:
    top = max(hours) or 1
    bars = []
    for h, fen in enumerate(hours):
        height = round(100 * fen / top)
        bars.append(f'<rect x="{h * 20 + 2}" y="{110 - height}" width="16" height="{height}">'
                    f'<title>{h:02d}:00 {format_amount(fen)}</title></rect>'
                    + (f'<text x="{h * 20 + 2}" y="124">{h:02d}</text>' if h % 3 == 0 else ""))
    return f'<svg id="hours" width="484" height="130" role="img" aria-label="volume per hour">{"".join(bars)}</svg>'


def _page(title: str, main: str, refresh: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="/static/hq.css"></head><body>'
            f'<main data-refresh="{escape(refresh)}">{main}</main><script src="/static/hq.js"></script></body></html>')


def day_main(store: Store, day: str, zone: str) -> str:
    totals = report.day_totals(store, day)
    h, pays = headline(totals), payments(store, day)
    fig = "".join(f'<div><span id="{k}">{escape(str(v))}</span><small>{label}</small></div>' for k, v, label in (
        ("amount", h["amount"], "amount (CNY)"), ("count", h["count"], "payments"), ("declined", h["declined"],
         "declined"), ("cancelled", h["cancelled"], f'cancelled/refunded ({h["cancelled_amount"]})'),
        ("open", h["open"], "being resolved")))
    num = {1, 2, 3, 4, 5}
    kinds = [[escape(g["store_id"]), g["count"], g["amount"], g["declined"], g["cancelled"], g["open"]]
             for g in grouped(totals, "payment_type")]
    funds = [[escape(g["store_id"]), g["count"], g["amount"], g["declined"], g["cancelled"], g["open"]]
             for g in grouped(totals, "funding_source")]
    cols = ["", "count", "amount", "declined", "cancelled", "open"]
    lane_rows = [[escape(la["store_id"]),
                  f'<a href="/lane/{la["store_id"]}/{la["terminal_id"]}?date={day}">{escape(la["terminal_id"])}</a>',
                  f'<span class="{escape(la["state"])}">{escape(la["state"])}</span>', escape(la["last_seen"]),
                  la["backlog"], la["open"]] for la in lanes(store, totals)]
    return (f'<h1>Day {day}</h1><form method="get" action="/"><input type="date" name="date" value="{day}">'
            f' <button>show</button> <a href="/payments.csv?date={day}">CSV</a></form>'
            f'<div class="figures" id="headline">{fig}</div><h2>Volume per hour ({escape(zone)})</h2>'
            f'{_svg_hours(per_hour(pays, zone))}<h2>Per payment type</h2>{_table(["type", *cols[1:]], kinds, num)}'
            f'<h2>Per funding source</h2>{_table(["funding source", *cols[1:]], funds, num)}'
            f'<h2>Lanes</h2>{_table(["store", "lane", "status", "last seen", "backlog", "open"], lane_rows, {4, 5})}'
            + reconciliation_main(store, day))


def reconciliation_main(store: Store, day: str) -> str:
    """The day's stored reconciliation per platform (the Beijing day of the same date)."""
    with store.guard():
        if not store.db.table_exists("reconciliation"):  # a database from before `hq reconcile`
            return '<h2>Reconciliation</h2><p id="rec-none">(not reconciled: run appliance hq reconcile)</p>'
    out = ['<h2>Reconciliation (Beijing day)</h2>']
    for r in reconcile.stored(store, dt.date.fromisoformat(day)):
        m, p = r["summary"]["matched"], escape(r["platform"])
        words = escape(reconcile.STATE_WORDS[reconcile.DayState(r["state"])])
        fee = r["summary"]["fee_fen"]
        facts = (f'{m["payments"]} payment(s) {format_amount(m["paid_fen"])} and {m["returns"]} return(s) '
                 f'{format_amount(m["returned_fen"])} matched' + (f', fees {format_amount(fee)}' if fee is not None
                                                                 else ""))
        if r["final"] and not r["differences"]:
            out.append(f'<p class="rec ok" id="rec-{p}">&#10004; {p} ({escape(r["kind"])}): {words}; {facts}</p>')
        elif r["final"]:
            out.append(f'<p class="rec bad" id="rec-{p}">&#10008; {p} ({escape(r["kind"])}): {words}; {facts}; '
                       f'{len(r["differences"])} difference(s)</p>')
            rows = [[escape(reconcile.MEANING[reconcile.Kind(d["kind"])]), escape(d["movement"]),
                     escape(d["out_trade_no"]), escape(d["hq_state"] or ""),
                     "" if d["hq_amount_fen"] is None else format_amount(d["hq_amount_fen"]),
                     "" if d["bill_amount_fen"] is None else format_amount(d["bill_amount_fen"]),
                     f'<a href="/lane/{quote(d["store_id"])}/{quote(d["terminal_id"])}?date={day}">'
                     f'{escape(d["store_id"])}/{escape(d["terminal_id"])}</a>' if d["store_id"] else "",
                     escape(d["detail"])]
                    for d in r["differences"]]
            out.append(_table(["difference", "movement", "out_trade_no", "state here", "amount here", "on the bill",
                               "lane", "detail"], rows, {4, 5}))
        else:
            then = f'; next try {escape(r["next_try_at"])}' if r["next_try_at"] else "; no more tries scheduled"
            out.append(f'<p class="rec wait" id="rec-{p}">&#8230; {p} ({escape(r["kind"])}): {words}'
                       f'{": " + escape(r["error"]) if r["error"] else ""}{then}</p>')
        if r["summary"]["note"] and r["method"] == "query":
            out.append(f'<p class="note">{escape(r["summary"]["note"])}</p>')
    if len(out) == 1:
        out.append('<p id="rec-none">(not reconciled yet: bills are fetched the next morning)</p>')
    return "".join(out)


def lane_main(store: Store, store_id: str, terminal_id: str, day: str) -> str:
    pays = payments(store, day, store_id, terminal_id)
    events, faults = lane_events(store, store_id, terminal_id, day)
    prow = [[escape(p["at"]), escape(p["out_trade_no"] or ""), escape(p["payment_type"] or ""),
             escape(p["funding_source"]), p["amount"], escape(p["state"] or ""), escape(p["code"]),
             escape(p["reason"])] for p in pays]
    erow = [[escape(e["at"]), escape(e["event"] or ""), escape(e["detail"])] for e in events]
    frow = [[escape(e["at"]), escape(e["detail"])] for e in faults]
    q = f"date={day}&store={store_id}&terminal={terminal_id}"
    return (f'<h1>{escape(store_id)} / {escape(terminal_id)}, {day}</h1><p><a href="/?date={day}">day</a> · '
            f'<a id="csv" href="/payments.csv?{q}">CSV</a></p><h2>Payments</h2>'
            + _table(["at (UTC)", "out_trade_no", "type", "funding", "amount", "state", "code", "reason"], prow, {4})
            + f'<h2>Lane events</h2>{_table(["at (UTC)", "event", "detail"], erow)}'
            + f'<h2>Last faults</h2>{_table(["at (UTC)", "detail"], frow)}')


CSV_COLUMNS = ("business_date", "store_id", "terminal_id", "out_trade_no", "at", "txn_kind", "payment_type",
               "funding_source", "amount", "state", "code", "reason")


def payments_csv(store: Store, day: str, store_id: str | None, terminal_id: str | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for p in payments(store, day, store_id, terminal_id):
        w.writerow([day if c == "business_date" else p[c] for c in CSV_COLUMNS])
    return buf.getvalue()


# --- the app -----------------------------------------------------------------------------------------

def make_app(store: Store, *, zone: str, cutoff_hour: int, token: str | None) -> bottle.Bottle:
    """The WSGI app over a read-only `store`; `token` None: no authentication (loopback only)."""
    app = bottle.Bottle()

    def today() -> str:
        return business_date(utc_now(), zone, cutoff_hour).isoformat()

    def the_date() -> str:
        text = bottle.request.query.get("date") or today()
        try:
            if len(text) == 10:
                return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            pass
        bottle.abort(400, "date must be YYYY-MM-DD")

    def an_id(text: str | None, what: str, required: bool = False) -> str | None:
        if not text and not required:
            return None
        if not _ID.match(text or ""):
            bottle.abort(400, f"{what} must be 1-8 letters or digits")
        return text

    @app.hook("before_request")
    def authenticate():
        if token is None or bottle.request.path.startswith("/static/"):
            return
        given = bottle.request.query.get("token")
        if given is not None:
            if hmac.compare_digest(given.encode(), token.encode()):
                bottle.response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
                bottle.redirect(bottle.request.path)
            bottle.abort(401, "bad token")
        auth = bottle.request.get_header("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else bottle.request.get_cookie(COOKIE, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            bottle.abort(401, "a token is needed: Authorization: Bearer TOKEN, or open /?token=TOKEN once")

    def respond(title: str, main: str, path: str) -> str:
        bottle.response.set_header("Cache-Control", "no-store")
        if bottle.request.query.get("part") == "main":
            return main
        sep = "&" if "?" in path else "?"
        return _page(title, main, f"{path}{sep}part=main")

    @app.get("/")
    def day_page():
        day = the_date()
        return respond(f"Day {day}", day_main(store, day, zone), f"/?date={day}")

    @app.get("/lane/<store_id>/<terminal_id>")
    def lane_page(store_id, terminal_id):
        an_id(store_id, "store", True), an_id(terminal_id, "terminal", True)
        day = the_date()
        return respond(f"{store_id}/{terminal_id} {day}", lane_main(store, store_id, terminal_id, day),
                       f"/lane/{store_id}/{terminal_id}?date={day}")

    @app.get("/payments.csv")
    def csv_export():
        day = the_date()
        s, t = an_id(bottle.request.query.get("store"), "store"), an_id(bottle.request.query.get("terminal"), "terminal")
        name = "-".join(x for x in ("payments", day, s, t) if x)
        bottle.response.content_type = "text/csv; charset=utf-8"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="{name}.csv"')
        return payments_csv(store, day, s, t)

    @app.get("/static/<name>")
    def static(name):
        return bottle.static_file(name, root=str(STATIC))

    @app.error(400)
    @app.error(401)
    @app.error(404)
    def plain(err):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{err.status_line}: {err.body}\n"

    return app


def run(cfg) -> int:
    """`appliance hq serve` until SIGTERM/SIGINT. Raises ConfigError before listening."""
    import waitress

    try:
        host, port = parse_listen(cfg.listen)
    except ValueError as e:
        raise ConfigError("hq.listen", str(e)) from None
    if not loopback_host(host) and cfg.token_file is None:
        raise ConfigError("hq.token_file", f"is required to listen on {host} (beyond loopback)")
    token = cfg.token_file.read() if cfg.token_file is not None else None
    if token is not None and len(token) < 16:
        raise ConfigError("hq.token_file", "the token must be at least 16 characters")
    store = read_only_store(cfg.db or None)
    app = make_app(store, zone=cfg.time_zone, cutoff_hour=cfg.day_cutoff_hour, token=token)
    log.info("serving the day view of %s on http://%s:%d%s", redacted(store.url), host, port,
             " (token required)" if token else "")
    waitress.serve(app, host=host, port=port, threads=4, ident="appliance-hq", _quiet=True)
    return 0
