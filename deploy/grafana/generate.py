#!/usr/bin/env python3
"""Write deploy/grafana/bitmoji.json, the bitmoji-serve Grafana dashboard, from the panel list below.

    python deploy/grafana/generate.py          # rewrite bitmoji.json
    python deploy/grafana/generate.py --check  # exit 1 if bitmoji.json is not what this script writes

The JSON is generated so that each panel is one readable line of intent (title, PromQL, unit) and the
layout, datasource and Grafana boilerplate are written once. Edit this file, not the JSON;
tests/test_monitoring_files.py fails when the two disagree. Every metric and label used here is defined in
server/metrics.py; tests/e2e/test_dashboards.py checks them against a real server's /metrics.

Standard library only (no grafanalib): it runs with any Python 3.11.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "bitmoji.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

# Selectors: the target filter, and the target filter plus the model version filter.
T = 'job=~"$job", instance=~"$instance"'
MV = f'{T}, model=~"$model", version=~"$version"'
SERVER_FAULTS = "INTERNAL|UNKNOWN|DATA_LOSS"  # the codes that mean a bug or a broken model, not the caller


def quantiles(metric: str, by: str, selector: str = MV, qs=(0.5, 0.9, 0.99)) -> list[dict]:
    """p50/p90/p99 of a histogram, per `by` (one target per quantile)."""
    legend = " ".join(f"{{{{{label}}}}}" for label in by.split(", "))
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in qs
    ]


def target(expr: str, legend: str = "", **extra) -> dict:
    return {"expr": expr, "legendFormat": legend or "__auto", **extra}


class Layout:
    """Places panels left to right on Grafana's 24-column grid, a new line when a panel does not fit."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.line_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self._add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self._newline()

    def panel(self, kind: str, title: str, description: str, targets: list[dict], *, w=8, h=8, **settings) -> None:
        if self.x + w > 24:
            self._newline()
        refs = "ABCDEFGHIJ"
        panel = {
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "targets": [{"datasource": DATASOURCE, "refId": refs[i], **t} for i, t in enumerate(targets)],
            **settings,
        }
        self._add(panel, w, h)

    def _add(self, panel: dict, w: int, h: int) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.line_height
            self.x, self.line_height = 0, 0


def timeseries(unit: str = "short", *, stack: bool = False, bars: bool = False, minimum=0, thresholds=None) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "fillOpacity": 30 if bars or stack else 10, "lineWidth": 1}
    if stack:
        custom["stacking"] = {"group": "A", "mode": "normal"}
    defaults: dict = {"unit": unit, "custom": custom}
    if minimum is not None:
        defaults["min"] = minimum
    if thresholds:
        defaults["thresholds"] = thresholds
        custom["thresholdsStyle"] = {"mode": "line+area"}
    return {
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(unit: str = "short", *, mappings=None, thresholds=None) -> dict:
    defaults: dict = {"unit": unit}
    if mappings:
        defaults["mappings"] = mappings
    if thresholds:
        defaults["thresholds"] = thresholds
    return {
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if thresholds else "value",
            "graphMode": "none",
            "textMode": "auto",
        },
    }


def table(hide: list[str]) -> dict:
    return {
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "organize", "options": {"excludeByName": {name: True for name in hide}}}],
    }


def steps(*pairs) -> dict:
    """Threshold steps: ("green", None), ("red", 0.8), ..."""
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in pairs]}


def build() -> dict:
    d = Layout()

    d.row("Overview")
    d.panel(
        "stat", "Serving", "bitmoji_serving per instance: 1 while health says SERVING (0 warming up or draining).",
        [target(f"min by (instance) (bitmoji_serving{{{T}}})", "{{instance}}")], w=6, h=4,
        **stat(
            mappings=[{"type": "value", "options": {"0": {"text": "NOT SERVING", "color": "red"},
                                                    "1": {"text": "SERVING", "color": "green"}}}],
            thresholds=steps(("red", None), ("green", 1)),
        ),
    )  # fmt: skip
    d.panel(
        "stat", "Requests/s", "All RPCs finished per second (health and reflection are not counted).",
        [target(f"sum(rate(bitmoji_requests_total{{{MV}}}[{RATE}]))", "requests/s")], w=4, h=4, **stat("reqps"),
    )  # fmt: skip
    d.panel(
        "stat", "Server-fault ratio", f"Share of RPCs that ended {SERVER_FAULTS} (a bug or a broken model).",
        [target(  # `or vector(0)`: 0 %, not "No data", while no call has failed
            f'(sum(rate(bitmoji_requests_total{{{MV}, code=~"{SERVER_FAULTS}"}}[{RATE}])) or vector(0)) '
            f"/ sum(rate(bitmoji_requests_total{{{MV}}}[{RATE}]))", "server faults",
        )], w=4, h=4, **stat("percentunit", thresholds=steps(("green", None), ("orange", 0.001), ("red", 0.01))),
    )  # fmt: skip
    d.panel(
        "stat", "Classify p99", "99th percentile of Classify latency over the selected instances and versions.",
        [target(
            "histogram_quantile(0.99, sum by (le) "
            f'(rate(bitmoji_request_duration_seconds_bucket{{{MV}, method="Classify"}}[{RATE}])))', "p99",
        )], w=4, h=4, **stat("s", thresholds=steps(("green", None), ("orange", 0.25), ("red", 0.5))),
    )  # fmt: skip
    d.panel(
        "stat", "Uptime", "Time since the newest process of each instance started (a worker restart resets it).",
        [target(f"time() - max by (instance) (process_start_time_seconds{{{T}}})", "{{instance}}")],
        w=6, h=4, **stat("s"),
    )  # fmt: skip
    d.panel(
        "table", "Build", "bitmoji_build_info: the server's version and what it runs on, per instance.",
        [target(f"max by (instance, version, torch, grpcio, python) (bitmoji_build_info{{{T}}})",
                format="table", instant=True, range=False)],
        w=12, h=5, **table(["Time", "Value"]),
    )  # fmt: skip
    d.panel(
        "table", "Loaded model versions", "bitmoji_model_info: every loaded version's build, device and architecture.",
        [target(f"max by (instance, model, version, build, device, architecture) (bitmoji_model_info{{{MV}}} == 1)",
                format="table", instant=True, range=False)],
        w=12, h=5, **table(["Time", "Value"]),
    )  # fmt: skip

    d.row("Requests")
    d.panel(
        "timeseries", "Request rate by method and code", "bitmoji_requests_total per second.",
        [target(f"sum by (method, code) (rate(bitmoji_requests_total{{{MV}}}[{RATE}]))", "{{method}} {{code}}")],
        **timeseries("reqps"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Errors by code", "RPCs that did not end OK, per second, by method and status code. "
        "INVALID_ARGUMENT/NOT_FOUND are the caller's; RESOURCE_EXHAUSTED overload; UNAVAILABLE a drain or an unload.",
        [target(f'sum by (method, code) (rate(bitmoji_requests_total{{{MV}, code!="OK"}}[{RATE}]))',
                "{{method}} {{code}}")],
        **timeseries("reqps", stack=True),
    )  # fmt: skip
    d.panel(
        "timeseries", "Refusals by reason", "Calls refused before they were served: queue_full and concurrency "
        "(RESOURCE_EXHAUSTED), shutdown and unloading (UNAVAILABLE). Not per model: refused before one is chosen.",
        [target(f"sum by (reason) (rate(bitmoji_refusals_total{{{T}}}[{RATE}]))", "{{reason}}")],
        **timeseries("reqps", stack=True),
    )  # fmt: skip
    d.panel(
        "timeseries", "Requests by model version", "Finished RPCs per second by the version that served them "
        "(empty: failed before one was chosen). Shows canary traffic splits.",
        [target(f"sum by (model, version) (rate(bitmoji_requests_total{{{MV}}}[{RATE}]))", "{{model}} v{{version}}")],
        **timeseries("reqps", stack=True),
    )  # fmt: skip
    d.panel(
        "timeseries", "In-flight RPCs", "bitmoji_inflight_requests: calls being handled now, per instance.",
        [target(f"sum by (instance) (bitmoji_inflight_requests{{{T}}})", "{{instance}}")],
        **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Items classified", "bitmoji_items_total: items run through the model per second "
        "(Classify, StreamClassify, ModelInfer; shadow runs included).",
        [target(f"sum by (model, version) (rate(bitmoji_items_total{{{MV}}}[{RATE}]))", "{{model}} v{{version}}")],
        **timeseries("ops"),
    )  # fmt: skip

    d.row("Latency")
    d.panel(
        "timeseries", "Request latency by method", "p50/p90/p99 of bitmoji_request_duration_seconds. "
        "StreamClassify is a whole stream's lifetime, not one message's.",
        quantiles("bitmoji_request_duration_seconds", "method"), w=12, **timeseries("s"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Classify latency by model version", "p50/p90/p99 of Classify per model version.",
        quantiles("bitmoji_request_duration_seconds", "model, version", f'{MV}, method="Classify"'),
        w=12, **timeseries("s"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Protobuf parse and serialise (p99)", "bitmoji_serialization_duration_seconds: parse of a "
        "request, serialisation of a response, on the event loop.",
        quantiles("bitmoji_serialization_duration_seconds", "method, direction", T, qs=(0.99,)),
        w=12, **timeseries("s"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Where a Classify item's time goes (mean)", "Mean decode, queue wait and per-item forward "
        "time: forward time per batch divided by the items in it.",
        [
            target(f"sum(rate(bitmoji_preprocess_duration_seconds_sum{{{MV}}}[{RATE}])) "
                   f"/ sum(rate(bitmoji_preprocess_duration_seconds_count{{{MV}}}[{RATE}]))", "decode + preprocess"),
            target(f"sum(rate(bitmoji_queue_wait_seconds_sum{{{MV}}}[{RATE}])) "
                   f"/ sum(rate(bitmoji_queue_wait_seconds_count{{{MV}}}[{RATE}]))", "queue wait"),
            target(f"sum(rate(bitmoji_forward_duration_seconds_sum{{{MV}}}[{RATE}])) "
                   f"/ sum(rate(bitmoji_items_total{{{MV}}}[{RATE}]))", "forward per item"),
        ],
        w=12, **timeseries("s", stack=True),
    )  # fmt: skip

    d.row("Queue and batching")
    d.panel(
        "timeseries", "Queue depth", "bitmoji_queue_depth: items accepted and not yet in a batch, per version "
        "(summed over the instances).",
        [target(f"sum by (model, version) (bitmoji_queue_depth{{{MV}}})", "{{model}} v{{version}}")],
        **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Queue saturation", "bitmoji_queue_depth / bitmoji_queue_capacity (--max-queue), the fullest "
        "instance per version. At 1 calls get RESOURCE_EXHAUSTED (queue_full); the alert fires above 0.8.",
        [target(f"max by (model, version) (bitmoji_queue_depth{{{MV}}} / bitmoji_queue_capacity{{{MV}}})",
                "{{model}} v{{version}}")],
        **timeseries("percentunit", thresholds=steps(("green", None), ("orange", 0.5), ("red", 0.8))),
    )  # fmt: skip
    d.panel(
        "timeseries", "Queue wait", "p50/p90/p99 of bitmoji_queue_wait_seconds: an item's wait from its call's "
        "arrival to its batch starting.",
        quantiles("bitmoji_queue_wait_seconds", "model, version"), **timeseries("s"),
    )  # fmt: skip
    d.panel(
        "heatmap", "Batch size distribution", "bitmoji_batch_size: how many items each executed batch held.",
        [target(f"sum by (le) (increase(bitmoji_batch_size_bucket{{{MV}}}[{RATE}]))", "{{le}}", format="heatmap")],
        w=12,
        fieldConfig={"defaults": {}, "overrides": []},
        options={
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": "short"},
            "rowsFrame": {"layout": "auto"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
    )  # fmt: skip
    d.panel(
        "timeseries", "Mean batch size", "Items per executed batch: bitmoji_batch_size_sum / _count.",
        [target(f"sum by (model, version) (rate(bitmoji_batch_size_sum{{{MV}}}[{RATE}])) "
                f"/ sum by (model, version) (rate(bitmoji_batch_size_count{{{MV}}}[{RATE}]))",
                "{{model}} v{{version}}")],
        w=12, **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Items dropped by reason", "bitmoji_items_dropped_total: accepted items never run because "
        "their call was cancelled, passed its deadline, or another item of it failed.",
        [target(f"sum by (model, version, reason) (rate(bitmoji_items_dropped_total{{{MV}}}[{RATE}]))",
                "{{model}} v{{version}} {{reason}}")],
        w=24, h=7, **timeseries("ops", stack=True),
    )  # fmt: skip

    d.row("Model time")
    d.panel(
        "timeseries", "Forward pass", "p50/p90/p99 of bitmoji_forward_duration_seconds: one batched forward pass, "
        "copies to and from the device included.",
        quantiles("bitmoji_forward_duration_seconds", "model, version"), w=12, **timeseries("s"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Decode and preprocess", "p50/p90/p99 of bitmoji_preprocess_duration_seconds: image decode "
        "and resize (or tensor checks) of one item.",
        quantiles("bitmoji_preprocess_duration_seconds", "model, version"), w=12, **timeseries("s"),
    )  # fmt: skip

    d.row("Models")
    d.panel(
        "timeseries", "Model memory", "bitmoji_model_memory_bytes: resident memory each loaded version added to "
        "its server process when it loaded (the largest instance).",
        [target(f"max by (model, version) (bitmoji_model_memory_bytes{{{MV}}})", "{{model}} v{{version}}")],
        **timeseries("bytes"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Model loads by result", "bitmoji_model_loads_total: loads and in-place reloads; failed "
        "ones replaced nothing (the old version serves on).",
        [target(f'sum by (model, result) (increase(bitmoji_model_loads_total{{{T}, model=~"$model"}}[{RATE}]))',
                "{{model}} {{result}}")],
        **timeseries(bars=True),
    )  # fmt: skip
    d.panel(
        "timeseries", "Gradient probes by loss", "bitmoji_probes_total: GradientProbe computations per second.",
        [target(f"sum by (model, version, loss) (rate(bitmoji_probes_total{{{MV}}}[{RATE}]))",
                "{{model}} v{{version}} {{loss}}")],
        **timeseries("ops"),
    )  # fmt: skip

    d.row("Shadow traffic")
    shadow = "model, version, shadow_version"
    d.panel(
        "timeseries", "Shadow disagreement ratio", "Share of shadowed items whose predicted label differs between "
        "the serving version and its shadow. The alert fires above 0.05.",
        [target(f"sum by ({shadow}) (rate(bitmoji_shadow_disagreements_total{{{MV}}}[{RATE}])) "
                f"/ sum by ({shadow}) (rate(bitmoji_shadow_comparisons_total{{{MV}}}[{RATE}]))",
                "{{model}} v{{version}} vs v{{shadow_version}}")],
        **timeseries("percentunit", thresholds=steps(("green", None), ("red", 0.05))),
    )  # fmt: skip
    d.panel(
        "timeseries", "Shadow logit difference", "p50/p90/p99 of |logit(serving) - logit(shadow)| per item.",
        quantiles("bitmoji_shadow_logit_difference", shadow), **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Shadowed and skipped", "Items compared per second, and calls not shadowed (busy: the "
        "shadow's queue was over half full; failed: it raised).",
        [
            target(f"sum by ({shadow}) (rate(bitmoji_shadow_comparisons_total{{{MV}}}[{RATE}]))",
                   "compared {{model}} v{{version}} vs v{{shadow_version}}"),
            target(f'sum by (model, reason) (rate(bitmoji_shadow_skipped_total{{{T}, model=~"$model"}}[{RATE}]))',
                   "skipped {{model}} {{reason}}"),
        ],
        **timeseries("ops"),
    )  # fmt: skip

    d.row("Process")
    d.panel(
        "timeseries", "Serving", "bitmoji_serving per instance over time (the minimum over its workers).",
        [target(f"min by (instance) (bitmoji_serving{{{T}}})", "{{instance}}")],
        **timeseries(minimum=0, thresholds=steps(("red", None), ("green", 1))),
    )  # fmt: skip
    d.panel(
        "timeseries", "Resident memory", "process_resident_memory_bytes per instance (its workers summed).",
        [target(f"sum by (instance) (process_resident_memory_bytes{{{T}}})", "{{instance}}")],
        **timeseries("bytes"),
    )  # fmt: skip
    d.panel(
        "timeseries", "CPU", "process_cpu_seconds_total per second: cores busy, per instance (workers summed).",
        [target(f"sum by (instance) (rate(process_cpu_seconds_total{{{T}}}[{RATE}]))", "{{instance}}")],
        **timeseries("short"),
    )  # fmt: skip
    d.panel(
        "timeseries", "Open file descriptors", "process_open_fds per instance (workers summed).",
        [target(f"sum by (instance) (process_open_fds{{{T}}})", "{{instance}}")],
        **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Torch threads", "bitmoji_torch_threads: torch intra-op threads (summed over the workers).",
        [target(f"sum by (instance) (bitmoji_torch_threads{{{T}}})", "{{instance}}")],
        **timeseries(),
    )  # fmt: skip
    d.panel(
        "timeseries", "Process starts", "Restarts of an instance's processes in the window (a new start time).",
        [target(f"changes(max by (instance) (process_start_time_seconds{{{T}}})[{RATE}:])", "{{instance}}")],
        **timeseries(bars=True),
    )  # fmt: skip

    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "description": "bitmoji-serve: requests, latency, batching, models, shadow traffic, process. "
        "Generated by deploy/grafana/generate.py.",
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": d.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["bitmoji", "grpc", "pytorch"],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            variable("job", "label_values(bitmoji_build_info, job)"),
            variable("instance", 'label_values(bitmoji_build_info{job=~"$job"}, instance)'),
            variable("model", f"label_values(bitmoji_model_info{{{T}}}, model)"),
            variable("version", f'label_values(bitmoji_model_info{{{T}, model=~"$model"}}, version)'),
        ]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "bitmoji-serve",
        "uid": "bitmoji-serve",
        "version": 1,
        "weekStart": "",
    }  # fmt: skip


def variable(name: str, query: str) -> dict:
    """A multi-select query variable; "All" is `.*`, which also matches the empty model of refused calls."""
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable", "qryType": 1},
        "refresh": 2,  # on time range change: a new version appears without reloading the dashboard
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
        "regex": "",
        "sort": 1,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
