"""appliance.hq.config: head office's own file and flags, schema-first, no [terminal]."""

from __future__ import annotations

import re
import subprocess

import pytest

from appliance.errors import ConfigError
from appliance.hq.config import load
from conftest import appliance_cmd, subprocess_env


def test_defaults_need_no_file_and_no_terminal():
    cfg = load(None).hq
    assert (cfg.host, cfg.port, cfg.topic_prefix, cfg.group, cfg.db) == ("localhost", 1883, "lanes", "hq", "")
    assert cfg.effective_client_id().startswith("hq-") and cfg.effective_client_id().endswith("-hq")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "hq.toml"
    path.write_text('[hq]\nhost = "broker"\nport = 8883\ngroup = "east"\n[logging]\nlevel = "DEBUG"\n')
    f = load(path, {"port": 1884})
    assert (f.hq.host, f.hq.port, f.hq.group, f.logging.level) == ("broker", 1884, "east", "DEBUG")


@pytest.mark.parametrize("text, overrides, key, reason", [
    ('[terminal]\nstore_id = "S1"\n', {}, "terminal", "unknown key"),
    ("[hq]\nport = 0\n", {}, "hq.port", "must be between 1 and 65535"),
    ("", {"port": 70_000}, "hq.port", "must be between 1 and 65535"),
    ('[hq]\ntopic_prefix = "lanes/#"\n', {}, "hq.topic_prefix", "must not contain + or #"),
    ("", {"topic_prefix": "/lanes"}, "hq.topic_prefix", "without a leading or trailing /"),
    ("", {"topic_prefix": "a//b"}, "hq.topic_prefix", "non-empty topic levels"),
    ("", {"topic_prefix": "$SYS"}, "hq.topic_prefix", "nor start with $"),
    ("", {"group": "a/b"}, "hq.group", "without +, # or /"),
    ("", {"client_id": "x" * 65}, "hq.client_id", "at most 64 bytes"),
    ("", {"password_file": "/nonexistent/pw"}, "hq.password_file", "does not exist"),
    ('[hq]\ntime_zone = "Mars/Olympus"\n', {}, "hq.time_zone", "IANA time zone"),
    ("[hq]\nbatch_size = 0\n", {}, "hq.batch_size", "must be between 1 and 10000"),
])
def test_errors_name_the_dotted_key(tmp_path, text, overrides, key, reason):
    path = tmp_path / "hq.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(reason)) as e:
        load(path, overrides)
    assert e.value.key == key


@pytest.mark.integration
def test_the_ingest_command_refuses_a_bad_flag_before_connecting(tmp_path):
    run = [*appliance_cmd(), "hq", "ingest", "--db", f"sqlite:///{tmp_path / 'hq.sqlite'}"]
    out = subprocess.run([*run, "--topic-prefix", "lanes/+"], capture_output=True, text=True, timeout=60,
                         env=subprocess_env())
    assert out.returncode == 2 and "config error: hq.topic_prefix: must not contain + or #" in out.stderr
    out = subprocess.run([*run, "--config", str(tmp_path / "missing.toml")], capture_output=True, text=True,
                         timeout=60, env=subprocess_env())
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "hq.sqlite").exists()
