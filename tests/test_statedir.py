"""The state dir's identity: a journal is opened for writing only when its files belong together."""

import json
import os
import shutil
import sqlite3
import stat

import pytest

from appliance import statedir
from appliance.errors import JournalError, JournalIntegrityError
from appliance.journal import Journal, _init_schema
from conftest import remount_read_only, tmpfs

CODE = "134567890123456789"


def _make(state, store="S0001", terminal="L01", pay=True) -> str:
    j = Journal(state, store, terminal)
    if pay:
        j.open_payment(order="A1", amount_fen=100, payment_type="wechat", platform="sandbox", code=CODE)
    jid = j.journal_id()
    j.close()
    return jid


def test_a_new_state_dir_gets_three_files_with_one_id_all_private(tmp_path):
    state = tmp_path / "state"
    jid = _make(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("journal.sqlite", "code-digest.key", "journal.id"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert json.loads((state / "code-digest.key").read_text())["journal_id"] == jid
    assert json.loads((state / "journal.id").read_text())["journal_id"] == jid
    assert sorted(p.name for p in state.iterdir() if ".new" in p.name or ".tmp" in p.name) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a journal made by root for the service's user")
def test_made_by_root_the_files_belong_to_the_state_dirs_owner(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # the service user, here nobody
    _make(state)
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()}
    assert set(owners.values()) == {(65534, 65534)}, owners


def test_reopening_a_whole_journal_keeps_its_id_and_history(tmp_path):
    jid = _make(tmp_path)
    j = Journal(tmp_path, "S0001", "L01")
    assert j.journal_id() == jid and j.code_used(CODE)
    j.close()


def _delete(name):
    return lambda state, other: (state / name).unlink()


def _empty(name):
    return lambda state, other: (state / name).write_bytes(b"")


def _take_from_other(name):
    return lambda state, other: shutil.copy(other / name, state / name)


def _swap_dir(state, other):
    shutil.rmtree(state)
    shutil.copytree(other, state)


def _tamper_key(state, other):
    doc = json.loads((state / "code-digest.key").read_text())
    doc["key"] = "00" * 32
    (state / "code-digest.key").write_text(json.dumps(doc))


@pytest.mark.parametrize("damage,message", [
    (_delete("journal.sqlite"), "journal .* is missing"),
    (_empty("journal.sqlite"), "is empty"),
    (_delete("code-digest.key"), "key .* is missing"),
    (_take_from_other("code-digest.key"), "does not belong to journal"),
    (_tamper_key, "does not belong to journal"),
    (_empty("code-digest.key"), "is damaged"),
    (_delete("journal.id"), "journal.id is missing"),
    (_take_from_other("journal.id"), "swapped"),
    (_take_from_other("journal.sqlite"), "does not belong|swapped"),
    (_swap_dir, "belongs to lane S0001/L02"),
], ids=["journal-deleted", "journal-zero-length", "key-deleted", "key-of-another-journal", "key-altered",
        "key-empty", "id-deleted", "id-of-another-journal", "journal-of-another-lane", "state-dir-swapped"])
def test_a_state_dir_that_does_not_belong_together_is_refused_and_left_alone(tmp_path, damage, message):
    state, other = tmp_path / "state", tmp_path / "other"
    _make(state)
    _make(other, terminal="L02")
    damage(state, other)
    before = _files(state)
    with pytest.raises(JournalIntegrityError, match=message):
        Journal(state, "S0001", "L01")
    assert _files(state) == before  # nothing created, nothing changed


def _files(state) -> dict:
    """The state dir's files and contents, leaving out SQLite's -wal/-shm (a reader may make them empty)."""
    return {p.name: p.read_bytes() for p in state.iterdir() if not p.name.endswith(("-wal", "-shm"))}


def test_a_zero_length_journal_with_no_other_trace_is_refused_too(tmp_path):
    (tmp_path / "journal.sqlite").write_bytes(b"")
    with pytest.raises(JournalIntegrityError, match="is empty"):
        Journal(tmp_path, "S0001", "L01")


def test_a_paid_order_and_a_used_code_stay_refused_across_every_refusal(tmp_path):
    """The reported attack: delete the key or empty the journal, then charge again."""
    _make(tmp_path)
    (tmp_path / "code-digest.key").unlink()
    with pytest.raises(JournalIntegrityError):
        Journal(tmp_path, "S0001", "L01")
    assert not (tmp_path / "code-digest.key").exists()  # never silently re-made


class _PowerCut(Exception):
    pass


def _count_steps(tmp_path) -> int:
    calls = []
    real = os.rename

    def counting(*a):
        calls.append(a)
        return real(*a)

    statedir.os.rename = counting
    try:
        _make(tmp_path / "count", pay=False)
    finally:
        statedir.os.rename = real
    return len(calls)


def test_a_power_cut_at_any_step_of_the_first_start_is_finished_or_started_over(tmp_path, monkeypatch):
    steps = _count_steps(tmp_path)
    assert steps >= 6  # three files written aside, three renamed into place
    real = os.rename
    for cut in range(1, steps + 1):
        state = tmp_path / f"cut{cut}"
        done = []

        def rename(src, dst, cut=cut, done=done):
            if len(done) + 1 == cut:
                raise _PowerCut(f"power cut before rename {cut}")
            done.append(dst)
            return real(src, dst)

        monkeypatch.setattr(statedir.os, "rename", rename)
        with pytest.raises(_PowerCut):
            Journal(state, "S0001", "L01")
        monkeypatch.setattr(statedir.os, "rename", real)
        j = Journal(state, "S0001", "L01")  # the next start: no refusal, one whole journal
        jid = j.journal_id()
        j.close()
        assert json.loads((state / "journal.id").read_text())["journal_id"] == jid, cut
        assert json.loads((state / "code-digest.key").read_text())["journal_id"] == jid, cut
        assert [p.name for p in state.iterdir() if ".new" in p.name or ".tmp" in p.name] == [], cut


def _legacy(state):
    """A state dir as the previous release wrote it: bare hex key, no ids."""
    _make(state)
    conn = sqlite3.connect(state / "journal.sqlite")
    conn.execute("DELETE FROM meta WHERE key != 'epoch'")
    conn.commit()
    conn.close()
    key = json.loads((state / "code-digest.key").read_text())["key"]
    (state / "code-digest.key").write_text(key)
    (state / "journal.id").unlink()
    return key


def test_a_journal_from_before_ids_is_upgraded_once_keeping_its_key(tmp_path):
    key = _legacy(tmp_path)
    j = Journal(tmp_path, "S0001", "L01")
    jid = j.journal_id()
    assert jid and j.code_used(CODE)  # the same key: a code used before the upgrade stays used
    j.close()
    assert json.loads((tmp_path / "code-digest.key").read_text()) == {"journal_id": jid, "key": key}
    j = Journal(tmp_path, "S0001", "L01")
    assert j.journal_id() == jid
    j.close()


def test_a_legacy_journal_without_its_key_is_refused(tmp_path):
    _legacy(tmp_path)
    (tmp_path / "code-digest.key").unlink()
    with pytest.raises(JournalIntegrityError, match="key .* is missing"):
        Journal(tmp_path, "S0001", "L01")


# --- read-only ------------------------------------------------------------------------------


def test_read_only_open_never_creates_a_journal(tmp_path):
    with pytest.raises(JournalError, match="no journal"):
        Journal(tmp_path / "state", "S0001", "L01", readonly=True)
    assert not (tmp_path / "state").exists()
    _make(tmp_path / "state")
    (tmp_path / "state" / "journal.sqlite").unlink()
    with pytest.raises(JournalError, match="no journal"):
        Journal(tmp_path / "state", "S0001", "L01", readonly=True)
    assert not (tmp_path / "state" / "journal.sqlite").exists()


def test_read_only_open_cannot_write(tmp_path):
    _make(tmp_path)
    j = Journal(tmp_path, "S0001", "L01", readonly=True)
    assert [t.order for t in j.recent()] == ["A1"]
    with pytest.raises(JournalError):
        j.transition(1, "paid")
    j.close()


def test_read_only_open_works_on_a_read_only_filesystem(tmp_path):
    _make(tmp_path / "state")
    with tmpfs(tmp_path / "ro") as mnt:
        for p in (tmp_path / "state").iterdir():
            shutil.copy(p, mnt / p.name)
        remount_read_only(mnt)
        j = Journal(mnt, "S0001", "L01", readonly=True)
        assert [t.order for t in j.recent()] == ["A1"]
        j.close()
        assert sorted(p.name for p in mnt.iterdir()) == ["code-digest.key", "journal.id", "journal.sqlite"]


def test_the_identity_never_shows_its_key(tmp_path):
    identity = statedir.settle(tmp_path, "S0001", "L01", _init_schema)
    assert identity.code_key.hex() not in repr(identity) and str(identity.code_key) not in repr(identity)
