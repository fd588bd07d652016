"""The dashboard and the alerts against a real server's /metrics: every metric and label they use is exported.

A server (one process, and --workers 2) on a small repository of MLP versions does enough that every
series the monitoring uses exists: Classify calls shadowed by a version that always disagrees (the shadow
series), one call too big for the shadow's half of the queue (shadow skipped: busy), one too big for the
queue (RESOURCE_EXHAUSTED, refusals{queue_full}), an empty one (INVALID_ARGUMENT), a GradientProbe, and a
version whose file is broken (model_loads{result="failed"}). Then every expression of
deploy/grafana/bitmoji.json and deploy/prometheus/alerts.yaml is checked against the scrape by
tests/promql_check.py: a metric name, a histogram's _bucket/_sum/_count, or a label (in a selector, by, on,
group_left) that the scrape lacks fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from helpers import ROOT, free_port, image_input, scrape, start_server, synthetic_images, total, wait_until
from promql_check import LABEL_VALUES, Query, alert_queries, all_queries, check, dashboard_queries, metric_names

from bitmoji.core.modelfile import build_metadata, export_model
from bitmoji.trainer.models import build_model
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

QUEUE = 16  # the model's max_queue: a 17-item call is refused, a 9-item one is not shadowed (over half)


def export_mlp(path, *, flip: bool = False):
    """The test MLP (seed 0); `flip` negates its last layer, so every prediction is the other label."""
    torch.manual_seed(0)
    model = build_model("mlp")
    if flip:
        last = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.neg_()
            last.bias.neg_()
    metadata = build_metadata(architecture="mlp", class_names=["eva", "not_eva"], positive_class="eva", model=model)
    path.parent.mkdir(parents=True)
    return export_model(model, path, metadata)


def make_repository(repo: Path) -> Path:
    """bitmoji v1 (served), v2 (always the other label: the shadow), v3 (a broken file: a failed load)."""
    export_mlp(repo / "bitmoji" / "1" / "model.pt")
    export_mlp(repo / "bitmoji" / "2" / "model.pt", flip=True)
    (repo / "bitmoji" / "3").mkdir()
    (repo / "bitmoji" / "3" / "model.pt").write_bytes(b"not a TorchScript file")
    # the shadow from config.json: under --workers each worker keeps its own routing, so SetTraffic is refused there
    config = {"version_policy": {"all": {}}, "default_version": 1, "shadow": 2, "max_queue": QUEUE}
    (repo / "bitmoji" / "config.json").write_text(json.dumps(config))
    return repo


def exercise(channel, rounds: int = 1, pause: float = 0.0) -> None:
    """Calls that create every series the monitoring uses (see the module docstring)."""
    classifier = pb_grpc.ClassifierStub(channel)
    images = [image_input(data) for data in synthetic_images(QUEUE + 1)]
    for _ in range(rounds):
        for i in range(3):
            classifier.Classify(pb.ClassifyRequest(inputs=images[2 * i : 2 * i + 2]), timeout=30)
        classifier.Classify(pb.ClassifyRequest(inputs=images[: QUEUE // 2 + 1]), timeout=30)  # shadow busy
        for call, code in (
            (pb.ClassifyRequest(inputs=images), grpc.StatusCode.RESOURCE_EXHAUSTED),  # more than the queue
            (pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                classifier.Classify(call, timeout=30)
            assert refused.value.code() == code
        classifier.GradientProbe(pb.GradientProbeRequest(inputs=images[:1], targets=[1.0]), timeout=60)
        time.sleep(pause)


@pytest.fixture(scope="module", params=[(), ("--workers", "2")], ids=["one process", "two workers"])
def exposition(request, tmp_path_factory):
    """{series name: its label names} of a server that did a bit of everything (names with no sample left out).

    Also under --workers 2: prometheus-client's multiprocess mode exports other series (process_* per
    worker pid, no python_info, no _created), and the monitoring must work on both.
    """
    repo = make_repository(tmp_path_factory.mktemp("repository"))
    server = start_server(
        None, "--model-repository", str(repo), "--max-batch-delay-ms", "2", *request.param, timeout=120
    )
    try:
        # one channel, one connection: under --workers every call reaches the same worker
        with grpc.insecure_channel(server.target) as channel:
            exercise(channel)
        # the shadow runs after the caller's answer: wait for its comparisons
        samples = wait_until(server, lambda s: total(s, "bitmoji_shadow_comparisons_total") >= 6)
        assert total(samples, "bitmoji_shadow_disagreements_total") >= 6, "version 2 should disagree on every item"
        assert total(samples, "bitmoji_model_loads_total", result="failed") >= 1  # once per worker
        assert total(samples, "bitmoji_refusals_total", reason="queue_full") == 1
        samples = scrape(server)
    finally:
        assert server.stop() == 0, server.output()
    found: dict[str, set[str]] = {}
    for name, labels in samples:
        found.setdefault(name, set()).update(key for key, _ in labels)
    return {name: frozenset(labels) for name, labels in found.items()}


QUERIES = all_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_metric_and_label_the_monitoring_uses_is_in_the_scrape(exposition, query):
    problems = check(query, exposition)
    assert not problems, "\n".join(problems)


def test_the_check_fails_when_the_scrape_lacks_a_metric_or_a_label(exposition):
    # the e2e check can fail: a series missing from the scrape, or a label missing from a series, is found
    uses = [q for q in QUERIES if "bitmoji_queue_capacity" in metric_names(q.expr)]
    assert uses, "the dashboard and the alerts should use the queue capacity"
    without_metric = {name: labels for name, labels in exposition.items() if name != "bitmoji_queue_capacity"}
    for query in uses:
        assert any("'bitmoji_queue_capacity' is not in the exposition" in p for p in check(query, without_metric))
    without_label = {**exposition, "bitmoji_requests_total": exposition["bitmoji_requests_total"] - {"code"}}
    errors = next(q for q in QUERIES if q.where.startswith("alert 'BitmojiHighErrorRatio'"))
    assert any("has no label 'code'" in p for p in check(errors, without_label))
    misspelt = Query("misspelt", "sum by (le) (rate(bitmoji_batch_sizes_bucket[5m]))")
    assert check(misspelt, exposition)


# -- a real Prometheus --------------------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


def prometheus_api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # a bad query is a 400 with the error in the body
        return json.load(exc)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)")
def test_a_real_prometheus_evaluates_every_panel_and_rule_on_a_real_server(tmp_path):
    # The static check says the names exist; this says the expressions compute something: Prometheus scrapes
    # the server every second, then every panel query must return series and every rule evaluate cleanly.
    server = start_server(None, "--model-repository", str(make_repository(tmp_path / "repository")))
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": "bitmoji", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "w") as log:
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with grpc.insecure_channel(server.target) as channel:
            exercise(channel, rounds=30, pause=0.3)  # ~10 s: enough scrapes for rate() over 5 s windows
        empty, failed = [], []
        for query in dashboard_queries():
            expr = query.expr
            if expr.startswith("label_values("):
                selector, label = LABEL_VALUES.match(expr).group("selector", "label")
                expr = f"count by ({label}) ({selector})"
            expr = re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "5s"))  # every variable: All
            answer = prometheus_api(port, "query", query=expr)
            if answer["status"] != "success":
                failed.append(f"{query.where}: {answer.get('error')}\n    {expr}")
            elif not answer["data"]["result"]:  # every panel shows something after this run
                empty.append(f"{query.where}\n    {expr}")
        assert not failed, "\n".join(failed)
        assert not empty, "no data:\n" + "\n".join(empty)
        groups = prometheus_api(port, "rules")["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(rules) == {q.where.split("'")[1] for q in alert_queries()}
        for name, rule in rules.items():
            assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        # a broken version failed to load just now: that alert fires at once (for: 0m)
        firing = {alert["labels"]["alertname"] for alert in prometheus_api(port, "alerts")["data"]["alerts"]}
        assert "BitmojiModelLoadFailed" in firing
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        assert server.stop() == 0, server.output()
