"""CSV enrolment: rows become nudgeflow.enroll events that the engine turns into entries."""

from pathlib import Path

import orjson
import pytest

from nudgeflow.engine.io import Enroll
from nudgeflow.enroll import EnrollFileError, enroll_events
from nudgeflow.streams.events import Decoder
from tests.unit.journeys import T0


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
