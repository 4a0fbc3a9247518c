import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance import simulators
from appliance.config import (Amount, Config, ConfigError, Range, SecretFile, check_state_dir, config_path, from_dict,
                              load, to_toml)
from appliance.money import format_amount
from appliance.payments import provider_options, providers
from appliance.schema import SECRETS_DIR_ENV
from conftest import ROOT, appliance_cmd, lane_dict, remount_read_only, subprocess_env, tmpfs, write_config


def test_example_config_is_valid():
    cfg = load(ROOT / "examples" / "appliance.toml")
    assert isinstance(cfg, Config)
    assert cfg.terminal.store_id == "S0001"
    assert cfg.till.max_amount == 50_000_00
    assert cfg.routing["wechat"] == "sandbox"


def test_defaults_fill_everything_but_the_terminal_ids():
    cfg = from_dict({"terminal": {"store_id": "S1", "terminal_id": "T1"}})
    assert cfg.scanner.kind == "stdin" and cfg.indicator.kind == "log" and cfg.mqtt.port == 1883
    with pytest.raises(AttributeError):
        cfg.terminal.store_id = "x"  # frozen


def test_two_configs_share_no_mutable_default():
    ids = {"terminal": {"store_id": "S1", "terminal_id": "T1"}}
    a, b = from_dict(ids), from_dict(ids)
    assert a.routing == b.routing == {} and a.routing is not b.routing
    assert a.providers is not b.providers
    a.routing["wechat"] = "x"  # a frozen dataclass still holds a mutable dict
    assert b.routing == {} and from_dict(ids).routing == {}


@pytest.mark.parametrize("module", ["appliance.schema", "appliance.payments.sandbox", "appliance.config"])
def test_schema_imports_no_adapter_and_no_module_imports_in_a_circle(module):
    """Each module imports on its own in a fresh interpreter; schema.py pulls in no port, adapter or section."""
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('appliance.') and "
            "m.split('.')[1] in ('config', 'payments', 'scan', 'indicator')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if module == "appliance.schema":
        assert out.strip() == "[]"


def _bad(tmp_path, **change):
    doc = lane_dict(tmp_path)
    for dotted, value in change.items():
        *path, key = dotted.split("__")
        d = doc
        for p in path:
            d = d.setdefault(p, {})
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    return doc


@pytest.mark.parametrize("change,key,reason", [
    ({"terminal__store_id": ...}, "terminal.store_id", "is required"),
    ({"terminal__store_id": "S-1"}, "terminal.store_id", "letters or digits"),
    ({"terminal__terminal_id": "ABCDE"}, "terminal.terminal_id", "1-4"),
    ({"terminal__colour": "red"}, "terminal.colour", "unknown key"),
    ({"scanner__kind": "bluetooth"}, "scanner.kind", "must be one of"),
    ({"scanner__baudrate": "9600"}, "scanner.baudrate", "must be an integer"),
    ({"scanner__baudrate": 0}, "scanner.baudrate", "must be between 50 and 4000000 baud, got 0"),
    ({"scanner__terminator": "EOT"}, "scanner.terminator", "CR, LF"),
    ({"scanner__match_vid_pid": "1234"}, "scanner.match_vid_pid", "VID:PID"),
    ({"scanner__bytesize": 9}, "scanner.bytesize", "must be one of"),
    ({"scanner__keymap": "dvorak"}, "scanner.keymap", "unknown keyboard layout"),
    ({"scanner__kind": "evdev"}, "scanner.device", "needs a device path"),
    ({"indicator__red_pin": 99}, "indicator.red_pin", "between 0 and 53 (a BCM GPIO number), got 99"),
    ({"indicator__buzzer": "yes"}, "indicator.buzzer", "true or false"),
    ({"till__max_amount": 500}, "till.max_amount", "amount string"),
    ({"till__max_amount": "12.345"}, "till.max_amount", "two decimals"),
    ({"till__order_timeout_s": -1}, "till.order_timeout_s", "between 0.1 and 3600 seconds, got -1"),
    ({"classify__order_pattern": "ORD:(.*)"}, "classify.order_pattern", "named groups"),
    ({"classify__order_pattern": "ORD:("}, "classify.order_pattern", "not a valid regular expression"),
    ({"providers__sandbox__kind": "paypal"}, "providers.sandbox.kind", "must be one of"),
    ({"providers__sandbox__latency_ms": -5}, "providers.sandbox.latency_ms", "between 0 and 60000 milliseconds"),
    ({"providers__sandbox__api_key": "secret"}, "providers.sandbox.api_key", "unknown key"),
    ({"routing__wechat": "nowhere"}, "routing.wechat", "not configured"),
    ({"routing__paypal": "sandbox"}, "routing.paypal", "no payment type"),
    ({"mqtt__port": 70000}, "mqtt.port", "between 1 and 65535 (a TCP port), got 70000"),
    ({"mqtt__password": "hunter2"}, "mqtt.password", "unknown key"),
    ({"mqtt__password_file": "/nonexistent/pw"}, "mqtt.password_file", "does not exist"),
    ({"logging__level": "LOUD"}, "logging.level", "must be one of"),
    ({"offline__max_count": 0}, "offline.max_count", "between 1 and 10000 payments, got 0"),
])
def test_fail__bad_values_name_their_dotted_key(tmp_path, change, key, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(_bad(tmp_path, **change))
    assert e.value.key == key
    assert reason in e.value.reason


def _numeric_keys() -> list[tuple[str, type, object]]:
    """(dotted key, type, check) of every number in the schema: sections and each provider kind's options."""
    found = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(tp) and tp is not SecretFile:
                walk(tp, key)
            elif tp in (int, float, Amount):
                found.append((key, tp, f.metadata.get("check")))

    walk(Config, "")
    for kind, options in provider_options().items():
        walk(options, f"providers.{kind}")
    return found


NUMERIC_KEYS = _numeric_keys()


def _with(tmp_path, dotted: str, value) -> dict:
    doc = lane_dict(tmp_path)
    *path, key = dotted.split(".")
    if path[0] == "providers":
        doc["providers"].setdefault(path[1], _provider_table(tmp_path, path[1]))
    d = doc
    for p in path:
        d = d.setdefault(p, {})
    d[key] = value
    return doc


def _provider_table(tmp_path, kind: str) -> dict:
    """A valid table of `kind` to change one number in: its simulator's (key files and required
    options), with timeouts so short that either end of the other one keeps within the call limit."""
    if kind not in simulators.available():
        return {"kind": kind}
    sim = simulators.simulator_class(kind)(tmp_path / f"{kind}-keys")  # keys made once, not started
    return sim.provider_options() | {"connect_timeout_s": 0.1, "read_timeout_s": 0.1}


def _out_of_range(tp, rng: Range) -> list:
    if tp is Amount:
        return ["nan", "inf", "1e300", "0.00", "-1.00", format_amount(rng.lo - 1) if rng.lo > 1 else "0.00",
                format_amount(rng.hi + 1), "99999999999999999999.00"]
    return [float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 10**30, -(10**30),
            rng.lo - 1, rng.hi + 1, rng.hi * 1000]


def test_every_number_in_the_schema_has_a_range():
    assert {"till.order_timeout_s", "scanner.baudrate", "offline.max_total", "providers.sandbox.latency_ms",
            "providers.sandbox.reverse_after_s"} <= {k for k, _, _ in NUMERIC_KEYS}
    for key, _, check in NUMERIC_KEYS:
        assert isinstance(check, Range), f"{key} has no between(lo, hi) check"
        scale = {"seconds": 1, "milliseconds": 1e-3}.get(check.unit)
        if scale:  # a duration that reaches threading.Event.wait or time.sleep must not overflow them
            assert check.hi * scale < threading.TIMEOUT_MAX, key


@pytest.mark.parametrize("key,tp,rng", NUMERIC_KEYS, ids=[k for k, _, _ in NUMERIC_KEYS])
def test_fail__every_number_out_of_range_names_its_key(tmp_path, key, tp, rng):
    """Through the real TOML file: nan and inf are valid TOML floats, 10**30 a valid TOML integer to tomllib."""
    for i, value in enumerate(_out_of_range(tp, rng)):
        path = write_config(tmp_path / f"bad{i}.toml", _with(tmp_path, key, value))
        with pytest.raises(ConfigError) as e:
            load(path)
        assert e.value.key == key, (value, str(e.value))


@pytest.mark.parametrize("key,tp,rng", NUMERIC_KEYS, ids=[k for k, _, _ in NUMERIC_KEYS])
def test_ok__both_ends_of_every_range(tmp_path, key, tp, rng):
    for end in (rng.lo, rng.hi):
        value = format_amount(end) if tp is Amount else end
        cfg = load(write_config(tmp_path / "edge.toml", _with(tmp_path, key, value)))
        section, *rest = key.split(".")
        obj = getattr(cfg, section)
        for name in rest:
            obj = obj[name].options if isinstance(obj, dict) else getattr(obj, name)
        assert obj == end


@pytest.mark.parametrize("change,message", [
    ({"till__order_timeout_s": float("inf")}, "till.order_timeout_s: must be a finite number, got inf"),
    ({"till__result_hold_s": float("nan")}, "till.result_hold_s: must be a finite number, got nan"),
    ({"till__stale_pending_s": 10**400}, "till.stale_pending_s: must be a number of sensible size"),
    ({"till__max_amount": "2000000.00"},
     'till.max_amount: must be between "0.01" and "1000000.00" yuan, got "2000000.00"'),
    ({"providers__sandbox__query_every_s": 1e300},
     "providers.sandbox.query_every_s: must be between 0.01 and 3600 seconds, got 1e+300"),
])
def test_fail__number_messages_say_the_range_and_unit(tmp_path, change, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_bad(tmp_path, **change))
    assert str(e.value).startswith(message)


def test_fail__section_must_be_a_table(tmp_path):
    doc = lane_dict(tmp_path)
    doc["scanner"] = "stdin"
    with pytest.raises(ConfigError, match="scanner: must be a table"):
        from_dict(doc)


def test_fail__bad_rules_file_is_a_config_error(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\ntype='x'\n")
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, classify={"rules_file": str(rules)}))
    assert e.value.key == "classify.rules_file"


def test_fail__not_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[terminal\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml")


def test_secret_file_is_read_only_on_demand_and_never_printed(tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    cfg = from_dict(lane_dict(tmp_path, mqtt={"password_file": str(secret)}))
    assert isinstance(cfg.mqtt.password_file, SecretFile)
    assert cfg.mqtt.password_file.read() == "hunter2"
    assert "hunter2" not in repr(cfg) and "hunter2" not in to_toml(cfg)
    assert str(secret) in to_toml(cfg)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = write_config(tmp_path / "a.toml", {"terminal": {"store_id": "S1", "terminal_id": "T1", "state_dir": "st"}})
    assert load(path).terminal.state_dir == tmp_path / "st"


def test_lookup_order(monkeypatch, tmp_path):
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "env.toml"))
    assert config_path("/x.toml").name == "x.toml"
    assert config_path(None) == tmp_path / "env.toml"
    monkeypatch.delenv("APPLIANCE_CONFIG")
    assert str(config_path(None)) == "/etc/appliance/appliance.toml"


def test_to_toml_roundtrips(tmp_path):
    cfg = from_dict(lane_dict(tmp_path))
    p = tmp_path / "again.toml"
    p.write_text(to_toml(cfg))
    assert load(p) == cfg


@pytest.mark.integration
def test_cli_check_config_prints_effective_config_and_exit_2_on_error(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    good = write_config(tmp_path / "good.toml", lane_dict(tmp_path, mqtt={"password_file": str(secret)}))
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(good)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'store_id = "S0001"' in r.stdout and "hunter2" not in r.stdout
    bad = write_config(tmp_path / "bad.toml", _bad(tmp_path, scanner__baudrate="fast"))
    for cmd in (["check-config"], ["run"], ["journal"], ["charge", "--order", "A", "--amount", "1", "--code", "1"]):
        r = subprocess.run(appliance_cmd() + cmd + ["--config", str(bad)], capture_output=True, text=True,
                           env=subprocess_env(), timeout=60)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "scanner.baudrate: must be an integer" in r.stderr
    r = subprocess.run(appliance_cmd() + ["check-config"], capture_output=True, text=True,
                       env=subprocess_env(APPLIANCE_CONFIG=str(good)), timeout=60)
    assert r.returncode == 0


# --- hostile files: each is a ConfigError naming the key or the file, never another exception ----


@pytest.mark.parametrize("content,message", [
    (b'[terminal]\nstore_id = "S\xff1"\n', "is not UTF-8 text (byte 0xff at offset 24)"),
    (b"\xff\xfe[\x00t\x00", "is not UTF-8 text (byte 0xff at offset 0)"),  # a UTF-16 file from a Windows editor
    (b"a = " + b"[" * 5000 + b"]" * 5000, "is not usable TOML: RecursionError"),
    (b"a = 1" + b"0" * 5000, "is not usable TOML: ValueError"),
    (b"# padding\n" * 120_000, "is larger than 1024 KiB"),
])
def test_fail__unreadable_config_file_is_named(tmp_path, content, message):
    path = tmp_path / "appliance.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.key == "" and str(path) in str(e.value) and message in str(e.value)


KINDS = ", ".join(map(repr, providers.known()))  # 'alipay', 'sandbox', ...


@pytest.mark.parametrize("kind,message", [
    (["sandbox"], f"must be one of {KINDS}, got an array"),
    ({"name": "sandbox"}, f"must be one of {KINDS}, got a table"),
    (1, f"must be one of {KINDS}, got an integer"),
    (..., f"is required (one of {KINDS})"),
])
def test_fail__provider_kind_of_the_wrong_type(tmp_path, kind, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_bad(tmp_path, providers__sandbox__kind=kind))
    assert (e.value.key, e.value.reason) == ("providers.sandbox.kind", message)


@pytest.mark.parametrize("section,key", [("terminal", "state_dir"), ("classify", "rules_file"),
                                         ("mqtt", "password_file")])
def test_fail__path_with_nul_or_unknown_home_is_named(tmp_path, section, key):
    for value, reason in [("st\0ate", "must not contain a NUL character"),
                          ("~nosuchuser/x", "~nosuchuser/x: cannot expand ~ (no such user or no home directory)")]:
        with pytest.raises(ConfigError) as e:
            from_dict(lane_dict(tmp_path, **{section: {key: value}}))
        assert (e.value.key, e.value.reason) == (f"{section}.{key}", reason)


def test_fail__secret_file_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, mqtt={"password_file": str(tmp_path)}))
    assert e.value.key == "mqtt.password_file"
    assert e.value.reason == f"secret file {tmp_path} is a directory, not a file"


@pytest.mark.parametrize("mode,ok", [(0o600, True), (0o640, True), (0o400, True), (0o604, False), (0o644, False),
                                     (0o602, False), (0o601, False)])
def test_secret_file_must_grant_nothing_to_others(tmp_path, mode, ok):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(mode)
    doc = lane_dict(tmp_path, mqtt={"password_file": str(secret)})
    if ok:
        assert from_dict(doc).mqtt.password_file.read() == "hunter2"
        return
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert e.value.key == "mqtt.password_file" and f"mode {mode:04o}" in e.value.reason
    assert "hunter2" not in str(e.value)


def test_fail__secret_file_that_is_not_utf8_is_named_when_read(tmp_path):
    """mqtt.password_file is read by its check when the config is loaded (check-config finds it)."""
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xffhunter2")
    secret.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, mqtt={"password_file": str(secret)}))
    assert e.value.key == "mqtt.password_file" and "not UTF-8" in e.value.reason
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        SecretFile(secret, "mqtt.password_file").read()
    assert e.value.key == "mqtt.password_file" and "not UTF-8" in e.value.reason


@pytest.mark.integration
def _credential_dirs(tmp_path: Path, monkeypatch, *, in_service: bool) -> tuple[Path, Path]:
    """(the secrets dir read outside a service, the service's $CREDENTIALS_DIRECTORY), both empty;
    the environment says whether this process is inside the service."""
    secrets_dir, creds = tmp_path / "secrets", tmp_path / "credentials"
    for d in (secrets_dir, creds):
        d.mkdir(mode=0o700)
    monkeypatch.setenv(SECRETS_DIR_ENV, str(secrets_dir))
    if in_service:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    else:
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return secrets_dir, creds


def _put(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credential_outside_a_service_is_read_from_the_secrets_dir(tmp_path, monkeypatch):
    secrets_dir, creds = _credential_dirs(tmp_path, monkeypatch, in_service=False)
    _put(secrets_dir / "mqtt-password", "hunter2\n")
    _put(creds / "mqtt-password", "not-this-one\n")  # a stale credentials dir is not looked at
    cfg = from_dict(lane_dict(tmp_path, mqtt={"password_file": "credential:mqtt-password"}))
    assert cfg.mqtt.password_file.read() == "hunter2"
    shown = to_toml(cfg)
    assert f'password_file = "credential:mqtt-password"  # secret, read from {secrets_dir}/mqtt-password' in shown
    assert "hunter2" not in shown


@pytest.mark.parametrize("file_name", ["mqtt-password", "secrets_mqtt-password"])
def test_credential_inside_the_service_is_read_from_credentials_directory(tmp_path, monkeypatch, file_name):
    """`NAME` from a LoadCredential=NAME:... line, `secrets_NAME` from the unit's directory line."""
    secrets_dir, creds = _credential_dirs(tmp_path, monkeypatch, in_service=True)
    _put(secrets_dir / "mqtt-password", "not-this-one\n")  # root's file: the service never reads it
    _put(creds / file_name, "hunter2\n", 0o400)  # as systemd copies it
    cfg = from_dict(lane_dict(tmp_path, mqtt={"password_file": "credential:mqtt-password"}))
    assert cfg.mqtt.password_file.read() == "hunter2" and cfg.mqtt.password_file.path == creds / file_name


def test_credential_of_its_own_line_wins_over_the_directorys(tmp_path, monkeypatch):
    _, creds = _credential_dirs(tmp_path, monkeypatch, in_service=True)
    _put(creds / "secrets_mqtt-password", "from-the-dir\n", 0o400)
    _put(creds / "mqtt-password", "from-its-own-line\n", 0o400)
    cfg = from_dict(lane_dict(tmp_path, mqtt={"password_file": "credential:mqtt-password"}))
    assert cfg.mqtt.password_file.read() == "from-its-own-line"


def test_credential_in_an_adapters_secret_key(tmp_path, monkeypatch):
    """Any SecretFile key takes a credential, the adapters' own options included."""
    secrets_dir, _ = _credential_dirs(tmp_path, monkeypatch, in_service=False)
    _put(secrets_dir / "jeepay-app-secret", "x" * 32 + "\n")
    jeepay = {"kind": "jeepay", "base_url": "https://pay.example.com", "mch_no": "M1700000001",
              "app_id": "66a1f0c2e4b0a1b2c3d4e5f6", "app_secret_file": "credential:jeepay-app-secret"}
    cfg = from_dict(lane_dict(tmp_path, providers={"jeepay": jeepay}))
    assert cfg.providers["jeepay"].options.app_secret_file.read() == "x" * 32


@pytest.mark.parametrize("in_service", [False, True])
def test_fail__missing_credential_names_the_key_and_where_it_looked(tmp_path, monkeypatch, in_service):
    secrets_dir, creds = _credential_dirs(tmp_path, monkeypatch, in_service=in_service)
    if in_service:
        _put(secrets_dir / "mqtt-password", "hunter2\n")  # there, but not handed to the service
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, mqtt={"password_file": "credential:mqtt-password"}))
    assert e.value.key == "mqtt.password_file"
    if in_service:
        assert e.value.reason == (f"credential mqtt-password: the service has no such credential (neither "
                                  f"{creds}/mqtt-password nor {creds}/secrets_mqtt-password); put the file "
                                  f"mqtt-password in /etc/appliance/secrets and restart the service")
    else:
        assert e.value.reason == (f"credential mqtt-password ({secrets_dir}/mqtt-password: outside a service, "
                                  f"$CREDENTIALS_DIRECTORY is not set) does not exist")


@pytest.mark.parametrize("mode", [0o604, 0o644])
def test_fail__credential_open_to_others(tmp_path, monkeypatch, mode):
    secrets_dir, _ = _credential_dirs(tmp_path, monkeypatch, in_service=False)
    _put(secrets_dir / "pw", "hunter2\n", mode)
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, mqtt={"password_file": "credential:pw"}))
    assert e.value.key == "mqtt.password_file" and f"credential pw ({secrets_dir}/pw" in e.value.reason
    assert f"is open to others (mode {mode:04o})" in e.value.reason and "hunter2" not in str(e.value)


@pytest.mark.parametrize("name", ["", "../pw", "a/b", "..", ".pw", "a..b", "pw\0", "pw\n", "x" * 201])
def test_fail__credential_name_that_is_not_a_file_name(tmp_path, monkeypatch, name):
    secrets_dir, _ = _credential_dirs(tmp_path, monkeypatch, in_service=False)
    _put(tmp_path / "pw", "hunter2\n")  # what ../pw would reach
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, mqtt={"password_file": f"credential:{name}"}))
    assert e.value.key == "mqtt.password_file" and e.value.reason.startswith("credential name ")


def test_secrets_unopened_for_commands_that_use_none(tmp_path, monkeypatch):
    """`appliance status` loads the config with check_secrets=False: a technician in group appliance
    cannot read root's secret files, and needs none. Paths are still resolved, names still checked."""
    secrets_dir, _ = _credential_dirs(tmp_path, monkeypatch, in_service=False)
    doc = lane_dict(tmp_path / "state", mqtt={"password_file": "credential:mqtt-password"})
    conf = write_config(tmp_path / "a.toml", doc)
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert e.value.key == "mqtt.password_file"
    assert load(conf, check_secrets=False).mqtt.password_file.path == secrets_dir / "mqtt-password"
    with pytest.raises(ConfigError):  # the next load checks again
        load(conf)
    _put(secrets_dir / "mqtt-password", "")  # there but not one line: the field's check is skipped too
    assert load(conf, check_secrets=False).mqtt.password_file.key == "mqtt.password_file"
    bad = write_config(tmp_path / "b.toml", lane_dict(tmp_path / "state", mqtt={"password_file": "credential:../pw"}))
    with pytest.raises(ConfigError) as e:
        load(bad, check_secrets=False)
    assert e.value.reason.startswith("credential name ")


def test_cli_status_runs_without_reading_the_secrets(tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    conf = write_config(tmp_path / "appliance.toml", lane_dict(tmp_path / "state",
                                                               mqtt={"password_file": "credential:pw"}))
    env = subprocess_env(**{SECRETS_DIR_ENV: str(secrets_dir)})
    r = subprocess.run(appliance_cmd() + ["status", "--config", str(conf)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and "config error" not in r.stderr, r.stderr  # 1: the service does not run
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(conf)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and "mqtt.password_file: credential pw" in r.stderr


def test_cli_check_config_reads_credentials_in_and_outside_the_service(tmp_path):
    """The real CLI: as systemd's ExecStartPre (credentials given), as a root technician (none:
    the secrets dir), and with the secret nowhere (exit 2, the key named)."""
    secrets_dir, creds = tmp_path / "secrets", tmp_path / "credentials"
    secrets_dir.mkdir()
    creds.mkdir()
    conf = write_config(tmp_path / "appliance.toml", lane_dict(tmp_path / "state",
                                                               mqtt={"password_file": "credential:pw"}))

    def check_config(**env) -> subprocess.CompletedProcess:
        return subprocess.run(appliance_cmd() + ["check-config", "--config", str(conf)], capture_output=True,
                              text=True, env=subprocess_env(**env), timeout=60)

    r = check_config(**{SECRETS_DIR_ENV: str(secrets_dir)})
    assert r.returncode == 2 and f"mqtt.password_file: credential pw ({secrets_dir}/pw" in r.stderr, r.stderr
    _put(creds / "secrets_pw", "hunter2\n", 0o400)
    r = check_config(CREDENTIALS_DIRECTORY=str(creds), **{SECRETS_DIR_ENV: str(secrets_dir)})
    assert r.returncode == 0 and f"read from {creds}/secrets_pw" in r.stdout and "hunter2" not in r.stdout, r.stderr
    _put(secrets_dir / "pw", "hunter2\n")
    r = check_config(**{SECRETS_DIR_ENV: str(secrets_dir)})
    assert r.returncode == 0 and f"read from {secrets_dir}/pw" in r.stdout, r.stderr


def test_cli_hostile_configs_exit_2_naming_the_key_without_traceback(tmp_path):
    """What systemd's ExecStartPre sees: exit 2 and one line naming the key or the file."""
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes('[terminal]\nstore_id = "Café"\n'.encode("latin-1"))
    cases = {
        not_utf8: str(not_utf8),
        write_config(tmp_path / "inf.toml", _bad(tmp_path, till__order_timeout_s=float("inf"))):
            "till.order_timeout_s: must be a finite number, got inf",
        write_config(tmp_path / "big.toml", _bad(tmp_path, providers__sandbox__latency_ms=10**30)):
            "providers.sandbox.latency_ms: must be between 0 and 60000 milliseconds",
        write_config(tmp_path / "secretdir.toml", _bad(tmp_path, mqtt__password_file=str(tmp_path))):
            "mqtt.password_file: secret file",
    }
    kind_array = write_config(tmp_path / "kind.toml", _bad(tmp_path, providers__sandbox__kind=...))
    kind_array.write_text(kind_array.read_text().replace("[providers.sandbox]\n",
                                                         '[providers.sandbox]\nkind = ["sandbox"]\n'))
    cases[kind_array] = f"providers.sandbox.kind: must be one of {KINDS}, got an array"
    for path, expected in cases.items():
        r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(path)], capture_output=True,
                           text=True, env=subprocess_env(), timeout=60)
        assert (r.returncode, r.stdout) == (2, ""), (path.name, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


# --- terminal.state_dir: check-config proves the service user can write it ----------------------


def _state_dir_cfg(tmp_path, state_dir: Path) -> Config:
    return from_dict(lane_dict(state_dir), base_dir=tmp_path)


def _refusal(cfg: Config) -> str:
    with pytest.raises(ConfigError) as e:
        check_state_dir(cfg)
    assert e.value.key == "terminal.state_dir"
    return e.value.reason


@pytest.fixture
def read_only_mount(tmp_path):
    """A real read-only filesystem: the one thing that stops root writing."""
    with tmpfs(tmp_path / "ro", "1m") as mnt:
        remount_read_only(mnt)
        yield mnt


@contextmanager
def _as_nobody():
    """Run the block with effective uid/gid nobody: the service user's view, not root's."""
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_tmp():
    """A directory every user can traverse (pytest's own tmp dirs are root-only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user (seteuid)")
    with tempfile.TemporaryDirectory(prefix="appliance-test-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_ok__state_dir_writable_or_creatable_and_nothing_left_behind(tmp_path):
    state = tmp_path / "state"
    check_state_dir(_state_dir_cfg(tmp_path, state / "deeper"))  # missing, parent missing, grandparent writable
    assert not state.exists()
    state.mkdir()
    (state / "journal.sqlite").write_bytes(b"keep me")
    check_state_dir(_state_dir_cfg(tmp_path, state))
    assert sorted(p.name for p in state.iterdir()) == ["journal.sqlite"]
    assert (state / "journal.sqlite").read_bytes() == b"keep me"


def test_fail__state_dir_is_a_file(tmp_path):
    (tmp_path / "state").write_text("")
    assert _refusal(_state_dir_cfg(tmp_path, tmp_path / "state")) == f"{tmp_path / 'state'} is not a directory"
    assert _refusal(_state_dir_cfg(tmp_path, tmp_path / "state" / "sub")) == (
        f"{tmp_path / 'state' / 'sub'} cannot be created: {tmp_path / 'state'} is not a directory")


def test_fail__state_dir_on_a_read_only_mount(tmp_path, read_only_mount):
    reason = _refusal(_state_dir_cfg(tmp_path, read_only_mount))
    assert reason == f"{read_only_mount} is not writable by user root (Read-only file system)"
    reason = _refusal(_state_dir_cfg(tmp_path, read_only_mount / "appliance" / "state"))
    assert reason == (f"{read_only_mount / 'appliance' / 'state'} does not exist and cannot be created: "
                      f"{read_only_mount} is not writable by user root (Read-only file system)")


def test_fail__state_dir_not_writable_by_the_service_user(tmp_path, shared_tmp):
    owned_by_root = shared_tmp / "state"
    owned_by_root.mkdir(mode=0o755)
    with _as_nobody():
        assert "is not writable by user nobody (Permission denied)" in _refusal(_state_dir_cfg(tmp_path, owned_by_root))
        assert "does not exist and cannot be created" in _refusal(_state_dir_cfg(tmp_path, owned_by_root / "new"))
    # The technician ran `appliance charge` as root once: the journal is root's, the dir is the service's.
    os.chmod(owned_by_root, 0o777)
    (owned_by_root / "journal.sqlite").touch(mode=0o600)
    with _as_nobody():
        assert _refusal(_state_dir_cfg(tmp_path, owned_by_root)) == (
            f"{owned_by_root / 'journal.sqlite'} is not writable by user nobody (Permission denied)")
    os.chown(owned_by_root / "journal.sqlite", 65534, 65534)
    with _as_nobody():
        check_state_dir(_state_dir_cfg(tmp_path, owned_by_root))


@pytest.mark.integration
def test_cli_check_config_refuses_a_read_only_state_dir_but_journal_still_reads(tmp_path, read_only_mount):
    """check-config (systemd's ExecStartPre) exits 2; the check is not in load(), so reading still works."""
    path = write_config(tmp_path / "a.toml", lane_dict(read_only_mount))
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(path)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"appliance: config error: terminal.state_dir: {read_only_mount} is not writable by user "
                        "root (Read-only file system)\n")
    load(path)  # what `appliance journal` does first: no probe, no error


# --- [mqtt] -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix,reason", [
    ("", "1-200 characters"),
    ("lanes/+", "wildcards"),
    ("lanes/#", "wildcards"),
    ("$SYS", "must not start with $"),
    ("/lanes", "empty level"),
    ("lanes/", "empty level"),
    ("acme//lanes", "empty level"),
    ("lanes\x00x", "control characters"),
])
def test_fail__mqtt_topic_prefix(tmp_path, prefix, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(_bad(tmp_path, mqtt__topic_prefix=prefix))
    assert e.value.key == "mqtt.topic_prefix" and reason in e.value.reason


def test_ok__mqtt_defaults_and_a_nested_prefix(tmp_path):
    m = from_dict(_bad(tmp_path, mqtt__topic_prefix="acme/cn/lanes")).mqtt
    assert m.topic_prefix == "acme/cn/lanes"
    assert (m.protocol, m.client_id, m.tls, m.session_expiry_s, m.reconnect_min_s, m.reconnect_max_s,
            m.max_inflight, m.daily_every_s, m.status_every_s, m.prune_after_days) == (
        "5", "", False, 7 * 86_400, 1.0, 60.0, 100, 10.0, 30.0, 30.0)


def _secret(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def _client_pair(tmp_path, name: str) -> tuple[str, str]:
    from appliance.simulators.wechat_v2 import new_certificate
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())  # an EC key: MQTT brokers take any the TLS library does
    cert = tmp_path / f"{name}.crt"
    cert.write_bytes(new_certificate(name, key).public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return str(cert), _secret(tmp_path / f"{name}.key", pem)


def test_ok__mqtt_tls_with_a_client_certificate(tmp_path):
    cert, key = _client_pair(tmp_path, "lane")
    m = from_dict(_bad(tmp_path, mqtt__tls=True, mqtt__ca_file=cert, mqtt__cert_file=cert, mqtt__key_file=key)).mqtt
    assert isinstance(m.key_file, SecretFile) and str(m.cert_file) == cert
    assert "PRIVATE" not in to_toml(from_dict(_bad(tmp_path, mqtt__tls=True, mqtt__cert_file=cert,
                                                   mqtt__key_file=key)))


def test_fail__mqtt_cross_field_rules_name_the_key(tmp_path):
    cert, key = _client_pair(tmp_path, "lane")
    _, other_key = _client_pair(tmp_path, "other")
    pw = _secret(tmp_path / "pw", b"s3cret\n")
    cases = [
        ({"mqtt__reconnect_min_s": 30, "mqtt__reconnect_max_s": 10}, "mqtt.reconnect_min_s",
         "must not exceed mqtt.reconnect_max_s (10 s), got 30 s"),
        ({"mqtt__ca_file": cert}, "mqtt.ca_file", "mqtt.tls is false"),
        ({"mqtt__tls": True, "mqtt__cert_file": cert}, "mqtt.key_file", "go together"),
        ({"mqtt__tls": True, "mqtt__key_file": key}, "mqtt.cert_file", "go together"),
        ({"mqtt__tls": True, "mqtt__cert_file": cert, "mqtt__key_file": other_key}, "mqtt.key_file",
         "is not the private key of"),
        ({"mqtt__tls": True, "mqtt__ca_file": pw}, "mqtt.ca_file", "not a PEM X.509 certificate"),
        ({"mqtt__tls": True, "mqtt__ca_file": str(tmp_path / "nope.pem")}, "mqtt.ca_file", "No such file"),
        ({"mqtt__tls": True, "mqtt__cert_file": cert, "mqtt__key_file": pw}, "mqtt.key_file",
         "not an unencrypted PEM private key"),
        ({"mqtt__protocol": 5}, "mqtt.protocol", "must be one of '5', '3.1.1'"),
        ({"mqtt__protocol": "3.1.1", "mqtt__password_file": pw}, "mqtt.username", "required"),
        ({"mqtt__client_id": "lane/1"}, "mqtt.client_id", "1-128 of"),
        ({"mqtt__password_file": _secret(tmp_path / "pw2", b"a\nb\n")}, "mqtt.password_file", "one line"),
        ({"mqtt__password_file": _secret(tmp_path / "pw3", b"\n")}, "mqtt.password_file", "one line"),
        ({"mqtt__host": ""}, "mqtt.host", "host name"),
    ]
    for change, key, reason in cases:
        with pytest.raises(ConfigError) as e:
            from_dict(_bad(tmp_path, **change))
        assert (e.value.key, reason in e.value.reason) == (key, True), (change, str(e.value))
        assert "s3cret" not in str(e.value) and "PRIVATE" not in str(e.value)
