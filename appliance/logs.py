"""Logging for journald: stderr, no timestamps (journald adds them), one line per state change."""

import logging
import sys

#: Libraries that log secrets at DEBUG: peewee logs every SQL statement with its parameters, among
#: them the full payment code of a payment accepted offline. They log at INFO at most, whatever the
#: configured level.
_QUIET_BELOW_INFO = ("peewee",)
#: Libraries that log every request at INFO (httpx: each platform call's URL and status). The
#: adapters log what changed, once; these log warnings only.
_QUIET_BELOW_WARNING = ("httpx", "httpcore")


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET_BELOW_INFO:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    for name in _QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
