import os
import queue

from appliance.scan.stdin import MAX_LINE, StdinScanner


def _scans(data: bytes, n: int):
    r, w = os.pipe()
    got: queue.Queue = queue.Queue()
    sc = StdinScanner(fd=r)
    sc.start(got.put)
    os.write(w, data)
    os.close(w)
    out = [got.get(timeout=5) for _ in range(n)]
    sc.close()
    os.close(r)
    assert got.empty()
    return out


def test_lines_become_scans_and_crlf_is_stripped():
    scans = _scans(b"ORD:A1:1.00\r\n134567890123456789\nlast-without-newline", 3)
    assert [s.text for s in scans] == ["ORD:A1:1.00", "134567890123456789", "last-without-newline"]
    assert all(s.source == "stdin" and s.defect is None for s in scans)


def test_non_utf8_is_a_defect_not_a_guess():
    [s] = _scans(b"\xff\xfe13\n", 1)
    assert s.text == "" and "not UTF-8" in s.defect


def test_overlong_line_is_one_defect_and_the_next_line_is_clean():
    scans = _scans(b"9" * (MAX_LINE * 3) + b"\nORD:A1:1.00\n", 2)
    assert scans[0].defect and scans[0].text == ""
    assert scans[1].text == "ORD:A1:1.00"
