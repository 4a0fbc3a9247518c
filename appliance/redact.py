"""Masking of payment codes and other bearer tokens for logs, CLI output and MQTT.

Payment codes are bearer tokens: whoever holds one can charge the customer once. At most the
first 4 and last 4 characters are ever shown, and only when at least 8 stay hidden.
"""

import re

_MAX_SHOWN = 40


def mask(text: str) -> str:
    """Mask a code: "134567890123456789" -> "1345**********6789".

    Codes shorter than 16 characters show at most 2 + 2 (a half code is still a secret);
    under 8 characters nothing is shown. Control characters never reach the output and very
    long input is summarised by its length.
    """
    n = len(text)
    if n >= 16:
        shown = 4
    elif n >= 8:
        shown = 2
    else:
        shown = 0
    head, tail = _printable(text[:shown]), _printable(text[n - shown:] if shown else "")
    stars = n - 2 * shown
    if stars > _MAX_SHOWN:
        return f"{head}*…({n} chars)…{tail}"
    return head + "*" * stars + tail


def _printable(s: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in s)


def printable(text: str, limit: int = 64) -> str:
    """A log-safe rendering of text that is *not* secret (order tickets, command cards)."""
    s = text.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else f"{s[:limit]}…({len(text)} chars)"


_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9]{16,}(?![0-9A-Za-z])")


def mask_digit_runs(text: str) -> str:
    """Mask every run of 16 or more digits in a platform's text: payment codes are 16-24 digits,
    and a channel's error text may quote the request it refused, code included, where the
    adapter no longer knows the code to mask it by value (a later query)."""
    return _DIGIT_RUN.sub(lambda m: mask(m.group()), text)
