"""The benchmarks' clock log: a timed row gets the SM clock range, peak power and clock-event
reasons sampled during its span, and the receipt's markdown shows them."""

import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from common import ClockLog, write_receipt  # noqa: E402


def _line(t, mhz, watts, reasons):
    stamp = datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz}, {watts}, {reasons}\n"


def _fake_log(lines):
    log = ClockLog()
    log.close_process()  # a real nvidia-smi (if any) must not add samples to the fake log
    with open(log._f.name, "w") as f:
        f.writelines(lines)
    return log


def test_clock_log_summarises_the_span():
    t0 = 1_800_000_000.0
    log = _fake_log([
        _line(t0, 1980, 120.5, "0x0000000000000000"),
        _line(t0 + 0.2, 1770, 650.0, "0x0000000000000004"),
        _line(t0 + 0.4, 1600, 700.2, "0x0000000000000004"),
        _line(t0 + 0.6, 1980, 130.0, "0x0000000000000000"),
        "garbage line\n",
    ])
    try:
        c = log.during(t0 + 0.15, t0 + 0.45)
        assert c == {"sm_mhz": [1600.0, 1770.0], "power_w_max": 700.2, "clock_reasons": "0x4"}
        # many spans summarised from one read of the log give the same answer
        assert log.during(t0 + 0.15, t0 + 0.45, samples=log.samples()) == c
        # a span between two samples takes the nearest one
        c = log.during(t0 + 0.05, t0 + 0.06)
        assert c["sm_mhz"] == [1980.0, 1980.0] and c["clock_reasons"] == "0x0"
    finally:
        log.close()


def test_clock_log_without_samples():
    log = _fake_log([])
    try:
        assert log.samples() == [] and log.during(0.0, 1.0) is None
    finally:
        log.close()


def test_receipt_shows_clock_columns(tmp_path):
    rows = [{"impl": "a", "case": {"S": 1}, "ms": 1.0, "tflops": 2.0, "peak_gib": 0.1, "status": "ok",
             "clock": {"sm_mhz": [1770.0, 1905.0], "power_w_max": 699.6, "clock_reasons": "0x4"}},
            {"impl": "b", "case": {"S": 1}, "ms": 2.0, "tflops": 1.0, "peak_gib": 0.1, "status": "ok"}]
    paths = write_receipt("clocktest", rows, str(tmp_path))
    md = open(paths["md"]).read().splitlines()
    head = next(ln for ln in md if ln.startswith("| impl"))
    assert head.endswith("| SM MHz | W max |")
    row_a = next(ln for ln in md if ln.startswith("| a "))
    row_b = next(ln for ln in md if ln.startswith("| b "))
    assert row_a.endswith("| 1770-1905 | 700 |") and row_b.endswith("| - | - |")
    assert json.load(open(paths["json"]))["rows"][0]["clock"]["clock_reasons"] == "0x4"
