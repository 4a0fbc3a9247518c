"""docs/operations.md, the technician's manual, stays true: every `appliance` command and option it
names exists, its table of the unit's lines is the unit's (systemd/appliance.service), the
troubleshooting table covers the commands a technician diagnoses with, and every repository
path it names exists."""

import re

import pytest
from conftest import ROOT

from appliance.cli import build_parser

DOC = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
UNIT = (ROOT / "systemd" / "appliance.service").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end != -1 else len(DOC)]


def code() -> list[str]:
    """The text of every fenced block and inline code span, one string per line."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", DOC, re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", DOC, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [line for block in fenced for line in block.splitlines()] + spans


def invocations() -> list[tuple[str, list[str], str]]:
    """(subcommand words, options, the text) of each `appliance ...` the doc shows."""
    found = []
    for line in code():
        line = re.split(r"\s#\s", line)[0]  # a shell comment
        for part in re.split(r";|&&|\\?\|", line):
            for m in re.finditer(r"(?<![-\w/.])appliance (?=([a-z][a-z-]*))", part):
                if m.group(1) == "appliance":  # sudo -u appliance appliance ...
                    continue
                rest = part[m.end():]
                words = rest.split()
                found.append(([w for w in words[:2] if not w.startswith("-")][:2],
                              re.findall(r"(?<!\w)--[a-z][a-z-]*", rest), part.strip()))
    return found


def _choices(parser):
    return parser._subparsers._group_actions[0].choices


def test_ok__every_command_and_option_shown_exists():
    shown = invocations()
    assert len(shown) > 30  # the doc is full of them: a broken extraction must not pass silently
    commands = _choices(build_parser())
    for words, options, text in shown:
        assert words and words[0] in commands, f"no such command: {text!r}"
        parser = commands[words[0]]
        if words[0] == "hq":
            parser = _choices(parser)[words[1]]
        for option in options:
            assert option in parser._option_string_actions, f"{option} is not an option of {text!r}"


def test_ok__the_troubleshooting_table_covers_the_technicians_commands():
    table = section("Troubleshooting")
    for command in ("appliance status", "appliance journal", "appliance scan-test", "appliance test-feedback",
                    "appliance check-config", "journalctl -u appliance"):
        assert command in table, command
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Symptom")]
    assert len(rows) >= 15 and all(line.count(" | ") >= 2 for line in rows)


def _directives(text: str) -> set[str]:
    return set(re.findall(r"^([A-Z][A-Za-z]+)=", text, re.M))


def test_ok__the_unit_table_explains_exactly_the_units_lines():
    service = UNIT[UNIT.index("[Service]"):UNIT.index("[Install]")]
    in_unit = _directives(service)
    table = [line for line in section("The unit and its sandbox").splitlines() if line.startswith("| `")]
    explained = {name for line in table for name in re.findall(r"`([A-Z][A-Za-z]+)=", line.split(" | ")[0])}
    assert in_unit - explained == set(), "lines of the unit the manual does not explain"
    assert explained - in_unit == set(), "lines the manual explains that the unit does not have"


@pytest.mark.parametrize("path", sorted(set(re.findall(
    r"(?<![\w/.~-])((?:systemd|image|appliance|docs|examples|tests|bench)/[\w./-]*[\w/])", DOC))))
def test_ok__every_repository_path_named_exists(path):
    assert (ROOT / path).exists(), path
