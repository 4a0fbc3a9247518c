"""The config schema machinery: `opt()`, the checks, the value types and the dotted-key errors.

A config section, or an adapter's options, is a frozen dataclass whose fields are `opt(...)`s:
a default (omit it and the key is required), a `check(value) -> value` that raises ValueError,
and a doc line for `check-config`. `build(cls, raw, key, base_dir)` validates a parsed TOML table
against it; every error is a ConfigError naming the dotted key (`scanner.baudrate: must be ...`),
and unknown keys are errors, so a typo never silently falls back to a default.

This module imports no adapter and no section, so adapters declare their options here without
an import circle (`from appliance.schema import opt, between`); the sections and the loader are
in config.py. A type may build itself from its table: a class with a `__schema_build__(raw,
key, base)` classmethod (config.ProviderConfig does, to ask the port's registry for its options).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ConfigError
from appliance.money import MAX_FEN, format_amount, parse_amount


@dataclass(frozen=True)
class SecretFile:
    """A secret kept in a file. Its text never enters the config.

    The config names it by path (`"/etc/appliance/secrets/mqtt-password"`, mode 0600, or 0640
    root:appliance) or as a systemd credential, `"credential:NAME"`: inside the service that is
    `$CREDENTIALS_DIRECTORY/NAME` (or `.../secrets_NAME`, the name systemd gives each file of the
    unit's `LoadCredential=secrets:/etc/appliance/secrets`), so the secret files stay root's and
    the service user never reads them; outside a service (`$CREDENTIALS_DIRECTORY` unset: a
    technician's `check-config` as root) it is `SECRETS_DIR/NAME`. `path` is where it was found.
    """

    path: Path
    key: str = ""  # the dotted config key that named it, for error messages
    ref: str = ""  # what the config wrote when it was not the path: "credential:NAME"

    def read(self) -> str:
        """The secret with surrounding whitespace stripped. Raises ConfigError if unreadable."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(self.key, f"secret file {self.path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(self.key, f"secret file {self.path} is not UTF-8 text") from None

    def __str__(self) -> str:
        return f"<secret in {self.path}>"


#: `credential:NAME` in a `*_file` secret key: NAME is a systemd credential (see SecretFile).
CREDENTIAL_PREFIX = "credential:"
#: Where `credential:NAME` is read outside a service: the directory the unit loads as credentials.
SECRETS_DIR = Path("/etc/appliance/secrets")
#: Overrides SECRETS_DIR (tests; a lane whose secrets live elsewhere).
SECRETS_DIR_ENV = "APPLIANCE_SECRETS_DIR"
#: The credential ID of the unit's `LoadCredential=secrets:/etc/appliance/secrets`: systemd names
#: the credential of each file in it `secrets_<file name>`.
SECRETS_CREDENTIAL = "secrets"
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}")
#: False while a config is built for a command that never reads a secret (`appliance status`).
_check_secrets: ContextVar[bool] = ContextVar("check_secrets", default=True)


def secrets_checked() -> bool:
    """Whether secret files are being checked (opened, their format and their pairs verified).
    A schema's cross-field rule that opens a secret asks this first."""
    return _check_secrets.get()


@contextmanager
def secrets_unchecked():
    """Build configs without opening their secrets: each `*_file` secret is resolved to its path
    (a credential name still validated) but neither opened nor checked. For commands that never
    use a secret, so that a technician in group appliance can run them though the secret files
    are root's 0600."""
    token = _check_secrets.set(False)
    try:
        yield
    finally:
        _check_secrets.reset(token)


class Amount(int):
    """Money in fen, written in the config as a string with two decimals ("50000.00")."""


def opt(default: Any = dataclasses.MISSING, *, check=None, doc: str = "") -> Any:
    """A schema field: its default (omit = required), an optional check(value) -> value, a doc line.

    A mutable default (a dict, a list, a dataclass instance) is copied for every instance, so two
    configs never share one: `a.routing is not b.routing`.
    """
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict, tuple)) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoOptions:
    """The options of an adapter that takes none."""


@dataclass(frozen=True)
class Range:
    """A check that a number lies in [lo, hi], both ends included; `unit` is named in the error.

    NaN is outside every range. Every numeric option in the schema has one (a test walks the
    schema to hold us to it), so no infinite, absurd or negative value reaches a timer, a sleep,
    a socket or a query.
    """

    lo: int | float
    hi: int | float
    unit: str = ""

    def __call__(self, v):
        if not self.lo <= v <= self.hi:
            raise ValueError(f"must be between {self.describe(' and ')}, got {number(v)}")
        return v

    def describe(self, sep: str = " to ") -> str:
        """The range as the technician writes it: '0.1 to 3600 seconds', '"0.01" to "50000.00" yuan'."""
        unit = f" {self.unit}" if self.unit else ""
        return f"{number(self.lo)}{sep}{number(self.hi)}{unit}"


def between(lo, hi, unit: str = "") -> Range:
    """The range check for a schema field: `opt(60.0, check=between(0.1, 3600, "seconds"))`."""
    return Range(lo, hi, unit)


def number(v) -> str:
    """A number as the technician writes it in the file: 3600, 0.1, inf, "50000.00" (an amount)."""
    if isinstance(v, Amount):
        return f'"{format_amount(v)}"'
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


#: Shared bounds and units of the schema's numbers.
HOUR, DAY = 3600.0, 86_400.0
SECONDS, YUAN = "seconds", "yuan"
GPIO_PIN = between(0, 53, "(a BCM GPIO number)")
TCP_PORT = between(1, 65_535, "(a TCP port)")
#: The largest amount any platform takes in one trade; for options that only need a sane ceiling.
ANY_AMOUNT = between(Amount(1), Amount(MAX_FEN), YUAN)
#: The resolution policy's ranges, one per field, for every adapter that declares its own defaults.
FIRST_QUERY_AFTER = between(0.0, HOUR, SECONDS)
QUERY_EVERY = between(0.01, HOUR, SECONDS)
REVERSE_AFTER = between(0.0, DAY, SECONDS)
RETRY_EVERY = between(0.01, HOUR, SECONDS)


# --- building --------------------------------------------------------------------------------


def build(cls, raw: Any, path: str, base: Path):
    """An instance of the schema dataclass `cls` from the TOML table `raw` found at dotted key `path`.
    Relative paths resolve against `base`. Raises ConfigError naming the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a table, got {tname(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(join(path, key), f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        key = join(path, f.name)
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        value = _convert(hints[f.name], raw[f.name], key, base)
        check = f.metadata.get("check")
        if check is not None and (secrets_checked() or not isinstance(value, SecretFile)):
            try:
                value = check(value)
            except ValueError as e:
                raise ConfigError(key, str(e)) from None
        values[f.name] = value
    try:
        return cls(**values)
    except FieldError as e:  # a rule across fields, checked by the dataclass's __post_init__
        raise ConfigError(join(path, e.field), e.reason) from None


class FieldError(ValueError):
    """Raised by a schema dataclass's `__post_init__` when a rule across its fields fails; names the
    field to blame so that the ConfigError names its dotted key."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


def _convert(tp, value: Any, key: str, base: Path):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0], value, key, base)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if origin is tuple:  # tuple[str, ...]: a TOML array of one type, kept immutable
        (itype, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be an array, got {tname(value)}")
        return tuple(_convert(itype, v, f"{key}[{i}]", base) for i, v in enumerate(value))
    if origin is dict:
        _, vtype = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {tname(value)}")
        return {k: _convert(vtype, v, join(key, k), base) for k, v in value.items()}
    own_build = getattr(tp, "__schema_build__", None)
    if own_build is not None:
        return own_build(value, key, base)
    if dataclasses.is_dataclass(tp) and tp is not SecretFile:
        return build(tp, value, key, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {tname(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {tname(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {tname(value)}")
        if isinstance(value, int) and abs(value) > 2**53:  # float() would round it or overflow
            raise ConfigError(key, f"must be a number of sensible size, got {number(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is Amount:
        if not isinstance(value, str):
            raise ConfigError(key, f'must be an amount string like "12.34", got {tname(value)}')
        try:
            return Amount(parse_amount(value))
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {tname(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a non-empty path string, got {tname(value)}")
        if "\0" in value:
            raise ConfigError(key, "must not contain a NUL character")
        try:
            return base / Path(value).expanduser()
        except RuntimeError:  # ~name of a user this machine does not know
            raise ConfigError(key, f"{value}: cannot expand ~ (no such user or no home directory)") from None
    if tp is SecretFile:
        return _secret_file(value, key, base)
    raise TypeError(f"schema type {tp!r} at {key} is not supported")  # a bug in the schema


def _secret_file(value: Any, key: str, base: Path) -> SecretFile:
    """A `*_file` secret: a path, or `credential:NAME` found where SecretFile says. The file must be
    a readable regular file granting nothing to others; errors name the key and the place tried."""
    ref = ""
    if isinstance(value, str) and value.startswith(CREDENTIAL_PREFIX):
        ref = value
        p, what = _credential(value[len(CREDENTIAL_PREFIX):], key)
    else:
        p = _convert(Path, value, key, base)
        what = f"secret file {p}"
    if not secrets_checked():
        return SecretFile(p, key, ref)
    try:
        if p.is_dir():
            raise ConfigError(key, f"{what} is a directory, not a file")
        if not p.is_file():
            raise ConfigError(key, f"{what} does not exist" if not p.exists() else f"{what} is not a regular file")
    except OSError as e:  # a name too long for the system, a loop of links ...
        raise ConfigError(key, f"{what[:300]}: {e.strerror}") from None
    if not os.access(p, os.R_OK):
        hint = " (the secrets are root's: run as root, or let systemd pass them as credentials)" if ref else ""
        raise ConfigError(key, f"{what} is not readable by this user{hint}")
    mode = p.stat().st_mode
    if mode & stat.S_IRWXO:  # group read stays allowed: root:appliance 0640 is the usual way
        raise ConfigError(key, f"{what} is open to others (mode {stat.S_IMODE(mode):04o}); "
                               f"chmod o-rwx (0600, or 0640 with the service's group)")
    return SecretFile(p, key, ref)


def _credential(name: str, key: str) -> tuple[Path, str]:
    """Where `credential:NAME` is: (the path, how to name it in an error)."""
    if not _CREDENTIAL_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(key, f"credential name {name[:80]!r} must be 1-200 of A-Z a-z 0-9 _ . @ - starting "
                               f"with a letter or digit, without '..' (a file name in {SECRETS_DIR})")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        tried = [Path(creds) / name, Path(creds) / f"{SECRETS_CREDENTIAL}_{name}"]
        found = next((p for p in tried if os.path.lexists(p)), None)
        if found is None:
            raise ConfigError(key, f"credential {name}: the service has no such credential (neither {tried[0]} nor "
                                   f"{tried[1]}); put the file {name} in {SECRETS_DIR} and restart the service")
        return found, f"credential {name} ({found})"
    secrets_dir = Path(os.environ.get(SECRETS_DIR_ENV) or SECRETS_DIR)
    path = secrets_dir / name
    return path, f"credential {name} ({path}: outside a service, $CREDENTIALS_DIRECTORY is not set)"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join(path: str, key: str) -> str:
    """The dotted name of `key` under `path` as TOML writes it: a key that is not bare (empty,
    spaces, dots, other characters) is quoted, escaped like a Python string, so an error names it."""
    if not _BARE_KEY.fullmatch(key):
        key = '"' + key.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return f"{path}.{key}" if path else key


def tname(v: Any) -> str:
    """What the technician wrote, in words: 'a table', 'a string', ..."""
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)
