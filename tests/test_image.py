"""The image's pieces that need no Debian root: `make image-check` (image/check.sh) checks them again
installed in one, in about half a minute warm, a few minutes cold; this is the subset `make test` runs.

* the package tree image/stage.sh lays out (all but the venv): paths, modes, conffiles, control;
* first boot's provisioning script, run as a real process on a boot directory and a config dir
  under tmp, checked by the real `appliance check-config`;
* the image's default config passes check-config;
* the hash lock covers pyproject.toml's dependencies, without the head-office extra.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT, appliance_cmd, remount_read_only, subprocess_env, tmpfs

IMAGE = ROOT / "image"
FIRSTBOOT = IMAGE / "files" / "appliance-firstboot"
TEMPLATE = IMAGE / "files" / "appliance.toml"
SAMPLE = IMAGE / "files" / "appliance-provision.example.toml"
SECRETS = {"mqtt-password": "Pw-7f3a91c2-broker", "jeepay-app-secret": "Key-5d02e8b4-jeepay"}


# --- the package tree ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("deb")
    subprocess.run([IMAGE / "stage.sh", dest, "1.2.3", "arm64"], check=True, timeout=60)
    return dest


def mode(p: Path) -> str:
    return oct(stat.S_IMODE(p.lstat().st_mode))


def test_package_installs_the_repo_units_as_they_are(staged):
    units = staged / "usr/lib/systemd/system"
    assert (units / "appliance.service").read_bytes() == (ROOT / "systemd/appliance.service").read_bytes()
    assert (staged / "usr/lib/sysusers.d/appliance.conf").read_bytes() == \
        (ROOT / "systemd/appliance.sysusers").read_bytes()
    assert (staged / "usr/lib/tmpfiles.d/appliance.conf").read_bytes() == \
        (ROOT / "systemd/appliance.tmpfiles").read_bytes()
    assert (staged / "usr/lib/modules-load.d/appliance.conf").read_bytes() == \
        (ROOT / "systemd/appliance.modules-load").read_bytes()
    assert (staged / "etc/udev/rules.d/99-appliance-scanner.rules").read_bytes() == \
        (IMAGE / "udev/99-appliance-scanner.rules").read_bytes()
    # the unit's ExecStart and Documentation= resolve inside the package
    assert os.readlink(staged / "usr/bin/appliance") == "/opt/appliance/bin/appliance"
    doc = re.search(r"^Documentation=file://(\S+)", (units / "appliance.service").read_text(), re.M).group(1)
    assert (staged / doc.lstrip("/")).is_file()


def test_package_modes_and_conffiles(staged):
    assert mode(staged / "usr/lib/appliance/appliance-firstboot") == "0o755"
    for maint in ("postinst", "prerm", "postrm"):
        assert mode(staged / "DEBIAN" / maint) == "0o755"
    for f in staged.rglob("*"):
        if not f.is_symlink():
            assert not f.lstat().st_mode & 0o022, f"{f} is group/world-writable"
    # every file under /etc is a conffile (the technician's edits survive an upgrade), nothing else
    etc = sorted("/" + str(p.relative_to(staged)) for p in (staged / "etc").rglob("*") if p.is_file())
    assert (staged / "DEBIAN/conffiles").read_text().split() == etc == ["/etc/udev/rules.d/99-appliance-scanner.rules"]


def test_package_control_ties_the_venv_to_bookworms_python(staged):
    control = dict(re.findall(r"^(\S+): (.*)$", (staged / "DEBIAN/control").read_text(), re.M))
    assert control["Package"] == "appliance" and control["Version"] == "1.2.3" and control["Architecture"] == "arm64"
    depends = [d.strip() for d in control["Depends"].split(",")]
    assert "python3 (<< 3.12)" in depends and "python3 (>= 3.11~)" in depends
    assert not any(d.startswith(("gcc", "python3-dev", "build-essential")) for d in depends)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_package_tree_packs(staged, tmp_path):
    deb = tmp_path / "appliance.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", staged, deb], check=True, capture_output=True,
                   timeout=60)
    listing = subprocess.run(["dpkg-deb", "--contents", deb], check=True, capture_output=True, text=True).stdout
    assert "root/root" in listing and "./usr/lib/appliance/appliance-firstboot" in listing


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_firstboot_unit_passes_systemd_analyze_verify(staged, tmp_path):
    stub = tmp_path / "appliance-firstboot"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "appliance-firstboot.service"
    text = (staged / "usr/lib/systemd/system/appliance-firstboot.service").read_text()
    unit.write_text(text.replace("/usr/lib/appliance/appliance-firstboot", str(stub)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", unit], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    assert "Before=appliance.service" in text
    dropin = (staged / "usr/lib/systemd/system/appliance.service.d/10-provisioned.conf").read_text()
    assert "ConditionPathExists=/etc/appliance/appliance.toml" in dropin


# --- the default config and the lock --------------------------------------------------------------


def test_image_default_config_passes_check_config():
    r = subprocess.run([*appliance_cmd(), "check-config", "--config", TEMPLATE], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(TEMPLATE.read_text())
    assert doc["terminal"]["state_dir"] == "/var/lib/appliance" and doc["scanner"]["device"] == "/dev/scanner"
    assert not doc.get("routing") and not doc.get("providers"), "an unprovisioned lane takes no payment"


def test_lock_pins_every_lane_dependency_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (IMAGE / "requirements.lock").read_text()
    pins = {m["name"].lower().replace("_", "-"): m["version"]
            for m in re.finditer(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)", lock, re.M)}
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is in pyproject.toml but not in image/requirements.lock: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    assert "psycopg2-binary" not in pins, "the head-office extra stays off the Pi"
    # every pin carries at least one hash, so pip --require-hashes accepts the whole file
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock[lock.index("\n", lock.index("make lock")) + 1:])
    assert all("--hash=sha256:" in b for b in blocks if b.strip() and not b.startswith("#")), "a pin without hash"


# --- first boot ----------------------------------------------------------------------------------


def sample_text(**replace) -> str:
    text = SAMPLE.read_text()
    for placeholder, secret in zip(("change-me-broker-password", "change-me-jeepay-app-secret"), SECRETS.values(),
                                   strict=True):
        text = text.replace(placeholder, secret)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def firstboot(boot: Path, etc: Path, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """The provisioning script as the unit runs it, with the dev venv's python and `appliance`."""
    return subprocess.run(
        [sys.executable, FIRSTBOOT, "--provision", boot / "appliance-provision.toml", "--template", TEMPLATE,
         "--config-dir", etc, "--appliance", str(Path(sys.executable).with_name("appliance"))],
        capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


@pytest.fixture
def card(tmp_path):
    boot, etc = tmp_path / "boot", tmp_path / "etc"
    boot.mkdir()
    (boot / "appliance-provision.toml").write_text(sample_text())
    return boot, etc


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (mode(p), p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))} if path.exists() else {}


def test_firstboot_provisions_and_removes_the_secrets_from_the_boot_partition(card):
    boot, etc = card
    r = firstboot(boot, etc)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"<6>appliance-firstboot: provisioned store S0042 lane L03: .*secrets jeepay-app-secret, "
                        r"mqtt-password; .* removed\n", r.stderr), r.stderr
    assert sorted(p.name for p in boot.iterdir()) == ["appliance-provision.done.toml"]
    for secret in SECRETS.values():
        assert secret not in r.stdout + r.stderr
        for f in boot.iterdir():
            assert secret.encode() not in f.read_bytes()
    done = tomllib.loads((boot / "appliance-provision.done.toml").read_text())
    assert "secrets" not in done and done["terminal"]["store_id"] == "S0042"
    assert mode(etc / "secrets") == "0o700" and mode(etc / "appliance.toml") == "0o640"
    for name, secret in SECRETS.items():
        assert (etc / "secrets" / name).read_text() == secret and mode(etc / "secrets" / name) == "0o600"
    assert sorted(p.name for p in etc.rglob("*")) == sorted(["appliance.toml", "secrets", *SECRETS])
    cfg = tomllib.loads((etc / "appliance.toml").read_text())
    assert cfg["terminal"] == {"store_id": "S0042", "terminal_id": "L03", "state_dir": "/var/lib/appliance",
                               "time_zone": "Asia/Shanghai"}  # the template's keys kept, the file's laid over
    assert cfg["scanner"] == {"kind": "evdev", "device": "/dev/scanner"}
    assert cfg["mqtt"]["password_file"] == "credential:mqtt-password" and cfg["routing"]["wechat"] == "jeepay"
    # the written config is whole: check-config reads the secrets where the service's credentials come from
    r = subprocess.run([*appliance_cmd(), "check-config", "--config", etc / "appliance.toml"], capture_output=True,
                       text=True, env=subprocess_env(APPLIANCE_SECRETS_DIR=str(etc / "secrets")), timeout=60)
    assert r.returncode == 0, r.stderr


def test_firstboot_twice_on_the_same_file_gives_the_same_files(card):
    boot, etc = card
    assert firstboot(boot, etc).returncode == 0
    first = tree(etc)
    (boot / "appliance-provision.toml").write_text(sample_text())
    assert firstboot(boot, etc).returncode == 0
    assert tree(etc) == first


def test_firstboot_interrupted_before_the_end_finishes_on_the_next_boot(card):
    """Power lost mid-way leaves .tmp files, a staging dir, the .new config: the next boot redoes
    everything from the boot file, which still has the secrets, and ends the same."""
    boot, etc = card
    (etc / "secrets" / ".provision-stale").mkdir(parents=True)
    (etc / "secrets" / ".provision-stale" / "mqtt-password").write_text("half")
    (etc / "secrets" / "mqtt-password.tmp").write_text("half")
    (etc / "appliance.toml.new").write_text("[terminal]\nstore_")
    (boot / "appliance-provision.done.toml.tmp").write_text("half")
    r = firstboot(boot, etc)
    assert r.returncode == 0, r.stderr
    assert (etc / "secrets" / "mqtt-password").read_text() == SECRETS["mqtt-password"]
    assert tomllib.loads((etc / "appliance.toml").read_text())["terminal"]["store_id"] == "S0042"
    assert sorted(p.name for p in (etc / "secrets").iterdir()) == sorted([*SECRETS, "mqtt-password.tmp"])


@pytest.mark.parametrize("replace, says", [
    ({'terminal_id = "L03"': 'terminal_id = "LANE-3"'}, "terminal.terminal_id"),
    ({'terminal_id = "L03"': ""}, "terminal.terminal_id is required"),
    ({"jeepay-app-secret = ": "other-secret = "}, "providers.jeepay.app_secret_file"),
    ({"mqtt-password = ": '"../mqtt-password" = '}, "secrets.../mqtt-password"),
    ({"[mqtt]": "[mqtt"}, "not valid TOML"),
])
def test_firstboot_refuses_a_bad_file_and_changes_nothing(card, replace, says):
    boot, etc = card
    (boot / "appliance-provision.toml").write_text(sample_text())
    assert firstboot(boot, etc).returncode == 0  # a lane provisioned before
    before = tree(etc)
    (boot / "appliance-provision.toml").write_text(sample_text(**replace))
    r = firstboot(boot, etc)
    assert r.returncode == 1
    assert r.stderr.startswith("<3>appliance-firstboot: not provisioned") and says in r.stderr, r.stderr
    assert tree(etc) == before, "the old config and secrets stay whole"
    assert says in (boot / "appliance-provision.error.txt").read_text()
    assert (boot / "appliance-provision.toml").read_text() == sample_text(**replace), "kept for the technician"
    # fixed and booted again: provisioned, the error file gone
    (boot / "appliance-provision.toml").write_text(sample_text())
    assert firstboot(boot, etc).returncode == 0
    assert not (boot / "appliance-provision.error.txt").exists()


def test_firstboot_remounts_a_read_only_boot_partition(tmp_path):
    with tmpfs(tmp_path / "boot") as boot:
        (boot / "appliance-provision.toml").write_text(sample_text())
        remount_read_only(boot)
        r = firstboot(boot, tmp_path / "etc")
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in boot.iterdir()) == ["appliance-provision.done.toml"]
        assert os.statvfs(boot).f_flag & os.ST_RDONLY, "read-only again afterwards"


# --- the SD card's layout (image/rpi-image-gen) ---------------------------------------------------

CARD = IMAGE / "rpi-image-gen"
FSTAB_GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")


@pytest.mark.skipif(not FSTAB_GENERATOR.exists(), reason="systemd's fstab generator is not installed")
def test_card_fstab_as_systemd_reads_it(tmp_path):
    """The fstab the image writes, through systemd's own generator: the data partition's binds wait
    for /data, the root and boot partitions are read-only, first boot's mounts exist."""
    (tmp_path / "etc").mkdir()
    subprocess.run([CARD / "image/appliance-sd/setup.sh", "ROOT"], env={**os.environ, "IMAGEMOUNTPATH": str(tmp_path)},
                   check=True, timeout=30)
    units = tmp_path / "units"
    units.mkdir()
    subprocess.run([FSTAB_GENERATOR, units, units, units], check=True, timeout=30,
                   env={**os.environ, "SYSTEMD_FSTAB": str(tmp_path / "etc/fstab"),
                        "SYSTEMD_PROC_CMDLINE": "root=LABEL=rootfs"})

    def unit(name: str) -> dict:
        return dict(re.findall(r"^(\w+)=(.*)$", (units / name).read_text(), re.M))

    for where, name in (("/var/lib/appliance", "var-lib-appliance.mount"), ("/etc/appliance", "etc-appliance.mount"),
                        ("/var/log/journal", "var-log-journal.mount")):
        u = unit(name)
        assert u["Where"] == where and u["RequiresMountsFor"] == "/data" and "bind" in u["Options"].split(",")
    data = unit("data.mount")
    assert data["What"] == "/dev/disk/by-label/appdata" and "systemd-fsck@" in data["Requires"]
    assert {"nodev", "nosuid", "noexec", "rw"} <= set(data["Options"].split(","))
    assert "ro" in unit("boot-firmware.mount")["Options"].split(",")
    assert "ro" in unit("-.mount")["Options"].split(",")
    firstboot_mounts = re.search(r"^RequiresMountsFor=(.*)$", (IMAGE / "files/appliance-firstboot.service").read_text(),
                                 re.M).group(1).split()
    for path in firstboot_mounts:
        assert (units / (path.strip("/").replace("/", "-") + ".mount")).exists(), path


def test_card_cmdline_makes_the_root_an_overlay(tmp_path):
    (tmp_path / "cmdline.txt").write_text("console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 "
                                          "fsck.repair=yes rootwait init=/usr/lib/raspberrypi-sys-mods/firstboot\n")
    subprocess.run([CARD / "image/appliance-sd/setup.sh", "BOOT"], env={**os.environ, "IMAGEMOUNTPATH": str(tmp_path)},
                   check=True, timeout=30)
    args = (tmp_path / "cmdline.txt").read_text().split()
    assert "root=LABEL=rootfs" in args and "overlayroot=tmpfs:recurse=0" in args
    assert not [a for a in args if a.startswith("init=")], "no first-boot resize: the partitions are fixed"


def test_card_genimage_has_the_data_partition():
    cfg = (CARD / "image/appliance-sd/genimage.cfg.in").read_text()
    assert re.search(r'image data\.ext4 \{[^}]*label = "appdata"[^}]*\}\s*size = <DATA_SIZE>\s*mountpoint = "/data"',
                     cfg), cfg
    assert re.findall(r"^\s*partition (\w+)", cfg, re.M) == ["boot", "root", "data"]


def test_card_shell_scripts_parse():
    scripts = [IMAGE / "build.sh", IMAGE / "check.sh", IMAGE / "stage.sh", *(IMAGE / "deb").glob("p*"),
               *(CARD / "image/appliance-sd").glob("*.sh"), CARD / "rootfs/usr/lib/appliance/appliance-identity"]
    for script in scripts:
        shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
        r = subprocess.run([shell, "-n", script], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{script}: {r.stderr}"
