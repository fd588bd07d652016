"""The monitoring files, without a server: the Grafana dashboard, the Prometheus rules and config, docker-compose.yaml.

- deploy/grafana/bitmoji.json is what deploy/grafana/generate.py writes, and is a well-formed dashboard:
  every panel has the ${datasource} data source and targets with an expression;
- deploy/prometheus/alerts.yaml: every rule has an expression, a `for`, a severity, a summary and a
  description;
- every PromQL expression of both parses and names only metrics and labels that server/metrics.py declares
  (tests/promql_check.py; tests/e2e/test_dashboards.py checks the same against a real server's /metrics);
- where `promtool` is installed (Debian's `prometheus` package): it checks the rules and the config, runs
  alerts.test.yaml, and parses the dashboard's expressions too;
- docker-compose.yaml runs the server, Prometheus and Grafana on the ports the other files expect, and every
  host path it mounts exists.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from promql_check import (
    ALERTS,
    DASHBOARD,
    Query,
    all_queries,
    check,
    dashboard_queries,
    declared_exposition,
    metric_names,
    panels,
    to_promql,
)

from bitmoji.server.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
COMPOSE = ROOT / "docker-compose.yaml"
PROMTOOL = shutil.which("promtool")
SEVERITIES = {"critical", "warning", "info"}

# What the dashboard must show (the issue's list): each needs at least one panel query selecting it.
DASHBOARD_METRICS = {
    "bitmoji_requests_total",
    "bitmoji_request_duration_seconds_bucket",
    "bitmoji_queue_depth",
    "bitmoji_queue_capacity",
    "bitmoji_queue_wait_seconds_bucket",
    "bitmoji_batch_size_bucket",
    "bitmoji_forward_duration_seconds_bucket",
    "bitmoji_preprocess_duration_seconds_bucket",
    "bitmoji_items_dropped_total",
    "bitmoji_refusals_total",
    "bitmoji_probes_total",
    "bitmoji_model_loads_total",
    "bitmoji_model_info",
    "bitmoji_model_memory_bytes",
    "bitmoji_shadow_comparisons_total",
    "bitmoji_shadow_disagreements_total",
    "bitmoji_shadow_logit_difference_bucket",
    "bitmoji_serving",
    "bitmoji_build_info",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
}
ALERT_NAMES = {
    "BitmojiHighErrorRatio",
    "BitmojiHighLatency",
    "BitmojiOverloaded",
    "BitmojiQueueSaturated",
    "BitmojiNotServing",
    "BitmojiTargetDown",
    "BitmojiNoServingInstance",
    "BitmojiRestarted",
    "BitmojiModelLoadFailed",
    "BitmojiShadowDisagreement",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# -- the dashboard ----------------------------------------------------------------------------------------


def test_the_dashboard_is_what_its_generator_writes():
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert DASHBOARD.read_text() == generate.render(), "run: python deploy/grafana/generate.py"


def test_the_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] == "bitmoji-serve" and d["title"] and d["schemaVersion"] >= 39  # Grafana 10.4 / 11
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert re.match(rf"label_values\(bitmoji_model_info\b.*, {name}\)$", variables[name]["definition"])
    for name in ("job", "instance", "model", "version"):
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(d):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']!r} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["datasource"] == panel["datasource"], panel["title"]
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows[0] == "Overview" and len(rows) >= 6


def test_the_dashboard_shows_every_metric_the_issue_lists():
    used = set().union(*(metric_names(q.expr) for q in dashboard_queries()))
    assert DASHBOARD_METRICS - used == set()


def test_rate_windows_are_grafanas_rate_interval():
    # a fixed [5m] would be too short for a 1-minute scrape interval and hide detail at short ranges
    for query in dashboard_queries():
        for window in re.findall(r"\[([^\]]*)\]", query.expr):
            assert window in ("$__rate_interval", "$__rate_interval:"), query.where


# -- the alerts ---------------------------------------------------------------------------------------------


def test_every_alert_rule_is_complete():
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    assert set(names) == ALERT_NAMES
    for rule in found:
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def test_prometheus_config_loads_the_alerts_and_scrapes_the_compose_server():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "bitmoji"  # the job the absent()/up alerts select
    assert job["static_configs"] == [{"targets": ["bitmoji:9464"]}]
    for rule in rules():
        for selected in re.findall(r'job="([^"]*)"', rule["expr"]):
            assert selected == job["job_name"], rule["alert"]


# -- the expressions -------------------------------------------------------------------------------------------

QUERIES = all_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_expression_uses_only_declared_metrics_and_labels(query):
    problems = check(query, declared_exposition())
    assert not problems, "\n".join(problems)


def test_the_expression_check_finds_mistakes():
    declared = declared_exposition()
    saturation = next(q for q in dashboard_queries() if "Queue saturation" in q.where)
    assert check(saturation, declared) == []
    mistakes = {
        "a misspelt metric": saturation.expr.replace("bitmoji_queue_capacity", "bitmoji_queue_capacty"),
        "a label the metric lacks": saturation.expr.replace('model=~"$model"', 'model=~"$model", method="Classify"', 1),
        "a label aggregated away": f"sum by (method) ({saturation.expr})",
        "a status code that does not exist": 'rate(bitmoji_requests_total{code="RESOURCE_EXHAUSED"}[5m])',
        "a refusal reason that does not exist": 'rate(bitmoji_refusals_total{reason=~"queue_full|overload"}[5m])',
        "a quantile without le": "histogram_quantile(0.9, sum by (method) "
        "(rate(bitmoji_request_duration_seconds_bucket[5m])))",
        "on() a label one side lacks": "bitmoji_queue_depth / on (model, reason) bitmoji_queue_capacity",
        "a Grafana variable PromQL cannot hold": "rate(bitmoji_items_total[5m]) > $threshold",
    }
    for what, expr in mistakes.items():
        assert check(Query(what, expr), declared), what
    # and a metric the server stops exporting
    without = {name: labels for name, labels in declared.items() if name != "bitmoji_queue_capacity"}
    assert any("bitmoji_queue_capacity" in problem for problem in check(saturation, without))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_checks_the_rules_the_config_and_the_alert_unit_tests():
    for args in (
        ["check", "rules", "alerts.yaml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts.test.yaml"],
    ):
        result = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_parses_the_dashboard_expressions(tmp_path):
    # promtool has no "parse this expression" command: the dashboard's queries become recording rules
    queries = [q for q in dashboard_queries() if not q.expr.startswith("label_values(")]
    records = [{"record": f"dashboard:query_{i}", "expr": to_promql(q.expr)} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(records)} rules found" in result.stdout


# -- docker-compose.yaml ---------------------------------------------------------------------------------------

DEFAULTED = re.compile(r"\$\{(?P<name>[A-Z_]+):-(?P<default>[^}]*)\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> list[tuple[str, str]]:
    """(host path with ${VAR:-default} resolved to the default, container path) of each bind mount."""
    out = []
    for volume in service.get("volumes", []):
        host, container = DEFAULTED.sub(lambda m: m["default"], volume).split(":")[:2]
        out.append((host, container))
    return out


def published(service: dict) -> set[int]:
    return {int(str(port).split(":")[0]) for port in service.get("ports", [])}


def test_compose_runs_the_server_prometheus_and_grafana_on_their_ports():
    services = compose()["services"]
    assert set(services) == {"bitmoji", "prometheus", "grafana"}
    assert published(services["bitmoji"]) == {50051, 9464}
    assert published(services["prometheus"]) == {9090}
    assert published(services["grafana"]) == {3000}
    assert services["bitmoji"]["build"] == "." and (ROOT / "Dockerfile").is_file()
    for name, image in (("prometheus", "prom/prometheus:v"), ("grafana", "grafana/grafana:")):
        assert services[name]["image"].startswith(image), name  # the official images, pinned (not latest)
        assert not services[name]["image"].endswith(":latest")


def test_compose_mounts_only_paths_that_exist():
    for name, service in compose()["services"].items():
        for host, container in mounts(service):
            path = (ROOT / host).resolve()
            if host == "./runs/demo/cnn":
                # the model is not in the repository: scripts/demo trains and exports it there
                demo = (ROOT / "scripts" / "demo").read_text()
                assert "OUT=${OUT:-runs/demo}" in demo and '--out "$OUT/cnn"' in demo
                continue
            assert path.exists() and ROOT in path.parents, f"{name}: {host} -> {container}"


def test_the_compose_server_serves_the_mounted_model_with_metrics_reachable_by_prometheus():
    services = compose()["services"]
    bitmoji = services["bitmoji"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "BITMOJI_MODEL=/models/model.pt" in dockerfile
    assert any(container == "/models" for _, container in mounts(bitmoji))
    config = parse_config([], environ={"BITMOJI_MODEL": "/models/model.pt", **bitmoji["environment"]})
    assert (config.port, config.metrics_port, config.metrics_host) == (50051, 9464, "0.0.0.0")
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"bitmoji:{config.metrics_port}"]


def test_compose_prometheus_and_grafana_find_their_files():
    services = compose()["services"]
    prometheus = dict((container, host) for host, container in mounts(services["prometheus"]))
    config_file = next(
        arg.split("=", 1)[1] for arg in services["prometheus"]["command"] if arg.startswith("--config.file=")
    )
    assert (ROOT / prometheus[str(Path(config_file).parent)] / Path(config_file).name).is_file()

    grafana = dict((container, host) for host, container in mounts(services["grafana"]))
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert (
        datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090" and datasource["isDefault"]
    )
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "bitmoji.yaml").read_text())["providers"]
    dashboards = ROOT / grafana[provider["options"]["path"]]
    assert (dashboards / "bitmoji.json").resolve() == DASHBOARD
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == provider["options"]["path"] and (dashboards / home.name).resolve() == DASHBOARD
