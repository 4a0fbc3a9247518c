"""Configuration: one TOML file validated at start into frozen dataclasses.

The schema is the dataclasses below. Every field has a default or is required, and every error
names its dotted key (`scanner.baudrate: must be one of ...`). Unknown keys are errors, so a typo
never silently falls back to a default. Secrets (platform keys, the MQTT password) are never
written inline: the config names a file (`*_file` keys, type `SecretFile`) whose content is read
only by the adapter that needs it.

Lookup order of the file: `--config PATH`, else `$APPLIANCE_CONFIG`, else
`/etc/appliance/appliance.toml`. Loading touches no hardware and opens no sockets.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.business_day import time_zone
from appliance.errors import ConfigError
from appliance.money import format_amount
# The schema machinery lives in schema.py (adapters import it from there, never from here); its
# names are re-exported for the callers of the sections.
from appliance.schema import (ANY_AMOUNT, DAY, GPIO_PIN, HOUR, SECONDS, TCP_PORT, YUAN, Amount,  # noqa: F401
                              FieldError, NoOptions, Range, SecretFile, between, build, join, opt, secrets_checked,
                              secrets_unchecked, tname)

DEFAULT_PATH = Path("/etc/appliance/appliance.toml")
ENV_VAR = "APPLIANCE_CONFIG"
#: A real config is a few KiB; anything near this is a wrong path (a log, /dev/zero).
MAX_CONFIG_BYTES = 1024 * 1024


def _ident(max_len: int):
    def check(v: str) -> str:
        if not re.fullmatch(rf"[A-Za-z0-9]{{1,{max_len}}}", v):
            raise ValueError(f"must be 1-{max_len} letters or digits (it becomes part of out_trade_no)")
        return v
    return check


def _order_pattern(v: str) -> str:
    from appliance.classify import compile_order_pattern  # RE2, linear time: see docs/config.md

    compile_order_pattern(v)
    return v


def _terminator(v: str) -> str:
    if v.upper() in ("CR", "LF", "CRLF", "TAB", "ENTER"):
        return v.upper()
    if re.fullmatch(r"0x[0-9a-fA-F]{2}", v):
        return v.lower()
    raise ValueError("must be CR, LF, CRLF, TAB, ENTER or one byte as 0xNN")


def _keymap(v: str) -> str:
    from appliance.scan.keymap import LAYOUTS

    if v not in LAYOUTS:
        raise ValueError(f"unknown keyboard layout {v!r} (known: {', '.join(sorted(LAYOUTS))})")
    return v


def _vid_pid(v: str) -> str:
    if v and not re.fullmatch(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{4}", v):
        raise ValueError("must be VID:PID in hex, like 05e0:1200")
    return v.lower()


def _kind_of(port: str):
    """The check of a port's `kind`: a kind its registry knows (built in, or offered by a plug-in)."""
    def check(v: str) -> str:
        if not _registry(port).knows(v):
            raise ValueError(f"must be one of {', '.join(map(repr, _registry(port).known()))}, got {v!r}")
        return v
    return check


def _registry(port: str):
    if port == "scanner":
        from appliance.scan import scanners
        return scanners
    from appliance.indicator import indicators
    return indicators


@dataclass(frozen=True)
class TerminalConfig:
    store_id: str = opt(check=_ident(8), doc="store number at the payment platforms")
    terminal_id: str = opt(check=_ident(4), doc="lane number within the store")
    state_dir: Path = opt(Path("/var/lib/appliance"), doc="journal and device keys live here")
    time_zone: str = opt("Asia/Shanghai", check=time_zone, doc="the store's IANA time zone: its business days")
    day_cutoff_hour: int = opt(0, check=between(0, 23, "(an hour of the local day)"),
                               doc="the business day starts at this local hour (2: 01:30 counts to the day before)")
    min_free_mb: int = opt(64, check=between(0, 1_000_000, "MiB"),
                           doc="below this much free room on the state dir's filesystem, new payments are refused")
    runtime_dir: Path = opt(Path("/run/appliance"),
                            doc="the service's status.json (appliance status) lives here; under systemd "
                                "$RUNTIME_DIRECTORY (RuntimeDirectory=appliance) wins")


@dataclass(frozen=True)
class TillConfig:
    order_timeout_s: float = opt(60.0, check=between(0.1, HOUR, SECONDS),
                                 doc="wait for a payment code after an order ticket")
    cancel_timeout_s: float = opt(30.0, check=between(0.1, HOUR, SECONDS),
                                  doc="wait for an order ticket after the cancel card")
    duplicate_window_s: float = opt(10.0, check=between(0.0, HOUR, SECONDS),
                                    doc="the same payment code again this soon after its charge is ignored (stutter)")
    result_hold_s: float = opt(3.0, check=between(0.0, 60.0, SECONDS), doc="how long paid/declined shows before ready")
    max_amount: Amount = opt(Amount(50_000_00), check=between(Amount(1), Amount(1_000_000_00), YUAN),
                             doc="largest amount one order may charge")
    stale_pending_s: float = opt(60.0, check=between(0.1, HOUR, SECONDS),
                                 doc="a payment pending longer was cut off mid-call (crash) and is resolved; "
                                     "must exceed the slowest platform call")


@dataclass(frozen=True)
class ClassifyConfig:
    rules_file: Path = opt(Path("/etc/appliance/payment_types.toml"), doc="extra/overriding rules; absent = none")
    order_pattern: str = opt(r"ORD:(?P<order>[A-Za-z0-9_-]{1,32}):(?P<amount>[0-9]{1,9}\.[0-9]{2})",
                              check=_order_pattern, doc="full-match regex for order tickets")
    cancel_card: str = opt("CMD:CANCEL", doc="text of the cancel command card")


@dataclass(frozen=True)
class ScannerConfig:
    kind: str = opt("stdin", check=_kind_of("scanner"), doc="stdin, serial, evdev, none, or a plug-in's")
    device: str = opt("", doc="device path; prefer /dev/input/by-id/..., /dev/serial/by-id/... or /dev/scanner")
    match_name: str = opt("", doc="evdev auto-detect: substring of the device name")
    match_vid_pid: str = opt("", check=_vid_pid, doc="evdev auto-detect: USB VID:PID")
    keymap: str = opt("us", check=_keymap, doc="keyboard layout the scanner types in (evdev)")
    terminator: str = opt("ENTER", check=_terminator, doc="end of a scan")
    inter_char_timeout_ms: int = opt(100, check=between(1, 60_000, "milliseconds"),
                                     doc="a scan whose characters arrive slower is discarded")
    baudrate: int = opt(9600, check=between(50, 4_000_000, "baud"))
    bytesize: Literal[7, 8] = opt(8)
    parity: Literal["N", "E", "O"] = opt("N")
    stopbits: Literal[1, 2] = opt(1)
    strip_aim: bool = opt(False, doc="strip an AIM symbology identifier like ]Q1")
    strip_prefix: str = opt("")
    strip_suffix: str = opt("")


@dataclass(frozen=True)
class IndicatorConfig:
    kind: str = opt("log", check=_kind_of("indicator"), doc="gpio, mock, log, none, or a plug-in's")
    red_pin: int = opt(17, check=GPIO_PIN)
    green_pin: int = opt(27, check=GPIO_PIN)
    blue_pin: int = opt(22, check=GPIO_PIN)
    buzzer_pin: int = opt(18, check=GPIO_PIN)
    buzzer: bool = opt(True, doc="false = LED only")
    active_high: bool = opt(True, doc="LED polarity: false for common-anode RGB LEDs")


@dataclass(frozen=True)
class ProviderConfig:
    """One payment platform account. `kind` picks the adapter; the other keys are the adapter's options."""

    kind: str
    options: Any

    @classmethod
    def __schema_build__(cls, raw: Any, key: str, base: Path) -> ProviderConfig:
        return _provider(raw, key, base)


@dataclass(frozen=True)
class OfflineConfig:
    enabled: bool = opt(False, doc="accept payments for later forwarding while a platform is unreachable")
    max_amount: Amount = opt(Amount(200_00), check=between(Amount(1), Amount(100_000_00), YUAN))
    max_count: int = opt(20, check=between(1, 10_000, "payments"))
    max_total: Amount = opt(Amount(1_000_00), check=between(Amount(1), Amount(1_000_000_00), YUAN))
    forward_within_s: float = opt(86_400.0, check=between(1.0, 30 * DAY, SECONDS))


def _topic_prefix(v: str) -> str:
    """Schema check: the first levels of every topic (`{prefix}/{store}/{terminal}/...`)."""
    if not 1 <= len(v) <= 200:
        raise ValueError("must be 1-200 characters")
    if "+" in v or "#" in v:
        raise ValueError("must not contain the MQTT wildcards + or #")
    if v.startswith("$"):
        raise ValueError("must not start with $ (brokers reserve those topics)")
    if v.startswith("/") or v.endswith("/") or "//" in v:
        raise ValueError("must not start or end with / nor hold an empty level (//)")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in v):
        raise ValueError("must not contain control characters")
    return v


def _host(v: str) -> str:
    if not 1 <= len(v) <= 253 or any(c.isspace() or ord(c) < 0x20 for c in v):
        raise ValueError("must be a host name or address (1-253 characters, no spaces)")
    return v


def _client_id(v: str) -> str:
    if v and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", v):
        raise ValueError("must be 1-128 of A-Z a-z 0-9 _ . : - (or empty: derived from the terminal ids)")
    return v


def _one_line_secret(f: SecretFile) -> SecretFile:
    """Schema check: a secret file holding one non-empty line (the MQTT password)."""
    try:
        text = f.read()
    except ConfigError as e:
        raise ValueError(e.reason) from None
    if not text or "\n" in text:
        raise ValueError(f"secret file {f.path} must hold one line of text")
    if len(text.encode("utf-8")) > 65_535:  # an MQTT string field
        raise ValueError(f"secret file {f.path} holds more than 65535 bytes")
    return f


def _pem_certificates(p: Path) -> Path:
    """Schema check: a file of PEM X.509 certificates (a CA bundle, a client certificate)."""
    from cryptography import x509

    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{p}: {e.strerror}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{p} is not a PEM X.509 certificate (or bundle of them)") from None
    return p


def pem_private_key_file(f: SecretFile) -> SecretFile:
    """Schema check: an unencrypted PEM private key (RSA or EC, any PKCS#1/#8/SEC1 PEM)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_private_key(f.path.read_bytes(), password=None)
    except OSError as e:
        raise ValueError(f"secret file {f.path}: {e.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{f.path} is not an unencrypted PEM private key") from None
    return f


@dataclass(frozen=True)
class MqttConfig:
    """The head-office uplink (`appliance/uplink/`): broker, credentials, session, drain pacing.

    Topics are `{topic_prefix}/{store_id}/{terminal_id}/...` (docs/mqtt.md)."""

    enabled: bool = opt(False, doc="false: nothing is sent; the outbox keeps every event for later")
    host: str = opt("localhost", check=_host)
    port: int = opt(1883, check=TCP_PORT, doc="1883 plain, 8883 with tls")
    protocol: Literal["5", "3.1.1"] = opt("5", doc="MQTT version")
    client_id: str = opt("", check=_client_id, doc='"" = lane-{store_id}-{terminal_id}')
    topic_prefix: str = opt("lanes", check=_topic_prefix, doc="first levels of every topic; no + # $ or empty level")
    username: str = opt("")
    password_file: SecretFile | None = opt(None, check=_one_line_secret, doc="the broker password, one line")
    tls: bool = opt(False, doc="TLS to the broker, server certificate checked")
    ca_file: Path | None = opt(None, check=_pem_certificates, doc="PEM CA bundle for the broker (default: the system's)")
    cert_file: Path | None = opt(None, check=_pem_certificates, doc="client certificate (PEM), with key_file")
    key_file: SecretFile | None = opt(None, check=pem_private_key_file, doc="the client certificate's private key")
    keepalive_s: int = opt(30, check=between(1, 65_535, SECONDS), doc="MQTT keepalive (a 16-bit field)")
    session_expiry_s: int = opt(7 * 86_400, check=between(0, 365 * 86_400, SECONDS),
                                doc="the broker keeps our session (commands queued for us) this long offline; "
                                    "MQTT 5 only")
    reconnect_min_s: float = opt(1.0, check=between(0.1, 60.0, SECONDS), doc="first reconnect delay (jittered)")
    reconnect_max_s: float = opt(60.0, check=between(1.0, HOUR, SECONDS), doc="longest reconnect delay (jittered)")
    max_inflight: int = opt(100, check=between(1, 10_000, "messages"), doc="events published and not yet acked")
    daily_every_s: float = opt(10.0, check=between(0.1, HOUR, SECONDS),
                               doc="the running daily totals are republished at most this often")
    status_every_s: float = opt(30.0, check=between(0.1, HOUR, SECONDS),
                                doc="status online (backlog, last ack) is republished this often: head "
                                    "office's sign of life")
    prune_after_days: float = opt(30.0, check=between(0.0, 3650.0, "days"),
                                  doc="sent events are deleted from the journal after this long")

    def __post_init__(self):
        if self.reconnect_min_s > self.reconnect_max_s:
            raise FieldError("reconnect_min_s", f"must not exceed mqtt.reconnect_max_s "
                                                f"({self.reconnect_max_s:g} s), got {self.reconnect_min_s:g} s")
        if self.password_file is not None and not self.username and self.protocol == "3.1.1":
            raise FieldError("username", "is required with mqtt.password_file under MQTT 3.1.1")
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None and not self.tls:
                raise FieldError(name, "is set but mqtt.tls is false (set tls = true, or remove the key)")
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise FieldError(missing, "is required with mqtt." + ("cert_file" if missing == "key_file" else "key_file")
                             + " (a client certificate and its private key go together)")
        if self.cert_file is not None and secrets_checked():
            _check_key_pair(self.cert_file, self.key_file)


def _check_key_pair(cert: Path, key: SecretFile) -> None:
    """The client certificate and its key belong together (what the TLS handshake would find later)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key.path))
    except ssl.SSLError as e:
        raise FieldError("key_file", f"{key.path} is not the private key of {cert} ({e.reason or e})") from None
    except OSError as e:
        raise FieldError("key_file", f"{key.path}: {e.strerror}") from None


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = opt("INFO")


@dataclass(frozen=True)
class Config:
    terminal: TerminalConfig
    till: TillConfig = opt(TillConfig())
    classify: ClassifyConfig = opt(ClassifyConfig())
    scanner: ScannerConfig = opt(ScannerConfig())
    indicator: IndicatorConfig = opt(IndicatorConfig())
    providers: dict[str, ProviderConfig] = opt({})
    routing: dict[str, str] = opt({}, doc="payment type -> provider name")
    offline: OfflineConfig = opt(OfflineConfig())
    mqtt: MqttConfig = opt(MqttConfig())
    logging: LoggingConfig = opt(LoggingConfig())


# --- loading ---------------------------------------------------------------------------------


def config_path(cli_path: str | None) -> Path:
    """The file to read: --config, else $APPLIANCE_CONFIG, else /etc/appliance/appliance.toml."""
    return Path(cli_path or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load(path: Path, *, check_secrets: bool = True) -> Config:
    """Read and validate a config file. Raises ConfigError naming the dotted key, or the file.

    Whatever the file holds (not UTF-8, not TOML, nested too deeply, absurd numbers), the
    answer is a ConfigError, never another exception. `check_secrets=False` (a command that
    never uses a secret) leaves the secret files unopened: see schema.secrets_unchecked.
    """
    if not check_secrets:
        with secrets_unchecked():
            return from_dict(read_toml(path), base_dir=path.parent)
    return from_dict(read_toml(path), base_dir=path.parent)


def read_toml(path: Path) -> dict:
    """The TOML document in the file at `path`, parsed, not validated (any config file: the lane's,
    head office's). Raises ConfigError naming the file for anything that is not a readable TOML
    file of at most MAX_CONFIG_BYTES."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError("", f"config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"config file {path} is not UTF-8 text "
                              f"(byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"config file {path} is not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:  # tomllib: integers past 4300 digits, deep nesting
        raise ConfigError("", f"config file {path} is not usable TOML: {type(e).__name__}: {str(e)[:120]}") from None
    return raw


def from_dict(raw: dict, base_dir: Path | None = None) -> Config:
    """Validate an already parsed TOML document. Relative paths resolve against base_dir."""
    cfg = build(Config, raw, "", base_dir or Path.cwd())
    for port in ("scanner", "indicator"):  # a plug-in that cannot be loaded is named now, by check-config
        _registry(port).get(getattr(cfg, port).kind, f"{port}.kind")
    _check_routing(cfg)
    s = cfg.scanner
    if s.kind == "evdev" and not (s.device or s.match_name or s.match_vid_pid):
        raise ConfigError("scanner.device", "an evdev scanner needs a device path (e.g. /dev/scanner) "
                                            "or scanner.match_name / scanner.match_vid_pid to find it")
    return cfg


def _provider(raw: Any, key: str, base: Path) -> ProviderConfig:
    from appliance.payments import providers  # the port's table: each adapter declares its own options

    if not isinstance(raw, dict):
        raise ConfigError(key, f"must be a table, got {tname(raw)}")
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(join(key, "kind"), f"is required (one of {', '.join(map(repr, providers.known()))})")
    if not isinstance(kind, str):
        raise ConfigError(join(key, "kind"), f"must be one of {', '.join(map(repr, providers.known()))}, "
                                             f"got {tname(kind)}")
    adapter = providers.get(kind, join(key, "kind"))
    rest = {k: v for k, v in raw.items() if k != "kind"}
    return ProviderConfig(kind=kind, options=build(adapter.options or NoOptions, rest, key, base))


def _check_routing(cfg: Config) -> None:
    from appliance.classify import load_rules

    try:
        known = {r.payment_type for r in load_rules(cfg.classify.rules_file)}
    except ValueError as e:
        raise ConfigError("classify.rules_file", str(e)) from None
    for ptype, provider in cfg.routing.items():
        key = join("routing", ptype)
        if not isinstance(provider, str):
            raise ConfigError(key, f"must be a provider name, got {tname(provider)}")
        if ptype not in known:
            raise ConfigError(key, f"no payment type {ptype!r} in the rules (known: {', '.join(sorted(known))})")
        if provider not in cfg.providers:
            raise ConfigError(key, f"names provider {provider!r}, which is not configured under [providers]")


# --- checks of the machine, for check-config ------------------------------------------------


def check_state_dir(cfg: Config) -> None:
    """Prove that this user can write `terminal.state_dir`, by trying. Raises ConfigError naming it.

    For `check-config`, which systemd runs as the service user before the service (ExecStartPre);
    never called by load(), because read-only commands (`appliance journal`) must keep working
    on a read-only filesystem. Accepted:

    * an existing directory in which this user can create and remove a file, and whose regular
      files this user can open for writing (nothing is written to them);
    * a missing directory whose nearest existing parent lets this user create a directory
      (the journal creates the state dir on first use).

    A file where the directory should be, a read-only mount, or missing permissions are refused.
    The probes are real (a temporary file or directory, removed at once), not os.access, so they
    also catch read-only mounts and hold for root. Nothing is left behind.
    """
    key, path = "terminal.state_dir", cfg.terminal.state_dir
    user = _user()
    nearest = path
    while True:
        try:
            nearest.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            nearest = nearest.parent
        except OSError as e:
            raise ConfigError(key, f"{nearest}: {e.strerror} (as user {user})") from None
    if not nearest.is_dir():
        cause = "" if nearest == path else f" cannot be created: {nearest}"
        raise ConfigError(key, f"{path}{cause} is not a directory")
    import tempfile  # here: with shutil, random, bz2 and lzma, ~0.7 MB resident the lane needs only for this

    if nearest != path:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".check-config-", dir=nearest))
        except OSError as e:
            raise ConfigError(key, f"{path} does not exist and cannot be created: {nearest} is not writable "
                                   f"by user {user} ({e.strerror})") from None
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".check-config-", dir=path)
        os.close(fd)
        os.unlink(probe)
        files = [e.path for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
    except OSError as e:
        raise ConfigError(key, f"{path} is not writable by user {user} ({e.strerror})") from None
    for name in files:
        try:
            os.close(os.open(name, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError as e:
            raise ConfigError(key, f"{name} is not writable by user {user} ({e.strerror})") from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# --- presenting ------------------------------------------------------------------------------


def to_toml(cfg: Config) -> str:
    """The effective config as TOML, secrets shown only as the file they live in."""
    lines: list[str] = []

    def emit_table(name: str, obj) -> None:
        lines.append(f"[{name}]")
        items = {k: (v, "") for k, v in obj.items()} if isinstance(obj, dict) else {}
        schema = obj.options if isinstance(obj, ProviderConfig) else obj
        if isinstance(obj, ProviderConfig):
            items["kind"] = (obj.kind, "")
        if dataclasses.is_dataclass(schema):
            items.update({f.name: (getattr(schema, f.name), _doc_line(f)) for f in dataclasses.fields(schema)})
        for k, (v, doc) in items.items():
            line = f"# {k} is not set" if v is None else f"{k} = {_toml_value(v)}"
            lines.append(f"{line}  # {doc}" if doc and "#" not in line else line)
        lines.append("")

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "providers":
            for pname, pcfg in value.items():
                emit_table(f"providers.{pname}", pcfg)
        elif f.name == "routing":
            emit_table("routing", value)
        else:
            emit_table(f.name, value)
    return "\n".join(lines)


def _doc_line(f: dataclasses.Field) -> str:
    """A field's doc line for check-config, with its range when it has one."""
    doc, check = f.metadata.get("doc", ""), f.metadata.get("check")
    if isinstance(check, Range):
        doc = f"{doc} ({check.describe()})" if doc else check.describe()
    return doc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Amount):
        return f'"{format_amount(v)}"'
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, SecretFile):
        if v.ref:
            return f'"{v.ref}"  # secret, read from {v.path}, content not shown'
        return f'"{v.path}"  # secret, content not shown'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
