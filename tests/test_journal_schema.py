"""The journal's schema without an ORM on the lane: a new journal, the released schema-2 journal
migrated and a schema-1 journal migrated have the schema peewee's models created and migrated to,
as recorded from that code (tests/data/journal_schema.json, by tests/data/make_journal_schema.py):
the same tables, columns, types, NOT NULL, defaults, keys and indexes, partial and unique ones
included. And a lane, built and taking payments, never imports peewee (7 MB resident, issue 10)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lane_dict

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_journal_schema", DATA / "make_journal_schema.py")
recorder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recorder)
RECORDED = json.loads((DATA / "journal_schema.json").read_text())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return {name: recorder.schema_of(path) for name, path in recorder.journals(tmp_path_factory.mktemp("j")).items()}


@pytest.mark.parametrize("journal", ["new", "from_v2", "from_v1"])
def test_the_schema_is_the_one_peewee_created(made, journal):
    assert made[journal] == RECORDED[journal]


def test_the_recording_holds_what_the_comparison_relies_on():
    new = RECORDED["new"]
    assert {n for t, n, _, _ in new["master"] if t == "table"} == {"meta", "day_sequence", "payment", "outbox"}
    assert [c[1] for c in new["tables"]["payment"]["columns"] if c[3]] and new["user_version"] == 4  # NOT NULLs
    partial = {n: sql for t, n, _, sql in new["master"] if t == "index" and sql and " WHERE " in sql}
    assert sorted(partial) == ["outbox_queued", "outbox_sent", "payment_live_order", "payment_open"]
    unique = {r[0] for r in new["tables"]["payment"]["indexes"] if r[1]}
    assert {"payment_out_trade_no", "payment_live_order", "payment_code_once"} <= unique


_LANE = """
import json, sys
from appliance import service
from appliance.config import from_dict
from appliance.indicator import make_indicator

cfg = from_dict(json.loads(sys.argv[1]))
lane = service.build(cfg, indicator=make_indicator(cfg.indicator))
paid = [lane.till.charge(f"O{n}", 100 + n, f"13{n:014d}07") for n in range(3)]
lane.till.cancel("O0")
lane.resolver.step()
rows = lane.journal.claim()
lane.journal.ack(r.seq for r in rows)
lane.journal.prune(0)
state = lane.journal.outbox_state()
lane.journal.close_days("2999-01-01")
lane.close()
print(json.dumps({"states": [r.state for r in paid], "acked": len(rows), "backlog": state.backlog,
                  "peewee": sorted(m for m in sys.modules if m.split(".")[0] in ("peewee", "playhouse")),
                  "metadata": "importlib.metadata" in sys.modules}))
"""


def test_a_lane_taking_payments_never_imports_peewee(tmp_path):
    doc = lane_dict(tmp_path / "state", indicator={"kind": "log"})  # gpiozero (mock, gpio) imports importlib.metadata
    out = subprocess.run([sys.executable, "-c", _LANE, json.dumps(doc)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["states"] == ["paid"] * 3 and seen["acked"] >= 4 and seen["backlog"] == 0
    assert seen["peewee"] == []
    assert not seen["metadata"]  # looked for only when a config names a kind not built in (~1.5 MB)
