"""Log setup for journald: chatty libraries are held back whatever the configured level."""

import logging

import pytest

from appliance.logs import setup


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_libraries_that_log_secrets_or_every_request_are_held_back(level):
    root = logging.getLogger()
    handlers, saved_level = root.handlers[:], root.level
    try:
        setup(level)
        configured = logging.getLevelName(level)
        assert logging.getLogger("peewee").level == max(logging.INFO, configured)  # SQL with parameters
        for name in ("httpx", "httpcore"):  # each platform call's URL
            assert logging.getLogger(name).level == max(logging.WARNING, configured)
        assert root.level == configured
    finally:
        root.handlers[:] = handlers
        root.setLevel(saved_level)
