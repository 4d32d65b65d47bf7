"""Configuration mistakes end `nudgeflow run` with one clear line and exit code 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.unit.journeys import ROOT


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nudgeflow.cli", "run", "--journeys", str(ROOT / "journeys"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_a_busy_metrics_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run("--metrics-port", str(port), "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr


def test_a_data_dir_that_cannot_be_made_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = run("--data-dir", str(tmp_path / "file" / "data"), "--metrics-port", "0")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "cannot use the data dir" in out.stderr
