"""The OS integration kept in the repo: the systemd unit is valid and sandboxed, the CLI it calls
exists, the sysusers.d and tmpfiles.d files beside it make what it needs."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "appliance.service"
#: Head office's ingest unit: not on the lane, kept to the same sandbox standard.
HQ_UNIT = SYSTEMD / "appliance-hq-ingest.service"
RECONCILE_UNIT = SYSTEMD / "appliance-hq-reconcile.service"
RECONCILE_TIMER = SYSTEMD / "appliance-hq-reconcile.timer"
UNITS = pytest.mark.parametrize("unit", [UNIT, HQ_UNIT, RECONCILE_UNIT], ids=lambda p: p.name)
#: The most exposure `systemd-analyze security` may give the unit (issue 9), in its tenths.
MAX_EXPOSURE_TENTHS = 15

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def unit_with_stub(tmp_path: Path, unit: Path = UNIT) -> Path:
    """The unit, its /usr/bin/appliance replaced by an executable stub (verify wants one)."""
    stub = tmp_path / "appliance"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/bin/appliance", str(stub)))
    return copy


def settings() -> dict[str, list[str]]:
    """The unit's [Service] settings: name -> every value given, in order."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            found.setdefault(name, []).append(value)
    return found


@needs_systemd_analyze
@UNITS
def test_unit_passes_systemd_analyze_verify(tmp_path, unit):
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_with_stub(tmp_path, unit))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


@needs_systemd_analyze
@UNITS
def test_unit_exposure_is_at_most_1_5(tmp_path, unit):
    """systemd's own verdict, by its own comparison (--threshold, in tenths; systemd >= 250)."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--threshold={MAX_EXPOSURE_TENTHS}",
                        "--no-pager", str(unit_with_stub(tmp_path, unit))], capture_output=True, text=True, timeout=60)
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert overall, r.stdout + r.stderr
    assert r.returncode == 0 and float(overall.group(1)) <= MAX_EXPOSURE_TENTHS / 10, (
        "\n".join(line for line in r.stdout.splitlines() if "✗" in line or "Overall" in line))


def test_unit_sandbox_leaves_open_only_what_the_lane_uses():
    """The settings issue 9 asks for, and the ones that would cut the lane off, which must stay out
    (the unit's comments say why)."""
    s = settings()
    assert s["DevicePolicy"] == ["closed"]
    assert sorted(s["DeviceAllow"]) == ["char-gpiochip rw", "char-input rw", "char-ttyACM rw", "char-ttyUSB rw"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["SystemCallFilter"][0] == "@system-service"
    assert s["CapabilityBoundingSet"] == [""] and s["UMask"] == ["0077"] and s["ProtectSystem"] == ["strict"]
    assert s["LoadCredential"] == ["secrets:/etc/appliance/secrets"]
    assert s["RuntimeDirectory"] == ["appliance"] and s["RuntimeDirectoryMode"] == ["0750"]
    # the broker on the LAN, the platforms on the internet; the Pi's scanner and GPIO; the groups
    for cut_off in ("IPAddressDeny", "PrivateNetwork", "PrivateDevices", "ProcSubset"):
        assert cut_off not in s, cut_off
    assert (s["Type"], s["WatchdogSec"], s["Restart"], s["RestartPreventExitStatus"]) == (
        ["notify"], ["30"], ["always"], ["6"])


def test_serial_drivers_load_at_boot_for_the_units_device_allow_list():
    """DeviceAllow=char-NAME resolves NAME in /proc/devices when the service starts: the drivers
    that register ttyACM and ttyUSB must be loaded at boot, not when a scanner is plugged in."""
    modules = [line for line in (SYSTEMD / "appliance.modules-load").read_text().splitlines()
               if line and not line.startswith("#")]
    assert "char-ttyACM rw" in settings()["DeviceAllow"] and "cdc_acm" in modules
    assert "char-ttyUSB rw" in settings()["DeviceAllow"] and "usbserial" in modules


def test_sysusers_makes_the_user_in_the_units_groups(tmp_path):
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    r = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "appliance.sysusers")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["appliance"]
    assert user[5:] == ["/var/lib/appliance", "/usr/sbin/nologin"] and int(user[2]) < 1000
    assert groups["appliance"][2] == user[3]  # its own primary group
    supplementary = settings()["SupplementaryGroups"][0].split()
    assert sorted(g for g, entry in groups.items() if "appliance" in entry[3].split(",")) == sorted(supplementary)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-tmpfiles --create chowns: needs root")
def test_tmpfiles_makes_the_state_and_secrets_dirs(tmp_path):
    (tmp_path / "etc").mkdir()
    for tool, conf in (("systemd-sysusers", "appliance.sysusers"), ("systemd-tmpfiles", "appliance.tmpfiles")):
        args = [tool, f"--root={tmp_path}"] + (["--create"] if tool == "systemd-tmpfiles" else [])
        r = subprocess.run(args + [str(SYSTEMD / conf)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    uid, gid = next(map(int, line.split(":")[2:4]) for line in (tmp_path / "etc/passwd").read_text().splitlines()
                    if line.startswith("appliance:"))
    state, secrets = (tmp_path / "var/lib/appliance").stat(), (tmp_path / "etc/appliance/secrets").stat()
    assert (state.st_mode & 0o7777, state.st_uid, state.st_gid) == (0o750, uid, gid)
    # root's: the service gets the secrets as credentials; group appliance may pass (old 0640 paths)
    assert (secrets.st_mode & 0o7777, secrets.st_uid, secrets.st_gid) == (0o750, 0, gid)


def test_unit_runs_commands_the_cli_has(capsys):
    from appliance.cli import build_parser

    used = re.findall(r"^Exec\w+=/usr/bin/appliance (\S+)", UNIT.read_text(), re.M)
    assert used == ["check-config", "run"]
    for command in used:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, "--help"])
        assert e.value.code == 0


def test_hq_unit_runs_ingest_with_its_config_and_a_credential_for_the_password(tmp_path, monkeypatch):
    """The ingest unit's command line parses, and a config naming its password as a credential of
    the unit's LoadCredential=secrets:... directory loads inside the service."""
    from appliance.cli import build_parser
    from appliance.hq.config import load

    (argv,) = re.findall(r"^ExecStart=/usr/bin/appliance (.+)$", HQ_UNIT.read_text(), re.M)
    args = build_parser().parse_args(argv.split())
    assert (args.command, args.hq_command, str(args.config)) == ("hq", "ingest", "/etc/appliance-hq/hq.toml")
    (source,) = re.findall(r"^LoadCredential=secrets:(\S+)$", HQ_UNIT.read_text(), re.M)
    assert source == "/etc/appliance-hq/secrets"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secrets_mqtt-password").write_text("s3cret\n")
    (creds / "secrets_mqtt-password").chmod(0o600)
    conf = tmp_path / "hq.toml"
    conf.write_text('[hq]\nusername = "hq"\npassword_file = "credential:mqtt-password"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load(conf).hq.password_file.read() == "s3cret"


def test_reconcile_unit_runs_the_due_reconciliations_and_shares_the_ingest_units_user():
    from appliance.cli import build_parser
    from appliance.hq.reconcile import EXIT_LATER

    text = RECONCILE_UNIT.read_text()
    (argv,) = re.findall(r"^ExecStart=/usr/bin/appliance (.+)$", text, re.M)
    args = build_parser().parse_args(argv.split())
    assert (args.hq_command, args.due, str(args.config)) == ("reconcile", True, "/etc/appliance-hq/hq.toml")
    assert re.findall(r"^SuccessExitStatus=(\d+)$", text, re.M) == [str(EXIT_LATER)]
    for setting in ("User=appliance-hq", "StateDirectory=appliance-hq", "LoadCredential=secrets:/etc/appliance-hq/secrets"):
        assert re.search(rf"^{setting}$", text, re.M) and re.search(rf"^{setting}$", HQ_UNIT.read_text(), re.M)


@needs_systemd_analyze
def test_reconcile_timer_fires_every_half_hour_from_ten_beijing(tmp_path):
    unit_with_stub(tmp_path, RECONCILE_UNIT)
    timer = tmp_path / RECONCILE_TIMER.name
    timer.write_text(RECONCILE_TIMER.read_text())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(timer)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    (spec,) = re.findall(r"^OnCalendar=(.+)$", timer.read_text(), re.M)
    r = subprocess.run(["systemd-analyze", "calendar", "--iterations=30", "--base-time=2026-11-29 00:00 UTC", spec],
                       capture_output=True, text=True, timeout=60, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    times = re.findall(r"(?:Next elapse|Iter\. #\d+): \w{3} (\S+ \S+) UTC", r.stdout)
    assert r.returncode == 0 and len(times) == 30, r.stdout + r.stderr
    # 10:00, 10:30 ... 23:30 Beijing = 02:00 ... 15:30 UTC: 28 a day, then the next day's 10:00
    assert times[:2] == ["2026-11-29 02:00:00", "2026-11-29 02:30:00"]
    assert times[27:] == ["2026-11-29 15:30:00", "2026-11-30 02:00:00", "2026-11-30 02:30:00"]


def test_unit_stops_within_the_service_grace():
    from appliance.service import STOP_GRACE_S, UPLINK_CLOSE_S

    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)", UNIT.read_text(), re.M).group(1))
    # the service gives up on a hung call (till), the resolver (1 s) and the broker (uplink) well
    # before systemd kills it
    assert STOP_GRACE_S + 1 + UPLINK_CLOSE_S + 2 < stop_s
