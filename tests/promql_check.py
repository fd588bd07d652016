"""Which metrics and labels the dashboard's and the alerts' PromQL needs, and whether an exposition has them.

Every expression (a Grafana panel target, a template variable's `label_values(...)`, an alert rule) is parsed
with `promql-parser` (the Rust PromQL parser of GreptimeDB, on PyPI), after Grafana's variables are replaced
by values PromQL accepts. The syntax tree is then walked and each node's output label set worked out, the
way Prometheus evaluates it:

- a selector must name a metric the exposition has (for a histogram, the `_bucket`/`_sum`/`_count` series
  it uses), and every label it matches on must be a label of that metric (or a target label Prometheus adds:
  job, instance); a matched value must be one the server can export where the server names them
  (status codes, refusal and drop reasons, load results);
- `by (...)`, `without (...)`, `on (...)`, `ignoring (...)` and `group_left/right (...)` may only name
  labels that the expression below them still has (after `sum by (method)` only `method` is left;
  `histogram_quantile` removes `le`; `label_replace` adds its destination);
- what the parser cannot express (a Grafana variable outside a string, say) fails the parse: nothing is
  skipped silently.

It does not evaluate anything: an expression that names the right series and labels may still compute the
wrong thing. `promtool` (where installed) and deploy/prometheus/alerts.test.yaml cover some of that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import promql_parser as pp
import yaml

from bitmoji.server import metrics as m
from bitmoji.v1 import classifier_pb2

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "bitmoji.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

TARGET_LABELS = frozenset({"job", "instance"})  # Prometheus adds these to every scraped series
# Series Prometheus makes itself for each target (not in any /metrics), with their labels.
SYNTHETIC = {name: frozenset() for name in ("up", "scrape_duration_seconds", "scrape_samples_scraped")}
# Grafana's interval variables, replaced by a duration so the expression parses.
GRAFANA_DURATIONS = re.compile(r"\$__rate_interval|\$__interval|\$__range|\$\{__rate_interval\}|\$\{__interval\}")
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")
WORDS = re.compile(r"^[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*$")  # a regex matcher that is a plain alternation

# The values the server exports for a label, where it names them: a matcher on any other value never matches.
STATUS_CODES = frozenset(code.name for code in grpc.StatusCode)
# The Open Inference Protocol's methods are read from its .proto, not its stubs: a process that imports the
# server's `inference` stubs cannot import tritonclient's (tests/e2e/test_kserve.py does).
_KSERVE_PROTO = Path(__file__).resolve().parents[1] / "proto" / "bitmoji" / "inference" / "grpc_service.proto"
METHODS = frozenset(  # the interceptor's `method` label: the RPC's name, of every service it counts
    [method.name for service in classifier_pb2.DESCRIPTOR.services_by_name.values() for method in service.methods]
    + re.findall(r"^\s*rpc (\w+)\(", _KSERVE_PROTO.read_text(), re.M)
)
KNOWN_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("bitmoji_requests_total", "code"): STATUS_CODES,
    ("bitmoji_requests_total", "method"): METHODS,
    **{(f"bitmoji_request_duration_seconds{suffix}", "method"): METHODS for suffix in ("_bucket", "_sum", "_count")},
    ("bitmoji_refusals_total", "reason"): frozenset(m.REFUSED_REASONS),
    ("bitmoji_items_dropped_total", "reason"): frozenset(m.DROP_REASONS),
    ("bitmoji_model_loads_total", "result"): frozenset({m.LOAD_OK, m.LOAD_FAILED}),
    ("bitmoji_shadow_skipped_total", "reason"): frozenset({"busy", "failed"}),  # literals in server/engine.py
}

Exposition = dict[str, frozenset[str]]  # series name (with _total, _bucket, ...) -> its label names


class _Unknown:
    """The labels of a metric that is not there: any label passes, so one missing metric is one message."""

    def __contains__(self, label) -> bool:
        return True

    def __sub__(self, other):
        return self

    def __rsub__(self, other):
        return frozenset()

    __or__ = __ror__ = __sub__

    def __iter__(self):
        return iter(())

    def __bool__(self) -> bool:
        return True


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class Query:
    where: str  # e.g. "dashboard panel 'Request rate' target A"
    expr: str


# -- the expressions -----------------------------------------------------------------------------------


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            queries.append(Query(f"dashboard panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append(Query(f"dashboard variable {variable['name']!r}", text))
    return queries


def alert_queries(path: Path = ALERTS) -> list[Query]:
    rules = yaml.safe_load(path.read_text())
    return [
        Query(f"alert {rule.get('alert') or rule.get('record')!r}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def all_queries() -> list[Query]:
    return dashboard_queries() + alert_queries()


def to_promql(expr: str) -> str:
    """Grafana's text as PromQL: interval variables become 5m (others may stand only inside strings)."""
    return GRAFANA_DURATIONS.sub("5m", expr)


# -- what an exposition has ------------------------------------------------------------------------------


def exposition_from_text(text: str) -> Exposition:
    """Series names and their label names, from /metrics text (only series with at least one sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in found.items()}


def declared_exposition() -> Exposition:
    """What server/metrics.py declares (no server needed): each metric's series names and label names."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    registry = CollectorRegistry()
    metrics = m.Metrics(registry)
    found: dict[str, frozenset[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = frozenset(metric._labelnames)
        name, kind = metric._name, metric._type
        if kind == "counter":
            found[f"{name}_total"] = labels
        elif kind == "histogram":
            found.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            found[name] = labels
    # process_*, python_gc_*, python_info: prometheus-client's own collectors, as they expose themselves
    for family in registry.collect():
        for sample in family.samples:
            if sample.name not in found:
                found[sample.name] = frozenset(sample.labels)
    return found


# -- the check -------------------------------------------------------------------------------------------


def check(query: Query, exposition: Exposition) -> list[str]:
    """What `query` needs that `exposition` lacks (an empty list: nothing), as messages naming the query."""
    problems: list[str] = []
    text = query.expr
    match = LABEL_VALUES.match(text)
    try:
        if match:  # Grafana's label_values(selector, label): the selector is PromQL, the label one of its labels
            have = _labels(pp.parse(to_promql(match["selector"])), exposition, problems) if match["selector"] else None
            if have is not None and match["label"] not in have:
                problems.append(
                    f"label {match['label']!r} is not on {match['selector'].strip()} (it has {_list(have)})"
                )
        else:
            _labels(pp.parse(to_promql(text)), exposition, problems)
    except ValueError as exc:
        problems.append(f"does not parse: {exc}")
    return [f"{query.where}: {problem}\n    {text}" for problem in problems]


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (for reports and for the tests' own checks)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            names.add(_selector_name(node) or "")

    match = LABEL_VALUES.match(expr)
    if match:
        if not match["selector"]:
            return names
        expr = match["selector"]
    pp.walk(pp.parse(to_promql(expr)), visit)
    names.discard("")
    return names


def _list(labels) -> str:
    if labels is UNKNOWN:
        return "unknown labels"
    return ", ".join(sorted(labels)) or "no labels"


def _selector_name(node) -> str | None:
    if node.name:
        return node.name
    return next((x.value for x in node.matchers.matchers if x.name == "__name__" and x.op == pp.MatchOp.Equal), None)


def _labels(node, exposition: Exposition, problems: list[str]) -> frozenset[str] | None:
    """The label names of the series `node` evaluates to (None: a scalar or a string), noting what is wrong."""
    if isinstance(node, pp.VectorSelector):
        return _selector(node, exposition, problems)
    if isinstance(node, pp.MatrixSelector):
        return _selector(node.vector_selector, exposition, problems)
    if isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return _labels(node.expr, exposition, problems)
    if isinstance(node, (pp.NumberLiteral, pp.StringLiteral)):
        return None
    if isinstance(node, pp.Call):
        return _call(node, exposition, problems)
    if isinstance(node, pp.AggregateExpr):
        return _aggregate(node, exposition, problems)
    if isinstance(node, pp.BinaryExpr):
        return _binary(node, exposition, problems)
    problems.append(f"the check does not know the node {type(node).__name__}")
    return frozenset()


def _selector(node, exposition: Exposition, problems: list[str]) -> frozenset[str]:
    name = _selector_name(node)
    if name is None:
        problems.append("a selector without a metric name")
        return frozenset()
    if name in SYNTHETIC:
        have = SYNTHETIC[name] | TARGET_LABELS
    elif name in exposition:
        have = exposition[name] | TARGET_LABELS
    else:
        problems.append(f"metric {name!r} is not in the exposition")
        return UNKNOWN
    matchers = list(node.matchers.matchers) + [x for group in node.matchers.or_matchers for x in group]
    for matcher in matchers:
        if matcher.name == "__name__":
            continue
        if matcher.name not in have:
            problems.append(f"{name} has no label {matcher.name!r} (it has {_list(have)})")
            continue
        known = KNOWN_VALUES.get((name, matcher.name))
        if known is None or "$" in matcher.value:
            continue
        if matcher.op in (pp.MatchOp.Equal, pp.MatchOp.NotEqual):
            values = [matcher.value]
        elif WORDS.match(matcher.value):
            values = matcher.value.split("|")
        else:
            continue  # a real regex: not checked
        for value in values:
            if value not in known:
                problems.append(f"{name}{{{matcher.name}}} is never {value!r} (the server exports {_list(known)})")
    return have


def _call(node, exposition: Exposition, problems: list[str]) -> frozenset[str] | None:
    func = node.func.name
    args = [_labels(arg, exposition, problems) for arg in node.args]
    vectors = [labels for labels in args if labels is not None]
    if func in ("histogram_quantile", "histogram_fraction"):
        inner = args[-1]
        if inner is not None and "le" not in inner:
            problems.append(f"{func} over series without 'le' (they have {_list(inner)})")
        return None if inner is None else inner - {"le"}
    if func in ("label_replace", "label_join"):
        inner = args[0] or frozenset()
        strings = [arg.val for arg in node.args[1:] if isinstance(arg, pp.StringLiteral)]
        dst, sources = strings[0], strings[2:] if func == "label_join" else strings[2:3]
        for source in sources:
            if source not in inner:
                problems.append(f"{func} reads label {source!r}, which is not there (there are {_list(inner)})")
        return inner | {dst}
    if func in ("absent", "absent_over_time"):
        # labels only from a plain selector's equality matchers (absent(x{job="a"} == 1) has none)
        selector = node.args[0]
        if isinstance(selector, pp.MatrixSelector):
            selector = selector.vector_selector
        if not isinstance(selector, pp.VectorSelector):
            return frozenset()
        return frozenset(
            x.name for x in selector.matchers.matchers if x.op == pp.MatchOp.Equal and x.name != "__name__"
        )
    if func in ("scalar", "time", "pi") or not vectors:
        return None
    if func == "vector":
        return frozenset()
    return vectors[0]  # rate, increase, changes, *_over_time, clamp, abs, ...: the labels of their argument


def _aggregate(node, exposition: Exposition, problems: list[str]) -> frozenset[str]:
    op = str(node.op)
    inner = _labels(node.expr, exposition, problems) or frozenset()
    if node.param is not None:
        _labels(node.param, exposition, problems)
    keeps_series = op in ("topk", "bottomk", "limitk", "limit_ratio")
    added = frozenset({node.param.val}) if op == "count_values" else frozenset()
    modifier = node.modifier
    if modifier is None:
        return (inner if keeps_series else frozenset()) | added
    named = frozenset(modifier.labels)
    for label in sorted(named - inner):
        problems.append(
            f"{op} {'by' if _is_by(modifier) else 'without'} ({label}): no such label below (there are {_list(inner)})"
        )
    if keeps_series:
        return inner
    return (named if _is_by(modifier) else inner - named) | added


def _is_by(modifier) -> bool:
    return modifier.type == pp.AggModifierType.By


def _binary(node, exposition: Exposition, problems: list[str]) -> frozenset[str] | None:
    left = _labels(node.lhs, exposition, problems)
    right = _labels(node.rhs, exposition, problems)
    if left is None or right is None:
        return right if left is None else left  # a scalar on one side: the vector's labels
    op = str(node.op)
    modifier = node.modifier
    matching = modifier.matching if modifier is not None else None
    if matching is not None:
        named = frozenset(matching.labels)
        if matching.type == pp.LabelModifierType.Include:  # on (...): on both sides
            for side, have in (("left", left), ("right", right)):
                for label in sorted(named - have):
                    problems.append(f"on ({label}): not on the {side} side (it has {_list(have)})")
        else:  # ignoring (...): on at least one side
            for label in sorted(named - left - right):
                problems.append(f"ignoring ({label}): on neither side")
    card = modifier.card if modifier is not None else None
    extra = frozenset(modifier.group_labels or ()) if modifier is not None else frozenset()
    if card == pp.VectorMatchCardinality.ManyToOne:  # group_left (extra): copied from the right
        for label in sorted(extra - right):
            problems.append(f"group_left ({label}): not on the right side (it has {_list(right)})")
        return left | extra
    if card == pp.VectorMatchCardinality.OneToMany:
        for label in sorted(extra - left):
            problems.append(f"group_right ({label}): not on the left side (it has {_list(left)})")
        return right | extra
    if op == "or":
        return left | right
    return left
