"""The CLI and the service facing a journal that is not whole, a full disk, a read-only disk."""

import json
import shutil
import subprocess
import time

import pytest

from appliance.journal import Journal, State
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from conftest import (WECHAT_PAID, WECHAT_PAID_2, WECHAT_SLOW, appliance_cmd, lane_dict, remount_read_only,
                      subprocess_env, tmpfs, write_config)

pytestmark = pytest.mark.integration


def cli(conf, *args, timeout=60):
    return subprocess.run(appliance_cmd() + list(args) + ["--config", str(conf)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def charge(conf, order, code):
    return cli(conf, "charge", "--order", order, "--amount", "1.00", "--code", code, "--json")


@pytest.mark.parametrize("damage", ["journal.sqlite", "code-digest.key", "journal.id", "empty"])
def test_charge_on_a_journal_that_is_not_whole_exits_6_and_charges_nothing(tmp_path, damage):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state"))
    assert charge(conf, "A1", WECHAT_PAID).returncode == 0
    if damage == "empty":
        (tmp_path / "state" / "journal.sqlite").write_bytes(b"")
        for suffix in ("-wal", "-shm"):
            (tmp_path / "state" / f"journal.sqlite{suffix}").unlink(missing_ok=True)
    else:
        (tmp_path / "state" / damage).unlink()
    for order, code in (("A1", WECHAT_PAID_2), ("A2", WECHAT_PAID)):  # a paid order, a used code
        r = charge(conf, order, code)
        assert r.returncode == 6 and "journal refused" in r.stderr, r.stderr
    ledger = SandboxProvider("sandbox", SandboxOptions(), tmp_path / "state")
    assert ledger.charges(WECHAT_PAID) == 1 and ledger.charges(WECHAT_PAID_2) == 0
    ledger.close()
    r = subprocess.run(appliance_cmd() + ["run", "--config", str(conf)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 6 and "journal refused" in r.stderr


def test_journal_command_reads_without_creating_anything(tmp_path):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state"))
    r = cli(conf, "journal")
    assert r.returncode == 1 and "no journal" in r.stderr
    assert not (tmp_path / "state").exists()


def test_journal_command_works_on_a_read_only_filesystem(tmp_path):
    with tmpfs(tmp_path / "ro") as mnt:
        conf = write_config(tmp_path / "a.toml", lane_dict(mnt / "state", terminal={"min_free_mb": 0}))  # a 4 MiB disk
        assert charge(conf, "A1", WECHAT_PAID).returncode == 0
        remount_read_only(mnt)
        r = cli(conf, "journal", "--json")
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["state"] for line in r.stdout.splitlines()] == ["paid"]
        assert charge(conf, "A2", WECHAT_PAID_2).returncode != 0  # a writer cannot work there, and says so


def test_disk_full_during_the_platform_call_answers_unknown_then_the_service_finishes_it(tmp_path, small_disk):
    doc = lane_dict(small_disk.path / "state", terminal={"min_free_mb": 0})  # SQLite's own ENOSPC, not the reserve
    doc["providers"]["sandbox"]["slow_ms"] = 1500
    conf = write_config(tmp_path / "a.toml", doc)
    assert charge(conf, "A0", WECHAT_PAID).returncode == 0  # journal and ledger exist
    proc = subprocess.Popen(appliance_cmd() + ["charge", "--order", "A1", "--amount", "1.00", "--code", WECHAT_SLOW,
                                               "--json", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    journal = Journal(small_disk.path / "state", "S0001", "L01", readonly=True)
    deadline = time.monotonic() + 20
    while not any(t.order == "A1" for t in journal.recent()) and time.monotonic() < deadline:
        time.sleep(0.02)
    small_disk.fill()  # the platform is charging; its answer will find no room
    out, err = proc.communicate(timeout=30)
    result = json.loads(out)
    assert proc.returncode == 4 and result["state"] == "unknown" and "disk full" in result["reason"], err
    assert "unexpected error" not in err
    [txn] = [t for t in journal.recent() if t.order == "A1"]
    assert txn.state is State.PENDING
    small_disk.free()
    service = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 20
        while journal.get(txn.txn_id).state is not State.PAID and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        service.terminate()
        service.communicate(timeout=10)
    assert journal.get(txn.txn_id).state is State.PAID
    ledger = SandboxProvider("sandbox", SandboxOptions(), small_disk.path / "state")
    assert ledger.charges(WECHAT_SLOW) == 1
    ledger.close()
    journal.close()
    shutil.rmtree(small_disk.path / "state", ignore_errors=True)
