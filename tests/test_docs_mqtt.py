"""docs/mqtt.md, head office's contract, stays true: every example passes its schema, the schemas
shown are the package's, and the ACL shown is the one the test brokers run (tests/broker.py)."""

import json
import re

import pytest
from broker import acl_text
from conftest import ROOT

from appliance import schemas

DOC = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
BODY, APPENDIX = DOC.split("\n## Appendix: the schemas\n")
FENCED_JSON = re.compile(r"```json\n(.*?)```", re.S)


def examples() -> list[dict]:
    return [json.loads(block) for block in FENCED_JSON.findall(BODY)]


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.get("kind", "command"))
def test_ok__each_example_passes_its_schema_with_sorted_keys(example):
    kind = example.get("kind", "command")
    assert schemas.check(kind, json.dumps(example)) == example
    assert json.dumps(example) == json.dumps(example, sort_keys=True)


def test_ok__there_is_an_example_of_every_kind():
    assert {e.get("kind", "command") for e in examples()} == set(schemas.KINDS)


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_ok__the_appendix_shows_each_schema_as_shipped(kind):
    shown = re.search(rf"### `{kind}\.json`.*?```json\n(.*?)```", APPENDIX, re.S)
    assert shown and json.loads(shown.group(1)) == schemas.schema(kind)


def test_ok__the_acl_example_is_the_test_brokers_acl_for_one_store():
    expected = acl_text("lanes", [("S001", "01"), ("S001", "02")])
    assert f"```\n{expected}```" in BODY
