"""Deployment files stay in step with the code: valid YAML, real settings, real metric names."""

import re

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
    names = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}  # type: ignore[attr-defined]
    text = (DEPLOY / "prometheus" / "rules.yaml").read_text()
    used = {re.sub(r"_(total|bucket)$", "", n) for n in re.findall(r"nudgeflow_[a-z_]+", text)}
    assert used <= names, used - names
