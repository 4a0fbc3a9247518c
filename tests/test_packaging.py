"""The OS integration kept in the repo: the systemd unit is valid, the CLI it calls exists."""

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

UNIT = ROOT / "systemd" / "appliance.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    stub = tmp_path / "appliance"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/appliance", str(stub)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_unit_runs_commands_the_cli_has(capsys):
    from appliance.cli import build_parser

    used = re.findall(r"^Exec\w+=/usr/bin/appliance (\S+)", UNIT.read_text(), re.M)
    assert used == ["check-config", "run"]
    for command in used:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, "--help"])
        assert e.value.code == 0


def test_unit_stops_within_the_service_grace():
    from appliance.service import STOP_GRACE_S, UPLINK_CLOSE_S

    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)", UNIT.read_text(), re.M).group(1))
    # the service gives up on a hung call (till), the resolver (1 s) and the broker (uplink) well
    # before systemd kills it
    assert STOP_GRACE_S + 1 + UPLINK_CLOSE_S + 2 < stop_s
