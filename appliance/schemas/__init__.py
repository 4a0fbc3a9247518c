"""The JSON Schemas (draft 2020-12) of every MQTT payload kind, and the check head office runs on
each message it receives.

The schemas are package data (`appliance/schemas/<kind>.json`) and the contract with head office
(docs/mqtt.md shows them): strict objects (`additionalProperties: false`), ids and times by
pattern, states and kinds by enum. `check(kind, payload)` parses one message and validates it:

    >>> check("status", b'{"kind":"status", ...}')       # -> the dict, or raises BadMessage

Beyond the schema it refuses what JSON Schema cannot say: invalid UTF-8, duplicate keys, NaN or
Infinity, nesting past Python's recursion limit, more than `MAX_BYTES` (`COMMAND_MAX_BYTES` for a
command request), and an `amount` string that disagrees with its `amount_fen`.

Hazard: a `BadMessage` reason is logged and stored (the rejects table), and a bad payload may hold
anything, even a full payment code where the schema wants a mask. A reason therefore names the
JSON path and the schema's complaint, masks every run of 16+ digits and is cut to `REASON_CHARS`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from appliance.errors import BadMessage
from appliance.money import format_amount
from appliance.redact import mask_digit_runs

if TYPE_CHECKING:  # jsonschema is imported by the first check(): a lane (parse only) never loads it (~8 MB)
    from jsonschema import Draft202012Validator

#: The payload kinds, each with its schema file `<kind>.json`.
KINDS = ("txn", "lane", "daily", "status", "reply", "command")
#: Documents that stay on the lane, checked like the payloads: the running service's status file and
#: `appliance status --json` (appliance/status.py, docs/operations.md). Never sent over MQTT.
LOCAL_KINDS = ("service_status", "status_report")
#: The commands a lane takes on `{prefix}/{store}/{terminal}/cmd/<name>` (the command schema's $defs).
COMMANDS = ("charge", "cancel", "sync", "ping")
#: Topic suffix under `{prefix}/{store}/{terminal}/` -> payload kind, for the lane->head office topics.
TOPIC_KINDS = {"txn": "txn", "event": "lane", "daily": "daily", "status": "status"}
#: The largest message of any kind (a daily of 1,000 totals is ~250 KB); larger is refused unparsed.
MAX_BYTES = 1024 * 1024
#: The largest command request a lane accepts.
COMMAND_MAX_BYTES = 4096
#: The longest reason a BadMessage gives.
REASON_CHARS = 200


def schema(kind: str) -> dict:
    """The JSON Schema of `kind` (one of KINDS or LOCAL_KINDS), freshly parsed: the caller may change it."""
    if kind not in KINDS + LOCAL_KINDS:
        raise ValueError(f"unknown payload kind {kind!r} (known: {', '.join(KINDS + LOCAL_KINDS)})")
    from importlib import resources  # here: a lane never reads a schema

    return json.loads(resources.files(__package__).joinpath(f"{kind}.json").read_text(encoding="utf-8"))


@functools.cache
def _validator(kind: str, command: str | None = None) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    s = schema(kind)
    Draft202012Validator.check_schema(s)
    if command is not None:  # one command's arguments: its $defs entry
        s = {"$schema": s["$schema"], "$ref": f"#/$defs/{command}", "$defs": s["$defs"]}
    return Draft202012Validator(_inline(s, s.get("$defs", {})), format_checker=Draft202012Validator.FORMAT_CHECKER)


def _inline(node, defs: dict):
    """`node` with every `{"$ref": "#/$defs/x"}` replaced by that definition (our schemas have no
    recursive ones): the same verdicts, twice as fast as jsonschema resolving each reference."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            target = _inline(defs[ref.removeprefix("#/$defs/")], defs)
            rest = {k: _inline(v, defs) for k, v in node.items() if k != "$ref"}
            return {**rest, "allOf": [target]} if rest else target  # $ref beside other keywords: both apply
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def check(kind: str, payload: bytes | str, *, command: str | None = None) -> dict:
    """Parse and validate one message of `kind` (from its topic); returns the parsed object.

    `command` (for kind "command") validates that one command's arguments instead of any
    command's. Raises BadMessage with a short, masked reason (see the module's hazard note) for
    anything that is not a valid message of that kind; ValueError for an unknown kind or command,
    which is the caller's bug, not the message's.
    """
    if kind not in KINDS + LOCAL_KINDS:
        raise ValueError(f"unknown payload kind {kind!r} (known: {', '.join(KINDS + LOCAL_KINDS)})")
    if command is not None and (kind != "command" or command not in COMMANDS):
        raise ValueError(f"unknown command {command!r} for kind {kind!r} (known: {', '.join(COMMANDS)})")
    from jsonschema.exceptions import best_match

    doc = parse(payload, COMMAND_MAX_BYTES if kind == "command" else MAX_BYTES)
    error = best_match(_validator(kind, command).iter_errors(doc))
    if error is not None:
        raise BadMessage(_reason(_path(error.absolute_path), error.message))
    for path, amount, fen in _amounts(kind, doc):
        if amount != format_amount(fen):
            raise BadMessage(_reason(path, f"{amount!r} is not the amount of {fen} fen ({format_amount(fen)})"))
    return doc


def parse(payload: bytes | str, max_bytes: int = MAX_BYTES) -> object:
    """Strict JSON: UTF-8, at most `max_bytes`, no duplicate keys, no NaN/Infinity. Raises BadMessage."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if len(payload) > max_bytes:
        raise BadMessage(f"$: {len(payload)} bytes, more than the {max_bytes} a message may have")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMessage(f"$: not UTF-8 (byte 0x{payload[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise BadMessage(f"$: not JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise BadMessage("$: not usable JSON: nested too deeply") from None
    except ValueError as e:  # _no_duplicates, _no_constant; int() of more than 4300 digits
        raise BadMessage(_reason("$", f"not usable JSON: {e}")) from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _amounts(kind: str, doc: dict):
    """(path, amount string, fen) pairs that must agree, in a valid message of `kind`."""
    if kind == "txn":
        yield "$.amount", doc["amount"], doc["amount_fen"]
    elif kind == "daily":
        for i, t in enumerate(doc["totals"]):
            yield f"$.totals[{i}].amount", t["amount"], t["amount_fen"]
            yield f"$.totals[{i}].cancelled_amount", t["cancelled_amount"], t["cancelled_amount_fen"]


def _path(parts) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _reason(path: str, problem: str) -> str:
    text = mask_digit_runs(f"{path}: {problem}".replace("\n", " "))
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"
