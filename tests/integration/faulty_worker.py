"""`nudgeflow run` with an engine fault injected for users whose id starts with "boom".

Stands in for an engine bug that one user's state or input triggers, so a test can check that the
fault quarantines that user alone while the worker and everyone else go on.
"""

from __future__ import annotations

from typing import Any

from nudgeflow.engine import core

_real = core.apply


def _faulty(state: Any, inp: Any, now: int, js: Any, sink: Any, wall: int | None = None) -> None:
    if inp.user_id.startswith("boom"):
        raise RuntimeError("injected engine fault")
    _real(state, inp, now, js, sink, wall)


if __name__ == "__main__":
    core.apply = _faulty
    from nudgeflow.cli import main

    main()
