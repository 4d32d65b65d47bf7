"""Deployment files stay in step with the code: valid YAML, real settings, real metric names."""

import re
from pathlib import Path

import yaml

from nudgeflow.agents import metrics
from nudgeflow.settings import Settings
from tests.unit.journeys import ROOT

DEPLOY = ROOT / "deploy"


def test_all_deploy_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_env_vars_in_manifests_are_settings() -> None:
    known = {f"NUDGEFLOW_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"NUDGEFLOW_[A-Z_]+", (DEPLOY / "kubernetes" / "config.yaml").read_text()))
    used |= set(re.findall(r"NUDGEFLOW_[A-Z_]+", (DEPLOY / "Dockerfile").read_text()))
    assert used and used <= known, used - known


def test_alert_rules_use_existing_metrics() -> None:
    names = exported_metrics()
    text = (DEPLOY / "prometheus" / "rules.yaml").read_text()
    used = {re.sub(r"_(total|bucket)$", "", n) for n in re.findall(r"nudgeflow_[a-z_]+", text)}
    assert used <= names, used - names


# --- checked with the real tools (installed by .ci/run; skipped elsewhere when absent) -------------


def tool(name: str) -> str:
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
            raise AssertionError(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} not installed (Debian: apt-get install {'prometheus' if name == 'promtool' else name})")
    return path


def kustomized() -> list[dict[str, object]]:
    import subprocess

    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_kustomize_builds_valid_manifests_that_ship_every_journey_file() -> None:
    import kubernetes_validate

    docs = kustomized()
    for d in docs:
        kubernetes_validate.validate(d, "1.33", strict=True)
    kinds = sorted(str(d["kind"]) for d in docs)
    assert kinds.count("Deployment") == 2 and "StatefulSet" in kinds and "PodDisruptionBudget" in kinds
    (cm,) = [d for d in docs if str(d["metadata"]["name"]).startswith("nudgeflow-journeys")]  # type: ignore[index]
    shipped = sorted(cm["data"])  # type: ignore[index]
    files = sorted(
        str(p.relative_to(ROOT / "journeys")).replace("/", "--") for p in (ROOT / "journeys").rglob("*.yaml")
    )
    assert shipped == files and len(files) >= 16
    (worker,) = [d for d in docs if d["kind"] == "StatefulSet"]
    probes = worker["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_journeys_config_map_loads_as_the_worker_would_load_it(tmp_path: Path) -> None:
    from nudgeflow.engine.loader import load_journeys

    (cm,) = [d for d in kustomized() if str(d["metadata"]["name"]).startswith("nudgeflow-journeys")]  # type: ignore[index]
    for name, text in cm["data"].items():  # type: ignore[index]
        (tmp_path / name).write_text(text)
    js = load_journeys([tmp_path])
    assert len(js.journeys) >= 15


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    import subprocess

    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "rules.test.yaml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    alerts = set(re.findall(r"alert: (\w+)", (DEPLOY / "prometheus" / "rules.yaml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "rules.test.yaml").read_text()))
    runbooks = (DEPLOY / "README.md").read_text()
    assert alerts == tested, alerts ^ tested
    assert all(f"### {a}" in runbooks for a in alerts), [a for a in alerts if f"### {a}" not in runbooks]


# --- checked by reading ----------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    from nudgeflow.channels import metrics as channel_metrics

    return {
        m._name  # type: ignore[attr-defined]
        for mod in (metrics, channel_metrics)
        for m in vars(mod).values()
        if hasattr(m, "_name")
    }


def test_dashboard_queries_use_exported_metrics_only() -> None:
    import json

    dash = json.loads((DEPLOY / "grafana" / "nudgeflow.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"nudgeflow_[a-z_]+", e)}
    assert len(dash["panels"]) >= 10 and used and used <= exported_metrics(), used - exported_metrics()


def test_compose_file_runs_kafka_topics_worker_sender_prometheus_grafana_from_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"kafka", "topics", "worker", "sender-push", "calls", "prometheus", "grafana"} <= set(compose["services"])
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"worker:9464", "sender-push:9465", "calls:9465"}


def test_create_topics_script_creates_every_topic_the_worker_uses() -> None:
    from nudgeflow.streams.topics import Topics
    from nudgeflow.worker import all_topics

    script = (DEPLOY / "kafka" / "create-topics.sh").read_text()
    loops = re.findall(r"for \w+ in ([^;]+); do create \"(nudgeflow\.send\.)?\$\w+\"", script)
    created = {prefix + t for words, prefix in loops for t in words.split()}
    created |= set(re.findall(r'--topic "\$\{PREFIX\}([\w.]+)"', script))
    keys = re.search(r"for t in ([^;]+); do\n  create \"nudgeflow\.keys\.\$t\"", script)
    assert keys is not None
    created |= {f"nudgeflow.keys.{t}" for t in keys.group(1).split()}
    assert set(all_topics(Topics())) | {Topics().journey_registry} <= created, set(all_topics(Topics())) - created
    assert "journey-state-changelog" in script and "cleanup.policy=compact" in script and "-owners" in script
