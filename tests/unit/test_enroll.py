"""CSV enrolment: rows become nudgeflow.enroll events that the engine turns into entries."""

from pathlib import Path

import orjson
import pytest

from nudgeflow.engine.io import Enroll
from nudgeflow.enroll import EnrollFileError, enroll_events
from nudgeflow.streams.events import Decoder
from tests.unit.journeys import ROOT, T0


def test_rows_become_enroll_events(tmp_path: Path) -> None:
    f = tmp_path / "vip.csv"
    f.write_text("user_id,first_name\nu1,Ana\nu2,Bo\n")
    events = list(enroll_events(f, "vip-welcome", now_ms=T0))
    assert [u for u, _ in events] == ["u1", "u2"]
    decoded = Decoder().decode("custom_events", orjson.dumps(events[0][1]), None, T0)
    assert decoded == Enroll("u1", "vip-welcome", T0, {"first_name": "Ana", "journey": "vip-welcome"})


@pytest.mark.parametrize(("text", "problem"), [("id,name\nu1,A\n", "user_id"), ("user_id,name\n,A\n", ":2: empty")])
def test_bad_csv_is_rejected_with_the_line(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(EnrollFileError, match=problem):
        list(enroll_events(f, "j"))


def test_enroll_checks_the_journey_and_the_whole_file_before_producing(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "vip.yaml").write_text(
        "journey: vip-list\nname: VIP list\nentry: {enrolled: true}\n"
        "steps:\n  hi: {send: email, subject: Hi, text: Hi}\n"
    )

    def enroll(journey: str, csv_text: str) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "users.csv"
        f.write_text(csv_text)
        cmd = [sys.executable, "-m", "nudgeflow.cli", "enroll", "--journey", journey, "--users", str(f)]
        cmd += ["--broker", "kafka://127.0.0.1:1", "--journeys", str(ROOT / "journeys")]  # nothing listens there
        cmd += ["--journeys", str(tmp_path / "j")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = enroll("no-such-journey", "user_id\nu1\n")
    assert r.returncode == 2 and "no journey 'no-such-journey'" in r.stderr
    r = enroll("clevertap-cart-inaction", "user_id\nu1\n")
    assert r.returncode == 2 and "does not take enrolments" in r.stderr
    r = enroll("vip-list", "user_id,name\nu1,A\n,B\nu3,C\n")  # line 3 has no user id
    assert r.returncode == 1 and "users.csv:3: empty user_id" in r.stderr and "enrolled" not in r.stdout
