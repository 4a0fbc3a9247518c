"""Log setup for journald: chatty libraries are held back whatever the configured level."""

import logging

import pytest

from appliance.logs import setup

LIBRARIES = ("peewee", "httpx", "httpcore")


@pytest.fixture
def restored_logging():
    """setup() changes process-wide loggers: put them back for the tests that follow."""
    root = logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level for name in ("", *LIBRARIES)}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_libraries_that_log_secrets_or_every_request_are_held_back(restored_logging, level):
    setup(level)
    configured = logging.getLevelName(level)
    assert logging.getLogger("peewee").level == max(logging.INFO, configured)  # SQL with parameters
    for name in ("httpx", "httpcore"):  # each platform call's URL
        assert logging.getLogger(name).level == max(logging.WARNING, configured)
    assert logging.getLogger().level == configured
