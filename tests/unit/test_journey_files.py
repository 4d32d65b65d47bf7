"""Bad journey files are rejected at load with file, line, path and the problem."""

import json

import pytest

from nudgeflow.engine.errors import JourneyFileErrors
from nudgeflow.engine.loader import load_journeys, load_texts
from nudgeflow.engine.schema import json_schema
from tests.unit.journeys import ROOT

GOOD = """\
journey: j1
name: test
entry:
  event: add_to_cart
steps:
  wait_a_bit:
    wait: 30m
  push:
    send: push
    title: hi
"""


def errors(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(JourneyFileErrors) as ei:
        load_texts({"j.yaml": text})
    return [(e.line, e.path, e.problem) for e in ei.value.errors]


def test_good_file_loads() -> None:
    js = load_texts({"j.yaml": GOOD})
    assert list(js.journeys["j1"].steps) == ["wait_a_bit", "push"]


def test_bad_duration_names_line_and_path() -> None:
    [(line, path, problem)] = errors(GOOD.replace("30m", "30 minutes"))
    assert (line, path) == (7, "steps.wait_a_bit.wait") and "not a duration" in problem


def test_unknown_field_and_missing_field() -> None:
    errs = errors(GOOD.replace("  event: add_to_cart", "  evnt: add_to_cart"))
    assert (4, "entry.evnt", "unknown field 'evnt'") in errs
    errs = errors(GOOD.replace("name: test\n", ""))
    assert (None, "name", "missing required field 'name'") in [(None, p, m) for _, p, m in errs]


def test_duplicate_step_id() -> None:
    [(line, path, problem)] = errors(GOOD + "  push:\n    end: true\n")
    assert line == 11 and path == "steps.push" and "duplicate" in problem


def test_unknown_step_reference_and_unreachable_step() -> None:
    errs = errors(GOOD.replace("    title: hi", "    title: hi\n    next: nowhere"))
    assert (11, "steps.push.next", "'nowhere' is not a step of this journey") in errs
    text = GOOD.replace("    wait: 30m", "    wait: 30m\n    next: end")
    assert (9, "steps.push", "step 'push' can never be reached") in errors(text)


def test_cycle_without_a_wait_is_rejected_but_with_a_wait_is_fine() -> None:
    loop = GOOD + "  again:\n    if: {attribute: score, gt: 1}\n    then: push\n    else: end\n"
    loop = loop.replace("    title: hi", "    title: hi\n    next: again")
    [(_, _, problem)] = errors(loop)
    assert "loop without a wait" in problem and "push" in problem
    ok = loop.replace("    then: push", "    then: wait_a_bit")
    assert load_texts({"j.yaml": ok}).journeys["j1"]


def test_bad_filter_operator_and_template() -> None:
    text = GOOD.replace("  event: add_to_cart", "  event: add_to_cart\n  where: {price: {gtt: 5}}")
    [(line, path, problem)] = errors(text)
    assert (line, path) == (5, "entry.where.price.gtt") and "unknown operator" in problem
    [(line, path, problem)] = errors(GOOD.replace("title: hi", "title: 'hi {{ trigger.product }'"))
    assert (line, path) == (10, "steps.push.title") and "template error" in problem


def test_step_with_two_actions_and_bad_channel() -> None:
    [(_, path, problem)] = errors(GOOD.replace("    wait: 30m", "    wait: 30m\n    send: push"))
    assert path == "steps.wait_a_bit" and "exactly one action" in problem
    [(_, path, problem)] = errors(GOOD.replace("send: push", "send: pigeon"))
    assert path == "steps.push.send" and "pigeon" in problem


def test_yaml_syntax_error_has_a_line() -> None:
    [(line, _, problem)] = errors("journey: j\nname: [unclosed\n")
    assert line == 3 and "not valid YAML" in problem and "flow sequence that starts on line 2" in problem
    bad_indent = "journey: j\nname: n\nentry:\n  event: go\nsteps:\n  a:\n    wait: 1h\n   b:\n    send: push\n"
    [(line, _, problem)] = errors(bad_indent)
    assert line == 8 and "block mapping that starts on line 6" in problem


def test_errors_name_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "bad.yaml"
    f.write_text(GOOD.replace("30m", "soon"))
    with pytest.raises(JourneyFileErrors) as ei:
        load_journeys([f])
    assert str(ei.value).startswith(f"{f}:7: steps.wait_a_bit.wait: ")


def test_every_shipped_journey_loads_and_schema_exports() -> None:
    js = load_journeys([ROOT / "journeys"])
    assert "clevertap-cart-inaction" in js.journeys
    schema = json_schema()
    assert "SendStep" in json.dumps(schema) and schema["title"] == "nudgeflow journey"


def test_exported_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "journeys" / "journey.schema.json").read_text())
    assert shipped == json_schema(), "run: nudgeflow schema > journeys/journey.schema.json"


def test_schema_validates_the_shipped_journeys() -> None:
    import jsonschema
    import yaml

    class AsEditorsSeeIt(yaml.SafeLoader):  # YAML editors see unquoted timestamps as text
        yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML's own class attribute
            k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
            for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

    schema = json_schema()
    for f in sorted((ROOT / "journeys").rglob("*.yaml")):
        doc = yaml.load(f.read_text(), Loader=AsEditorsSeeIt)
        if "journey" in doc:
            jsonschema.validate(doc, schema)


def test_every_error_is_reported_at_once_each_as_file_line_path_message() -> None:
    # a bad entry field used to hide an unknown field in steps
    bad_entry = GOOD.replace("  event: add_to_cart", "  event: add_to_cart\n  wen: now").replace(
        "    title: hi", "    title: hi\n    colour: red"
    )
    found = {(path, problem.split(" '")[0]) for _, path, problem in errors(bad_entry)}
    assert found == {("entry.wen", "unknown field"), ("steps.push.colour", "unknown field")}
    # a bad duration used to hide an unknown next
    bad_both = GOOD.replace("30m", "soon").replace("    title: hi", "    title: hi\n    next: nowhere")
    assert sorted(path for _, path, _ in errors(bad_both)) == ["steps.push.next", "steps.wait_a_bit.wait"]
    with pytest.raises(JourneyFileErrors) as ei:
        load_texts({"j.yaml": "- a list\n"})
    assert "::" not in str(ei.value) and str(ei.value).startswith("j.yaml")


def test_a_template_name_outside_the_known_roots_is_an_error() -> None:
    doc = """journey: j
name: J
entry: {event: go}
steps:
  hi: {send: push, title: "Hi {{ profil.first_name }}, {{ user.id }}"}
"""
    with pytest.raises(JourneyFileErrors) as e:
        load_texts({"j.yaml": doc})
    assert "j.yaml:5: steps.hi.title: template error: unknown name 'profil'" in str(e.value)
