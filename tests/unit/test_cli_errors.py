"""Configuration mistakes end `nudgeflow run` with one clear line and exit code 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.unit.journeys import ROOT


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nudgeflow.cli",
            "run",
            "--broker",
            "embedded",
            "--journeys",
            str(ROOT / "journeys"),
            *args,
        ],
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


def test_kafka_security_settings_reach_every_client_kind() -> None:
    import faust

    from nudgeflow.agents.app import faust_credentials
    from nudgeflow.settings import Settings

    s = Settings(
        broker="kafka://b1:9093,b2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="nudge",
        kafka_sasl_password="pw",  # type: ignore[arg-type]
    )
    assert s.kafka_conf() == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "nudge",
        "sasl.password": "pw",
    }
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials) and creds.ssl_context is not None
    assert creds.username == "nudge" and str(creds.mechanism.value) == "SCRAM-SHA-512"
    assert faust_credentials(Settings(broker="kafka://b:9092")) is None


def test_run_needs_an_explicit_broker_and_unknown_settings_are_warned_about() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")} | {"NUDGEFLOW_BROKR": "kafka://x:1"}
    r = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "run"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "needs a broker" in r.stderr
    assert "NUDGEFLOW_BROKR is not a nudgeflow setting" in r.stderr
    assert "Traceback" not in r.stderr
    v = subprocess.run([sys.executable, "-m", "nudgeflow.cli", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("nudgeflow ")


def test_every_setting_is_documented_in_the_readme() -> None:
    from nudgeflow.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [
        n.upper() for n in Settings.model_fields if f"`{n.upper()}`" not in readme and f"{n.upper()}`" not in readme
    ]
    assert not missing, missing
