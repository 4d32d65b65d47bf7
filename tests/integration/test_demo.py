"""`make demo` shows sends (a busy topic of events no journey uses must not hold the others back),
and stopped with Ctrl-C: the terminal's SIGINT reaches the demo's process group only
(the broker, worker and sender run in their own), and the demo stops its parts in reverse order:
it exits promptly, says so, and prints no traceback and no storm of connection errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with out.open("wb") as f:
        demo = subprocess.Popen(
            [sys.executable, "-m", "nudgeflow.cli", "demo", "--metrics-port", "0", "--users", "200", "--rate", "50"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
    try:
        consumed = re.compile(rb"demo status: produced=\d+ consumed=[1-9]")
        assert wait_for(lambda: consumed.search(out.read_bytes()) is not None, timeout=120), out.read_text()
        # sends visible: the 15-second wait of the demo journey fired while page views kept flowing
        assert wait_for(lambda: b"[push] user=" in out.read_bytes(), timeout=120), out.read_text()[-3000:]
        t0 = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = demo.wait(60)
        took = time.monotonic() - t0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    text = out.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "ERROR" in line or "Error" in line]
    assert code == 0 and took < 45, (code, took, text[-2000:])
    assert "demo: stopped" in text and "Traceback" not in text
    assert len(errors) <= 3, errors[:10]
