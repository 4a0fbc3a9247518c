"""Money as integer fen (1/100 yuan). Never float.

`parse_amount("12.34") == 1234`; `format_amount(1234) == "12.34"`. Strings with at most two
decimals are the only input form: no signs, exponents, thousands separators or spaces.
"""

import re

from appliance.errors import BadInput

#: Alipay's ceiling for one trade is 100,000,000.00 yuan; nothing above it is a valid amount anywhere.
MAX_FEN = 100_000_000_00

_AMOUNT = re.compile(r"(?P<yuan>[0-9]+)(?:\.(?P<fen>[0-9]{1,2}))?")


def parse_amount(text: str) -> int:
    """Parse "12", "12.3" or "12.34" into fen. Raises BadInput naming what is wrong."""
    if not isinstance(text, str):
        raise BadInput(f"amount must be text, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise BadInput("amount is empty")
    if len(s) > 24:
        raise BadInput(f"amount is {len(s)} characters long")
    if s.startswith("-"):
        raise BadInput(f"amount {s!r} is negative")
    if "." in s and len(s.split(".", 1)[1]) > 2:
        raise BadInput(f"amount {s!r} has more than two decimals")
    m = _AMOUNT.fullmatch(s)
    if not m:
        raise BadInput(f"amount {s[:20]!r} is not a decimal number like 12.34")
    fen = int(m["yuan"]) * 100 + int((m["fen"] or "0").ljust(2, "0"))
    if fen == 0:
        raise BadInput("amount is zero")
    if fen > MAX_FEN:
        raise BadInput(f"amount {s!r} exceeds {format_amount(MAX_FEN)}")
    return fen


def format_amount(fen: int) -> str:
    """Format fen as yuan with exactly two decimals: 5 -> "0.05"."""
    if fen < 0:
        return "-" + format_amount(-fen)
    return f"{fen // 100}.{fen % 100:02d}"
