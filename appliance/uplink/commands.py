"""Head office's commands to the lane: one MQTT request in, one reply dict out.

The MQTT adapter subscribes to `B/cmd/+` and calls `Commands(name, payload)` on a worker thread
(never paho's network thread: a command may wait for the till, up to `CHARGE_WAIT_S`, or for a
cancel's platform call) with the topic's last level and the raw payload; it publishes the reply
on `B/cmd/<name>/reply`. Nothing here knows MQTT.

Requests (docs/mqtt.md): a JSON object of at most `MAX_REQUEST` bytes, UTF-8, with a `request_id`
of 1-64 of [A-Za-z0-9_.:-] and exactly the fields of its command:

    charge {"request_id", "order", "amount_fen"}   the register pushes an order instead of a
        ticket scan: the till's ArmCommand. Result {"order", "amount", "amount_fen",
        "state": "awaiting_code", "expires_in_s"}; the payment then arrives as txn events.
    cancel {"request_id", "order"}   the cancel card and the order's ticket, through the control
        socket's own handler (`CommandHandler.handle`): one cancel, one code path. Result: the
        control socket's reply dict.
    sync {"request_id"}   result {"backlog", "oldest_queued_seq", "last_seq", "last_ack_seq",
        "last_ack_at", "connected"}; then the uplink republishes its status and drains at once.
    ping {"request_id"}   result {"pong": true}.

Order ids follow the till's ORDER_ID, so no id can hold `+`, `#` or `/` (MQTT's wildcards and
level separator); amount_fen is a whole number of fen from 1 to money.MAX_FEN.

Reply: {"kind": "reply", "version": 1, "command", "request_id", "ok", "error", "result",
"store_id", "terminal_id", "at"}. `ok` is false when the request was malformed (result null;
request_id null unless it was itself valid), or when the lane refused or failed the command
(result then holds the lane's answer). A malformed request changes nothing: it never reaches
the till. A cancel the platform itself refused is ok (the lane did it) with state "paid" and
exit code 3 in its result. Charges over MQTT carry no payment code, and no reply or log line
shows any text of a request but short names (`control.shown`).

Each command is logged once: at INFO when carried out, at WARNING when refused.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from typing import Callable

from appliance import logs, schemas
from appliance.control import CommandHandler, shown, shown_names
from appliance.errors import ApplianceError, BadInput, BadMessage
from appliance.journal import rfc3339, utc_now
from appliance.money import MAX_FEN, format_amount
from appliance.till import AWAITING_CODE, ORDER_ID, ArmCommand, Till

log = logging.getLogger(__name__)

#: The largest request taken, in bytes (the payload as it came).
MAX_REQUEST = schemas.COMMAND_MAX_BYTES
#: The reply's payload version.
VERSION = 1
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: Each command's fields besides request_id, all required, none other allowed.
FIELDS: dict[str, frozenset[str]] = {"charge": frozenset({"order", "amount_fen"}), "cancel": frozenset({"order"}),
                                     "sync": frozenset(), "ping": frozenset()}
#: The keys of Uplink.state() a sync reports.
SYNC_KEYS = ("backlog", "oldest_queued_seq", "last_seq", "last_ack_seq", "last_ack_at", "connected")
#: How long a charge waits for the till to take it. The till runs one event at a time: it may be
#: in a platform call (at most 15 s, payments/http.py) when the command comes. Past this the
#: command is withdrawn if the till has not started it (nothing was done).
CHARGE_WAIT_S = 20.0
#: How long more once the till has started it: arming a lane takes a journal read.
CHARGE_FINISH_S = 5.0


class Refusal(ApplianceError):
    """The lane refused or failed a well-formed command. `result` is its answer, if it gave one."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.result = result


class Commands:
    """Validates head office's requests and runs them on the service's own till.

    `handler` is the control socket's CommandHandler (cancels go through it), `uplink_state` is
    `Uplink.state`, `sync_now` is `Uplink.sync_now`; `clock` gives the reply's `at` (aware UTC).
    Calling it never raises: every failure is a reply with ok false. Safe from several threads.
    """

    def __init__(self, handler: CommandHandler, till: Till, uplink_state: Callable[[], dict],
                 sync_now: Callable[[], None], store_id: str, terminal_id: str,
                 clock: Callable[[], datetime] = utc_now, *, charge_wait_s: float = CHARGE_WAIT_S):
        self.handler = handler
        self.till = till
        self.uplink_state = uplink_state
        self.sync_now = sync_now
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.clock = clock
        self.charge_wait_s = charge_wait_s
        self._run = {"charge": self._charge, "cancel": self._cancel, "sync": self._sync, "ping": self._ping}

    def __call__(self, name: str, payload: bytes) -> dict:
        """The reply to one request: `name` is the command (the topic's last level), `payload`
        the request's bytes as they came."""
        command = name if name in FIELDS else (shown(name) or "(empty)")[:64]
        request_id = None
        try:
            request = parse(payload)
            request_id = check_request_id(request)
            check_fields(name, request)
        except BadInput as e:
            log.warning("mqtt command %s (request %s) refused: %s", command, request_id or "-", e)
            return self.reply(command, request_id, error=str(e))
        try:
            result = self._run[name](request)
        except Refusal as e:
            log.warning("mqtt command %s (request %s) refused: %s", command, request_id, e)
            return self.reply(command, request_id, error=str(e), result=e.result)
        except Exception as e:  # a bug: the reply still goes, without the text (it might quote a request)
            log.exception("mqtt command %s (request %s) failed", command, request_id)
            return self.reply(command, request_id, error=f"unexpected error in the lane service: {type(e).__name__}")
        log.info("mqtt command %s (request %s): %s", command, request_id, _summary(name, result),
                 extra=_about(result))
        return self.reply(command, request_id, result=result)

    def reply(self, command: str, request_id: str | None, *, error: str | None = None,
              result: dict | None = None) -> dict:
        return {"kind": "reply", "version": VERSION, "command": command, "request_id": request_id,
                "ok": error is None, "error": error, "result": result, "store_id": self.store_id,
                "terminal_id": self.terminal_id, "at": rfc3339(self.clock())}

    # --- the commands: each returns its result, or raises Refusal ----------------------------

    def _charge(self, request: dict) -> dict:
        order, amount_fen = request["order"], request["amount_fen"]
        future = self.till.post_command(ArmCommand(order, amount_fen))
        try:
            try:
                result = future.result(timeout=self.charge_wait_s)
            except FutureTimeout:
                if future.cancel():
                    raise Refusal(f"the lane did not take the order within {self.charge_wait_s:g}s (busy with a "
                                  "payment); nothing was done, try again") from None
                result = future.result(timeout=CHARGE_FINISH_S)
        except CancelledError:
            raise Refusal("the lane service is stopping; nothing was done, try again") from None
        except FutureTimeout:
            raise Refusal("the lane took the order but gave no answer; its status tells whether it waits for "
                          "a code") from None
        answer = {"order": order, "amount": format_amount(amount_fen), "amount_fen": amount_fen,
                  "state": result.state}
        if result.state != AWAITING_CODE:
            raise Refusal(result.reason, answer)
        return {**answer, "expires_in_s": self.till.order_timeout_s}

    def _cancel(self, request: dict) -> dict:
        try:
            reply = self.handler.handle({"op": "cancel", "order": request["order"]})
        except CommandHandler.Abandoned:
            raise Refusal("the lane service stopped before the answer; the cancel is finished at its next "
                          "start, see the lane's txn events") from None
        if "error" in reply:
            raise Refusal(reply["error"], reply)
        if reply["state"] == "refused":
            raise Refusal(reply["reason"], reply)
        return reply

    def _sync(self, request: dict) -> dict:
        try:
            state = self.uplink_state()
        except ApplianceError as e:  # the journal cannot be read: say so, do not guess
            raise Refusal(f"the outbox cannot be read: {e}") from None
        self.sync_now()
        return {k: state[k] for k in SYNC_KEYS}

    def _ping(self, request: dict) -> dict:
        return {"pong": True}


# --- validation ---------------------------------------------------------------------------------


def parse(payload: bytes) -> dict:
    """A request's bytes as a JSON object, parsed as strictly as head office's messages (UTF-8,
    no duplicate keys, no NaN: `schemas.parse`); BadInput naming why not (never quoting it)."""
    try:
        request = schemas.parse(bytes(payload), MAX_REQUEST)
    except BadMessage as e:
        raise BadInput(str(e)) from None
    if not isinstance(request, dict):
        raise BadInput("a request must be a JSON object")
    return request


def check_request_id(request: dict) -> str:
    request_id = request.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise BadInput("request_id must be 1-64 of A-Z, a-z, 0-9, '_', '.', ':' or '-'" if "request_id" in request
                       else "missing request_id")
    return request_id


def check_fields(name: str, request: dict) -> None:
    """Exactly the command's fields, each of its type and range (the till checks the rest: the
    lane's limit, an order already taken)."""
    fields = FIELDS.get(name)
    if fields is None:
        raise BadInput(f"unknown command {shown(name) or '(empty)'}: expected {', '.join(FIELDS)}")
    given = set(request) - {"request_id"}
    if missing := sorted(fields - given):
        raise BadInput(f"{name}: missing {', '.join(missing)}")
    if extra := given - fields:
        raise BadInput(f"{name}: unknown field(s) {shown_names(extra)}")
    if "order" in fields:
        order = request["order"]
        if not isinstance(order, str) or not ORDER_ID.fullmatch(order):
            raise BadInput("order must be 1-32 letters, digits, '_' or '-'")
    if "amount_fen" in fields:
        amount = request["amount_fen"]
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_FEN:
            raise BadInput(f"amount_fen must be a whole number of fen from 1 to {MAX_FEN}")


def _about(result: dict) -> dict | None:
    """`extra=` with the journal fields of the order (and payment) a command's result is about."""
    if result.get("txn_id") is not None:
        return {"journal_fields": {"TXN_ID": str(result["txn_id"]), "ORDER": result["order"],
                                   "STATE": result["state"], "OUT_TRADE_NO": result["out_trade_no"]}}
    return logs.order(result["order"]) if result.get("order") else None


def _summary(name: str, result: dict) -> str:
    """One log line's worth of a command's result (no code can be in it: none came)."""
    if name == "charge":
        return f"order {result['order']} {result['amount']} due, waiting for a payment code"
    if name == "cancel":
        return f"order {result['order']}: {result['state']}" + (f" ({result['reason']})" if result["reason"] else "")
    if name == "sync":
        return f"backlog {result['backlog']}, last ack {result['last_ack_seq']}"
    return "pong"
