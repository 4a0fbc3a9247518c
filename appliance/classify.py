"""Classification of one scan: payment code, order ticket, command card or unknown.

The payment-code rules are data (`payment_types.toml` in this package, plus an optional local
file that adds, replaces or disables rules by type). A code is matched on its length and its
leading digits; when several rules match, the longest matching prefix wins, then the local file,
then file order. Nothing here prints or stores a full payment code: `Classification.masked`
is the only rendering meant for output.

The order-ticket pattern comes from the config, so it is matched with RE2 (google-re2), whose
time is linear in the input whatever the pattern: a pattern such as `(?P<order>(a+)+)b...` cannot
hang the till as it would with Python's backtracking `re`. And no pattern ever sees more than
MAX_SCAN_LEN characters: a longer scan is "unknown" before anything is matched. The project's own
fixed patterns stay on `re`.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import re2

from appliance.errors import BadInput
from appliance.money import parse_amount
from appliance.redact import mask, printable

#: Longest text a scan may have. Payment codes are <= 24 digits, order tickets a few dozen chars.
MAX_SCAN_LEN = 256
#: Most codes one `lengths` or `prefixes` entry of a rule may stand for ("10-15" stands for 6).
MAX_EXPANSION = 10_000


@dataclass(frozen=True)
class Rule:
    payment_type: str
    lengths: frozenset[int]
    prefixes: tuple[str, ...]
    rank: int  # position in the merged table: local file first, then defaults

    def match(self, digits: str) -> str | None:
        """The longest of this rule's prefixes that starts `digits`, if the length is allowed."""
        if len(digits) not in self.lengths:
            return None
        hits = [p for p in self.prefixes if digits.startswith(p)]
        return max(hits, key=len) if hits else None


@dataclass(frozen=True)
class Classification:
    kind: str  # "payment" | "order" | "command" | "unknown"
    masked: str  # safe to print and log
    payment_type: str | None = None
    reason: str | None = None
    order: str | None = None
    amount_fen: int | None = None
    command: str | None = None

    def as_dict(self) -> dict:
        d = {"input_masked": self.masked, "kind": self.kind, "payment_type": self.payment_type,
             "reason": self.reason}
        if self.kind == "order":
            d.update(order=self.order, amount_fen=self.amount_fen)
        if self.kind == "command":
            d["command"] = self.command
        return d


def _expand(spec, what: str, width_from_text: bool) -> list:
    """Expand "10-15" into ["10", ..., "15"] (prefixes) or [10, ..., 15] (lengths).

    Raises ValueError for anything but numbers and ranges of at most 64 digits, and when the
    entry stands for more than MAX_EXPANSION values (a typo like "8-80000000" must not hang).
    """
    items = spec if isinstance(spec, list) else [spec]
    out: list = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and not width_from_text:
            out.append(item)
            continue
        if not isinstance(item, str) or not re.fullmatch(r"[0-9]{1,64}(-[0-9]{1,64})?", item):
            raise ValueError(f"{what}: {str(item)[:70]!r} is not a number or a range like \"10-15\"")
        lo, _, hi = item.partition("-")
        hi = hi or lo
        if int(hi) < int(lo) or (width_from_text and len(lo) != len(hi)):
            raise ValueError(f"{what}: range {item!r} is empty or mixes widths")
        if len(out) + int(hi) - int(lo) >= MAX_EXPANSION:
            raise ValueError(f"{what}: stands for more than {MAX_EXPANSION} values; list fewer, longer prefixes")
        values = range(int(lo), int(hi) + 1)
        out.extend(str(v).zfill(len(lo)) for v in values) if width_from_text else out.extend(values)
    return out


def _read_rules(text: str, origin: str) -> list[dict]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{origin} is not valid TOML: {e}") from None
    except RecursionError:
        raise ValueError(f"{origin} is not usable TOML: nested too deeply") from None
    unknown = set(doc) - {"rule"}
    if unknown:
        raise ValueError(f"{origin}: unknown key(s) {sorted(unknown)}; expected [[rule]] tables")
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise ValueError(f"{origin}: 'rule' must be an array of tables ([[rule]])")
    out = []
    for i, r in enumerate(rules):
        where = f"{origin} rule[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: must be a table")
        extra = set(r) - {"type", "lengths", "prefixes", "enabled"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}")
        ptype = r.get("type")
        if not isinstance(ptype, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", ptype):
            raise ValueError(f"{where}.type: must be a lower-case name like 'wechat'")
        enabled = r.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{where}.enabled: must be true or false")
        entry = {"type": ptype, "enabled": enabled}
        if enabled:
            if "lengths" not in r or "prefixes" not in r:
                raise ValueError(f"{where}: needs 'lengths' and 'prefixes'")
            entry["lengths"] = _expand(r["lengths"], f"{where}.lengths", False)
            entry["prefixes"] = _expand(r["prefixes"], f"{where}.prefixes", True)
            if not entry["lengths"] or not entry["prefixes"]:
                raise ValueError(f"{where}: 'lengths' and 'prefixes' must not be empty")
            if any(not 8 <= n <= 64 for n in entry["lengths"]):
                raise ValueError(f"{where}.lengths: payment codes are 8-64 digits long")
        out.append(entry)
    return out


#: A rules file is a few KiB; more than this is a wrong path (a log, a disk image).
MAX_RULES_BYTES = 1024 * 1024


def _read_local(path: Path) -> str | None:
    """The local rules file's text, or None when there is none. Raises OSError (a name too long,
    a directory, ...), UnicodeDecodeError, or ValueError for what cannot be a rules file: not a
    regular file (a FIFO would block the start, /dev/zero would never end) or too large."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{str(path)[:200]}: not a regular file")
        data = f.read(MAX_RULES_BYTES + 1)
    if len(data) > MAX_RULES_BYTES:
        raise ValueError(f"{str(path)[:200]}: larger than {MAX_RULES_BYTES // 1024} KiB: not a rules file")
    return data.decode("utf-8")


def load_rules(local_file: Path | None = None) -> list[Rule]:
    """The merged rule table: the local file's rules (if the file exists) then the defaults.

    A local rule with the same type as a default replaces it; `enabled = false` removes it.
    Raises ValueError naming the file and rule on any malformed entry.
    """
    default_text = (Path(__file__).parent / "payment_types.toml").read_text("utf-8")  # not importlib.resources's
    # 0.7 MB: the package is installed as files
    defaults = _read_rules(default_text, "payment_types.toml (built in)")
    local: list[dict] = []
    if local_file is not None:
        try:
            text = _read_local(local_file)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(local_file)[:200]}: {e.strerror if isinstance(e, OSError) else e}") from None
        if text is not None:
            local = _read_rules(text, str(local_file))
    overridden = {r["type"] for r in local}
    merged = local + [r for r in defaults if r["type"] not in overridden]
    return [Rule(r["type"], frozenset(r["lengths"]), tuple(r["prefixes"]), rank)
            for rank, r in enumerate(merged) if r["enabled"]]


def compile_order_pattern(pattern: str):
    """Compile an order-ticket pattern with RE2. Raises ValueError saying what is wrong with it.

    The pattern must be valid, must need nothing RE2 lacks (backreferences, lookaround: the
    features that make matching time exponential) and must have the named groups `order` and
    `amount`. RE2's own error log to stderr is switched off: the ValueError says it all.
    """
    options = re2.Options()
    options.log_errors = False
    try:
        rx = re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        if "too large" in reason:
            raise ValueError(f"is too large for the linear-time engine (RE2): {reason}") from None
        try:  # RE2 says only "invalid"; Python's re tells a typo from a feature RE2 lacks on purpose
            with warnings.catch_warnings():  # its FutureWarnings ("possible set difference") are not ours
                warnings.simplefilter("ignore")
                re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as py:
            raise ValueError(f"is not a valid regular expression: {py}") from None
        raise ValueError(f"uses a feature the linear-time engine (RE2) does not support: {reason}") from None
    missing = {"order", "amount"} - set(rx.groupindex)
    if missing:
        raise ValueError(f"must have named groups (?P<order>...) and (?P<amount>...); missing {sorted(missing)}")
    return rx


class Classifier:
    """Classifies scans against a rule table, an order-ticket pattern and the command cards."""

    def __init__(self, rules: list[Rule], order_pattern: str, commands: dict[str, str]):
        """`commands` maps the card text (e.g. "CMD:CANCEL") to the command name ("cancel").

        Raises ValueError if `order_pattern` is unusable (see compile_order_pattern).
        """
        self._rules = rules
        self._order = compile_order_pattern(order_pattern)
        self._commands = dict(commands)
        self.payment_types = frozenset(r.payment_type for r in rules)

    def classify(self, text: str) -> Classification:
        """Never raises on any str input; bad input is kind "unknown" with a reason."""
        m = mask(text)
        defect = _defect(text)
        if defect:
            return Classification("unknown", m, reason=defect)
        if text in self._commands:
            return Classification("command", printable(text), command=self._commands[text])
        om = self._order.fullmatch(text)
        if om:
            if om["order"] is None or om["amount"] is None:  # an optional group in the configured pattern
                return Classification("unknown", printable(text), reason="order ticket without order or amount")
            try:
                fen = parse_amount(om["amount"])
            except BadInput as e:
                return Classification("unknown", printable(text), reason=f"order ticket with bad amount: {e}")
            return Classification("order", printable(text), order=om["order"], amount_fen=fen)
        if not text.isdigit():
            return Classification("unknown", m, reason="not digits and not an order ticket or command card")
        return self._payment(text, m)

    def _payment(self, digits: str, m: str) -> Classification:
        best: tuple[int, int, Rule] | None = None
        for rule in self._rules:
            prefix = rule.match(digits)
            if prefix is not None:
                key = (-len(prefix), rule.rank, rule)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best:
            return Classification("payment", m, payment_type=best[2].payment_type)
        # Not a code: say why in a way that helps a technician spot truncated scans.
        prefix_hits = [r for r in self._rules if any(digits.startswith(p) for p in r.prefixes)]
        if prefix_hits:
            r = prefix_hits[0]
            want = "/".join(str(n) for n in sorted(r.lengths))
            shortness = "too short" if len(digits) < min(r.lengths) else "wrong length"
            return Classification("unknown", m, reason=f"{shortness}: {len(digits)} digits, "
                                  f"{r.payment_type} codes with this prefix have {want}")
        if len(digits) < min(n for r in self._rules for n in r.lengths):
            return Classification("unknown", m, reason=f"too short: {len(digits)} digits")
        return Classification("unknown", m, reason=f"no rule for {len(digits)}-digit codes starting {digits[:2]}")


def _defect(text: str) -> str | None:
    if not text:
        return "empty scan"
    if len(text) > MAX_SCAN_LEN:
        return f"too long: {len(text)} characters (max {MAX_SCAN_LEN})"
    if not text.isascii():
        return "non-ASCII characters"
    if any(not c.isprintable() for c in text):
        return "control characters"
    if text != text.strip():
        return "leading or trailing whitespace"
    return None
