"""Fuzzing the config loader: whatever the file holds, the answer is a config or a ConfigError.

Three kinds of input:
  * random TOML documents (random keys, values of every TOML type, nesting), written as TOML
    and loaded from a file, and given to `from_dict` directly;
  * a valid lane config with hostile values put at its real keys, and unknown keys added (this
    is where the loader's type and range checks are exercised);
  * random bytes, and a valid config file with random bytes flipped, inserted or cut.

Required: the only exception is ConfigError; its message is not empty and it names a key of the
document (or a section the schema requires), or the file itself.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance.config import Config, from_dict, load, to_toml
from appliance.errors import ConfigError
from conftest import lane_dict

EXAMPLES = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.function_scoped_fixture])
SECTIONS = {f for f in Config.__dataclass_fields__}


# --- a TOML writer for any document tomllib could have parsed ----------------------------------


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_document(doc: dict) -> str:
    """Top-level keys as `"key" = value` lines, tables inline: the same dict for tomllib."""
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


# --- strategies ------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=40)  # TOML strings: any Unicode scalar value
# A few values that have broken loaders before: huge, tiny, non-finite, paths that cannot exist.
NASTY = [
    "", " ", "0", "-1", "nan", "inf", "0x10", "1e999", "12.345", "99999999999.99", "/", ".", "..", "~", "~root",
    "~nosuchuser/x", "/nonexistent/dir/file", "a" * 5000, "/" + "a" * 300, "\u202e", "ORD:(?P<order>(a+)+):x",
    "(?P<order>a)(?P<amount>b)", "(?P<order>", "\\", "[", "0x0D", "ENTER", "evdev", "gpio", "sandbox", "CMD:CANCEL",
]
nasty = st.sampled_from(NASTY)
scalar = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    nasty,
    st.datetimes(timezones=st.just(timezone.utc)),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(text, inner, max_size=4)), max_leaves=12)
documents = st.dictionaries(st.one_of(st.sampled_from(sorted(SECTIONS)), text), values, max_size=6)


def _valid(state_dir: Path) -> dict:
    """Every key of the schema, as `check-config` prints them, with a real secret file."""
    secret = state_dir.parent / "mqtt.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    doc = lane_dict(state_dir, scanner={"kind": "serial", "device": "/dev/scanner", "terminator": "CR"},
                    offline={"enabled": True}, mqtt={"enabled": False, "host": "broker"})
    doc = tomllib.loads(to_toml(from_dict(doc)))
    doc["mqtt"]["password_file"] = str(secret)
    return doc


def _paths(doc: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a document, tables included."""
    out = []
    for k, v in doc.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


def like(v) -> st.SearchStrategy:
    """Hostile values of the same TOML type as `v`: where a type check passes, the range and
    content checks must hold."""
    if isinstance(v, bool):
        return st.booleans()
    if isinstance(v, int):
        return st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**63 - 1, -(2**63), 10**100]))
    if isinstance(v, float):
        return st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e-300, 1e300, float("inf"), float("nan")]))
    if isinstance(v, str):
        return st.one_of(text, nasty, st.builds(lambda c, n: c * n, st.text(min_size=1, max_size=3), st.integers(1, 9000)))
    return values


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with up to four changes at its real key paths: a value replaced by a hostile one, a
    key removed, or an unknown key added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):  # mostly one: the first error hides the rest
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        *parents, last = path
        table = doc
        for p in parents:
            table = table[p]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "replace":
            table[last] = draw(st.one_of(like(table[last]), nasty, values))
        elif action == "delete":
            del table[last]
        elif isinstance(table.get(last), dict):
            table[last][draw(text)] = draw(values)
    return doc


# --- the property ----------------------------------------------------------------------------


def assert_clean_refusal(e: ConfigError, doc: dict | None, path: Path | None) -> None:
    """A ConfigError that says what and where: a non-empty message naming a key or the file."""
    assert str(e).strip(), "empty ConfigError message"
    if e.key:
        head = first_key(e.key)
        assert doc is None or head in doc or head in SECTIONS, f"{e.key!r} is not a key of the document"
    else:
        assert path is not None and str(path) in str(e), f"{e!s} names neither a key nor the file"


def first_key(dotted: str) -> str:
    """The first key of a dotted name as ConfigError writes it (`a.b`, `"a b".c`, `"\\xe9"`)."""
    m = re.match(r'"((?:[^"\\]|\\.)*)"', dotted)
    if m:
        return m.group(1).encode("ascii").decode("unicode_escape")
    return dotted.split(".")[0]


def load_doc(doc: dict) -> None:
    """from_dict(doc): a Config, or a ConfigError that says what and where."""
    try:
        from_dict(doc)
    except ConfigError as e:
        assert_clean_refusal(e, doc, None)


def load_file(path: Path, data: bytes, doc: dict | None = None) -> None:
    """load(path) of a file holding `data`: a Config, or a ConfigError that says what and where."""
    path.write_bytes(data)
    try:
        load(path)
    except ConfigError as e:
        assert_clean_refusal(e, doc, path)


def test_the_toml_writer_round_trips():
    @settings(max_examples=100, deadline=None)
    @given(documents)
    def run(doc):
        assume(not any(isinstance(v, float) and math.isnan(v) for v in _leaves(doc)))
        assert tomllib.loads(toml_document(doc)) == doc

    run()


def _leaves(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v


def test_random_documents(tmp_path):
    @EXAMPLES
    @given(documents)
    def run(doc):
        load_doc(doc)
        load_file(tmp_path / "random.toml", toml_document(doc).encode(), doc)

    run()


def test_hostile_values_at_real_keys(tmp_path):
    base = _valid(tmp_path / "state")
    load_doc(base)  # the starting point is valid

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated(base))
    def run(doc):
        load_doc(doc)
        load_file(tmp_path / "mutated.toml", toml_document(doc).encode(), doc)

    run()


EXTREMES = [None, True, 0, -1, 2**63, -(2**63), 10**400, 0.0, -0.0, 1e-320, 1e308, float("inf"), float("-inf"),
            float("nan"), "", [], {}, [1, "a"], {"": {}}, datetime(2024, 1, 1), date(2024, 1, 1), time(12, 0)]


def test_every_key_with_every_nasty_value(tmp_path):
    """Not random: each key of the full config, one at a time, set to each value of `nasty` and
    to each extreme of every TOML type."""
    base = _valid(tmp_path / "state")
    for path in _paths(base):
        for value in EXTREMES + NASTY:
            doc = copy.deepcopy(base)
            table = doc
            for p in path[:-1]:
                table = table[p]
            if value is None:
                del table[path[-1]]
            else:
                table[path[-1]] = value
            load_doc(doc)


def test_random_bytes_as_the_file(tmp_path):
    @EXAMPLES
    @given(st.binary(max_size=2000))
    def run(data):
        load_file(tmp_path / "bytes.toml", data)

    run()


def test_a_valid_file_with_bytes_flipped_inserted_or_cut(tmp_path):
    good = toml_document(_valid(tmp_path / "state")).encode()

    @EXAMPLES
    @given(st.lists(st.tuples(st.integers(0, len(good)), st.sampled_from(["flip", "insert", "cut"]),
                              st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
    def run(edits):
        data = bytearray(good)
        for at, how, b in edits:
            at = at % (len(data) + 1)
            if how == "flip" and at < len(data):
                data[at] ^= b[0]
            elif how == "insert":
                data[at:at] = b
            else:
                del data[at:at + len(b)]
        load_file(tmp_path / "edited.toml", bytes(data))

    run()


@pytest.mark.parametrize("value", ["a" * 5000, "/" + "b/" * 3000])
@pytest.mark.parametrize("key", [("classify", "rules_file"), ("mqtt", "password_file")])
def test_a_path_too_long_for_the_system_is_a_config_error(tmp_path, key, value):
    doc = _valid(tmp_path / "state")
    doc.setdefault(key[0], {})[key[1]] = value
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert e.value.key == ".".join(key)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_a_rules_file_that_is_no_regular_file_is_refused_at_once(tmp_path, special):
    """/dev/zero used to be read for ever, a FIFO blocked the start (and check-config)."""
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "rules.fifo", "dir": tmp_path}[special]
    if special == "fifo":
        os.mkfifo(path)
    doc = _valid(tmp_path / "state")
    doc["classify"]["rules_file"] = str(path)
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert e.value.key == "classify.rules_file"


def test_datetimes_anywhere_are_refused_by_name(tmp_path):
    doc = _valid(tmp_path / "state")
    doc["till"]["order_timeout_s"] = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=8)))
    with pytest.raises(ConfigError, match="till.order_timeout_s"):
        from_dict(doc)
