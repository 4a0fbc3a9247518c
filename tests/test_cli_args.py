"""Numeric command-line options: out of range (nan, inf, negative, absurd) is exit 5 naming the option.

Range checks run in main() after parsing and before any command, so none of these needs a
config, a journal or a device. Values argparse itself refuses (not a number) stay its exit 2.
"""

import argparse
import subprocess

import pytest

from appliance import cli
from conftest import appliance_cmd, subprocess_env

CHARGE = ["charge", "--order", "A1", "--amount", "1.00", "--code", "134567890123456700"]

#: (the rest of a command line, option) for every numeric option of every subcommand.
WHERE = [
    (["journal"], "--limit"),
    (["journal"], "--txn"),
    (CHARGE, "--wait"),
    (["cancel", "--order", "A1"], "--wait"),
    (["test-feedback"], "--pause"),
    (["demo"], "--pause"),
    (["simulate", "jeepay"], "--port"),
    (["simulate", "jeepay"], "--slow-s"),
    (["simulate", "jeepay"], "--reverse-window-s"),
]

OUT_OF_RANGE = {
    "--limit": ["0", "-1", "1000001", str(10**30)],
    "--txn": ["0", "-5", str(2**63), str(10**30)],
    "--wait": ["nan", "inf", "-inf", "1e400", "-1", "3601", "1e30"],
    "--pause": ["nan", "inf", "-1", "1e30"],  # 61: test-feedback only (unchecked, `demo --pause=61` runs long)
    "--port": ["-1", "65536", str(10**30)],
    "--slow-s": ["nan", "inf", "-1", "601"],
    "--reverse-window-s": ["nan", "inf", "-1", "1e30"],
}


def _numeric_options() -> dict[tuple[str, str], type]:
    """(subcommand, dest) -> type of every int or float option the real parser defines."""
    found = {}
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update({(name, a.dest): a.type for a in sub._actions if a.type in (int, float)})
    return found


def test_every_numeric_option_has_a_range_and_the_parser_uses_its_type():
    """A new numeric option cannot escape: it must be in NUMBER_ARGS and in WHERE (tested below)."""
    found = _numeric_options()
    assert {(argv[0], opt[2:].replace("-", "_")) for argv, opt in WHERE} == set(found)
    for (_, dest), tp in found.items():
        assert cli.NUMBER_ARGS[dest].type is tp


@pytest.mark.parametrize("argv,option", WHERE, ids=[f"{a[0]} {o}" for a, o in WHERE])
def test_fail__out_of_range_is_exit_5_naming_the_option(capsys, argv, option):
    for value in OUT_OF_RANGE[option]:
        assert cli.main([*argv, f"{option}={value}"]) == cli.EXIT_REFUSED, value  # = lets "-1" be a value
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"appliance: refused: {option} must be between ") and err.count("\n") == 1, err


@pytest.mark.parametrize("dest,rule", cli.NUMBER_ARGS.items())
def test_ok__both_ends_of_every_range(dest, rule):
    for value in (rule.lo, rule.hi):
        assert cli.out_of_range(argparse.Namespace(**{dest: rule.type(value)})) is None
    assert cli.out_of_range(argparse.Namespace(**{dest: None})) is None  # an option left out


def test_messages_say_range_unit_and_value(capsys):
    cli.main(["journal", "--txn", str(2**63)])
    assert capsys.readouterr().err == ("appliance: refused: --txn must be between 1 and 9223372036854775807, "
                                       "got 9223372036854775808\n")
    cli.main(["demo", "--pause", "1e400"])
    assert capsys.readouterr().err == "appliance: refused: --pause must be between 0 and 60 seconds, got inf\n"
    assert cli.main(["test-feedback", "--pause", "61"]) == cli.EXIT_REFUSED
    assert capsys.readouterr().err == "appliance: refused: --pause must be between 0 and 60 seconds, got 61\n"


@pytest.mark.integration
@pytest.mark.parametrize("argv,message", [
    (["journal", "--limit", str(10**30)], "--limit must be between 1 and 1000000 transactions"),
    (["journal", "--txn", str(10**30)], "--txn must be between 1 and 9223372036854775807"),
    ([*CHARGE, "--wait", "inf"], "--wait must be between 0 and 3600 seconds, got inf"),
    (["demo", "--pause", "nan"], "--pause must be between 0 and 60 seconds, got nan"),
])
def test_cli_out_of_range_exit_5_without_traceback(tmp_path, argv, message):
    r = subprocess.run(appliance_cmd() + argv, capture_output=True, text=True, timeout=60,
                       env=subprocess_env(APPLIANCE_CONFIG=str(tmp_path / "absent.toml")))
    assert (r.returncode, r.stdout) == (5, "")
    assert r.stderr.startswith(f"appliance: refused: {message}") and len(r.stderr.splitlines()) == 1, r.stderr


def test_argparse_still_refuses_what_is_not_a_number(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["journal", "--limit", "1.5"])
    assert e.value.code == 2
    assert "invalid int value: '1.5'" in capsys.readouterr().err
