"""How tests/data/journal_schema.json was made: run once on the journal whose schema peewee
created and migrated (commit a8e18ac), `python tests/data/make_journal_schema.py
tests/data/journal_schema.json`. Kept for the record: run on today's code it records today's
schema, which tests/test_journal_schema.py holds to the recorded one.

It records, normalised (`schema_of`), the schema of three journals: a new one, the released
schema-2 journal (tests/data/journal_v2/) migrated, and that journal taken back to schema 1
(no funding_source, user_version 0) and migrated.
"""

import json
import re
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from appliance.journal import Journal

V2_JOURNAL = Path(__file__).parent / "journal_v2"


def schema_of(path: Path) -> dict:
    """sqlite_master (type, name, table, SQL with its whitespace collapsed) by type and name,
    with each table's PRAGMA table_info, index_list and foreign_key_list and each index's
    index_xinfo, and the user_version."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        master = [[t, n, tbl, re.sub(r"\s+", " ", sql) if sql else None] for t, n, tbl, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]
        tables = {n: {"columns": [list(r) for r in conn.execute(f'PRAGMA table_info("{n}")')],
                      "indexes": sorted([list(r[1:]) for r in conn.execute(f'PRAGMA index_list("{n}")')]),
                      "foreign_keys": [list(r) for r in conn.execute(f'PRAGMA foreign_key_list("{n}")')]}
                  for t, n, _, _ in master if t == "table"}
        indexes = {n: [list(r) for r in conn.execute(f'PRAGMA index_xinfo("{n}")')]
                   for t, n, _, _ in master if t == "index"}
        return {"master": master, "tables": tables, "indexes": indexes,
                "user_version": conn.execute("PRAGMA user_version").fetchone()[0]}
    finally:
        conn.close()


def journals(root: Path) -> dict[str, Path]:
    """Make the three journals under `root` with the code at hand; their files by name."""
    new = root / "new"
    Journal(new, "S0001", "L01").close()
    from_v2 = root / "from_v2"
    shutil.copytree(V2_JOURNAL, from_v2)
    Journal(from_v2, "S0001", "L01").close()
    from_v1 = root / "from_v1"
    shutil.copytree(V2_JOURNAL, from_v1)
    conn = sqlite3.connect(from_v1 / Journal.FILENAME, isolation_level=None)
    conn.execute("ALTER TABLE payment DROP COLUMN funding_source")
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    Journal(from_v1, "S0001", "L01").close()
    return {name: d / Journal.FILENAME for name, d in (("new", new), ("from_v2", from_v2), ("from_v1", from_v1))}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        recorded = {name: schema_of(path) for name, path in journals(Path(tmp)).items()}
    Path(sys.argv[1]).write_text(json.dumps(recorded, indent=1) + "\n")
