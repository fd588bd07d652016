"""The Kubernetes manifests (deploy/kubernetes/) agree with the server:
no cluster runs here, so they are parsed and checked.

Each variant (the base, CPU; the `gpu/` overlay) is built the way kustomize
would for what these files use (resources, strategic-merge patches, image
tags, labels), then checked: the container's flags and BITMOJI_* variables are
a valid server configuration by the server's own parser; the probes call
grpc.health.v1 on the gRPC port and the health service names the server sets;
the grace periods add up; resources are set; the Services, the autoscaler and
the disruption budget point at the Deployment's pods. The last test breaks a
manifest in each of those ways and sees the checks fail.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bitmoji.server.config import ENV_PREFIX, ServerConfig, parse_config
from bitmoji.server.server import default_torch_threads
from bitmoji.v1 import classifier_pb2

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
CLASSIFIER = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
KSERVE = "inference.GRPCInferenceService"
HEALTH_NAMES = {"", CLASSIFIER, KSERVE, "bitmoji.v1.ModelRepository"}  # the health service names server/server.py sets
VARIANTS = {"cpu": DEPLOY, "gpu": DEPLOY / "gpu"}
SHUTDOWN_MARGIN_S = 5  # after the pre-stop window + the drain: the last batch, the process exit


# -- a small kustomize: what these manifests use --------------------------------------------


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strategic_merge(base, patch):
    """Kubernetes' strategic merge, as far as the patches here need it.

    Maps merge; lists of named maps (containers, env) merge by name; other lists (args, tolerations) are replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = lambda items: all(isinstance(x, dict) and "name" in x for x in items)  # noqa: E731
    if isinstance(base, list) and isinstance(patch, list) and base and named(base) and named(patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            at = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def build(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        # kustomize refuses a base whose directory holds the overlay using it ("cycle detected")
        assert not (path.is_dir() and directory.resolve().is_relative_to(path)), (
            f"{directory} builds on {path}, which contains it"
        )
        objects += build(path) if path.is_dir() else load(path)
    for patch in kustomization.get("patches", []):
        for change in load(directory / patch["path"]):
            at = [
                i
                for i, o in enumerate(objects)
                if (o["kind"], o["metadata"]["name"]) == (change["kind"], change["metadata"]["name"])
            ]
            assert len(at) == 1, f"patch {patch['path']} matches {len(at)} objects"
            objects[at[0]] = strategic_merge(objects[at[0]], change)
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in containers(obj, init=True):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for entry in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


def containers(obj: dict, *, init: bool = False) -> list[dict]:
    if obj.get("kind") != "Deployment":
        return []
    spec = obj["spec"]["template"]["spec"]
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(deployment: dict) -> dict:
    found = [c for c in containers(deployment) if c["name"] == "server"]
    assert len(found) == 1, "the Deployment needs one container named server"
    return found[0]


def container_env(container: dict) -> dict[str, str]:
    """The container's environment as the process sees it: plain values, and resource fields (the downward API)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "resourceFieldRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["resourceFieldRef"]
            assert ref.get("containerName", container["name"]) == container["name"], (
                f"{e['name']}: another container's {ref['resource']}"
            )
            kind, _, resource = ref["resource"].partition(".")
            assert resource == "cpu", f"{e['name']}: {ref['resource']} is not a CPU quantity"
            # Kubernetes divides by the divisor (default 1) and rounds up
            env[e["name"]] = str(math.ceil(cpu(container["resources"][kind][resource]) / cpu(ref.get("divisor", 1))))
    return env


def server_config(container: dict) -> ServerConfig:
    """The container's command line and environment, through the server's own parser (it exits on a bad flag)."""
    env = container_env(container)
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {
        ENV_PREFIX + f.upper() for f in ServerConfig.__dataclass_fields__
    }
    assert not unknown, f"variables the server does not read: {sorted(unknown)}"
    assert container.get("command") in (None, ["bitmoji-serve"]), "the image's entrypoint is bitmoji-serve"
    try:
        return parse_config([str(a) for a in container.get("args", [])], environ=env)
    except SystemExit:
        raise AssertionError(f"bitmoji-serve rejects args {container.get('args')} with env {env}") from None


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory(quantity) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(quantity))
    assert m and (m.group(2) in units or not m.group(2)), f"not a memory quantity: {quantity}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def prestop_sleep_s(container: dict) -> float:
    """A preStop sleep's seconds (0 without one)."""
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, f"preStop is not a sleep: {command}"
    return float(command[1])


# -- the checks (each raises AssertionError; the last test feeds them broken manifests) --------


def check_config(objects: list[dict]) -> ServerConfig:
    deployment = one(objects, "Deployment")
    container = server_container(deployment)
    config = server_config(container)
    ports = named_ports(container)
    assert ports.get("grpc") == config.port, f"port named grpc {ports.get('grpc')} != the server's --port {config.port}"
    assert ports.get("metrics") == config.metrics_port, (
        f"port named metrics {ports.get('metrics')} != --metrics-port {config.metrics_port}"
    )
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0", "listen on all interfaces inside a pod"
    mounts = {m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])}
    served = config.model_repository or str(Path(config.model or "").parent)
    assert served.rstrip("/") in mounts, f"the models ({served}) are on no mounted volume"
    # A pod sees its node's cores, not its CPU limit: the threads must be sized to the limit, by --cores
    # (BITMOJI_CORES) or by both thread counts, and fit it.
    limit = cpu(container["resources"]["limits"]["cpu"])
    assert config.cores is not None or None not in (config.torch_threads, config.decode_workers), (
        "set BITMOJI_CORES (the CPU limit) or both --torch-threads and --decode-workers: "
        "the default is the node's cores"
    )
    if config.cores is not None:
        assert config.cores <= math.ceil(limit), f"--cores {config.cores} vs a limit of {limit} cores"
    # resolved as the server resolves them
    # (here both thread counts, or --cores, are set: nothing falls back to this machine)
    device = torch.device("cpu" if config.device == "auto" else config.device)  # auto: CPU's default is the larger
    threads = config.torch_threads or default_torch_threads(device, cores=config.resolved_cores)
    assert threads <= math.ceil(limit), f"{threads} torch threads vs {limit} cores"
    workers = config.resolved_decode_workers
    assert workers <= math.ceil(limit), f"{workers} model threads (--decode-workers) vs {limit} cores"
    return config


def check_probes(objects: list[dict]) -> None:
    container = server_container(one(objects, "Deployment"))
    grpc_port = named_ports(container)["grpc"]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        assert probe and "grpc" in probe, f"{kind}: needs Kubernetes' gRPC probe (grpc.health.v1)"
        assert probe["grpc"]["port"] == grpc_port, (
            f"{kind} probes port {probe['grpc']['port']}, the gRPC port is {grpc_port}"
        )
        service = probe["grpc"].get("service", "")
        assert service in HEALTH_NAMES, f"{kind}: the server sets no health status for {service!r}"
    assert container["readinessProbe"]["grpc"].get("service") == CLASSIFIER, "readiness asks for the Classifier service"
    startup = container["startupProbe"]
    assert startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) >= 60, (
        "allow a minute or more for load and warm-up"
    )


def check_grace(objects: list[dict]) -> None:
    deployment = one(objects, "Deployment")
    container = server_container(deployment)
    config = server_config(container)
    total = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    # Calls still routed to the pod while the endpoints update must be served: a preStop sleep or the
    # server's own --shutdown-delay-s (health NOT_SERVING, serving on) gives the load balancers that time.
    window = prestop_sleep_s(container) + config.shutdown_delay_s
    assert window >= 1, "no pre-stop window: set --shutdown-delay-s (or a preStop sleep) so endpoints can update"
    assert total >= window + config.grace_period_s + SHUTDOWN_MARGIN_S, (
        f"terminationGracePeriodSeconds {total} < pre-stop window {window} + --grace-period-s "
        f"{config.grace_period_s} + {SHUTDOWN_MARGIN_S}"
    )


def check_resources(objects: list[dict]) -> None:
    for container in containers(one(objects, "Deployment"), init=True):
        resources = container.get("resources", {})
        for name in ("cpu", "memory"):
            request, limit = resources.get("requests", {}).get(name), resources.get("limits", {}).get(name)
            assert request is not None and limit is not None, f"{container['name']}: {name} request and limit"
            parse = cpu if name == "cpu" else memory
            assert 0 < parse(request) <= parse(limit), f"{container['name']}: {name} request {request} > limit {limit}"


def check_selection(objects: list[dict]) -> None:
    deployment = one(objects, "Deployment")
    name = deployment["metadata"]["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= labels.items(), "the Deployment's selector does not match its own pods"
    ports = named_ports(server_container(deployment))
    services = [o for o in objects if o["kind"] == "Service"]
    for service in services:
        selector = service["spec"].get("selector") or {}
        assert selector and selector.items() <= labels.items(), (
            f"Service {service['metadata']['name']} selects no pod: {selector}"
        )
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (
                f"Service {service['metadata']['name']}: no container port {target}"
            )
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert headless and any(p["name"] == "grpc" for p in headless[0]["spec"]["ports"]), (
        "a headless Service for client-side balancing"
    )
    assert any(s["spec"].get("clusterIP") != "None" for s in services), "a ClusterIP Service"
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", name), (
        f"the HPA targets {target}"
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu_metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu_metrics and cpu_metrics[0]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in server_container(deployment)["resources"]["requests"], (
        "CPU utilisation is relative to the CPU request"
    )
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the PodDisruptionBudget selects no pod"


def check_metrics(objects: list[dict]) -> None:
    deployment = one(objects, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    config = server_config(server_container(deployment))
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(config.metrics_port) != "0", (
        "scrape the port --metrics-port serves"
    )
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


CHECKS = (check_config, check_probes, check_grace, check_resources, check_selection, check_metrics)


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request) -> tuple[str, list[dict]]:
    return request.param, build(VARIANTS[request.param])


def test_every_manifest_parses_and_is_used():
    referenced: set[Path] = set()
    directories = list(VARIANTS.values())
    while directories:
        directory = directories.pop()
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        resources = [(directory / r).resolve() for r in kustomization.get("resources", [])]
        directories += [r for r in resources if r.is_dir()]
        referenced |= {r for r in resources if not r.is_dir()}
        referenced |= {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}
    files = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == referenced, f"manifests no kustomization uses: {sorted(map(str, files - referenced))}"
    for path in files:
        for doc in load(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: not a Kubernetes object"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without a name"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kubectl_kustomize_builds_the_objects_checked_here(name):
    # The checks here run on this file's own kustomize subset; kubectl's kustomize is what users run.
    result = subprocess.run(["kubectl", "kustomize", str(VARIANTS[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    def key(o):
        return o["kind"], o["metadata"]["name"]

    built = {key(o): o for o in yaml.safe_load_all(result.stdout)}
    ours = {key(o): o for o in build(VARIANTS[name])}
    assert built.keys() == ours.keys()
    server = server_container(built[("Deployment", "bitmoji-serve")])
    assert server == server_container(ours[("Deployment", "bitmoji-serve")])


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_manifests(variant, check):
    check(variant[1])


def test_variants_choose_their_device(variant):
    name, objects = variant
    container = server_container(one(objects, "Deployment"))
    config = server_config(container)
    limits = container["resources"]["limits"]
    if name == "gpu":
        assert config.device == "cuda", "the GPU variant passes --device cuda"
        assert int(limits.get("nvidia.com/gpu", 0)) == 1, "the GPU variant asks for one GPU"
        assert container["image"].endswith("-cuda"), f"the GPU variant runs the CUDA image, not {container['image']}"
        tolerations = one(objects, "Deployment")["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), "tolerate the GPU nodes' taint"
    else:
        assert config.device == "cpu" and "nvidia.com/gpu" not in limits
        assert not container["image"].endswith("-cuda")


def test_same_objects_in_both_variants():
    names = {v: sorted((o["kind"], o["metadata"]["name"]) for o in build(d)) for v, d in VARIANTS.items()}
    assert names["cpu"] == names["gpu"], "the GPU overlay replaces the CPU objects, one for one"


def _break(objects: list[dict], mutate) -> list[dict]:
    broken = copy.deepcopy(objects)
    mutate(broken)
    return broken


def _server(objects):
    return server_container(one(objects, "Deployment"))


def _pod(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def _annotations(objects):
    return one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]


BREAKAGES = {
    "readiness on another port": (check_probes, lambda o: _server(o)["readinessProbe"]["grpc"].update(port=50052)),
    "readiness on an unknown service": (
        check_probes,
        lambda o: _server(o)["readinessProbe"]["grpc"].update(service="bitmoji.Classifier"),
    ),
    "liveness over HTTP": (
        check_probes,
        lambda o: _server(o).update(livenessProbe={"httpGet": {"path": "/", "port": 9464}}),
    ),
    "an unknown flag": (check_config, lambda o: _server(o)["args"].append("--batch-size=4")),
    "an invalid value": (check_config, lambda o: _server(o)["args"].append("--max-batch-size=0")),
    "an unknown variable": (
        check_config,
        lambda o: _server(o)["env"].append({"name": "BITMOJI_MAX_BATCH", "value": "4"}),
    ),
    "port name and flag disagree": (
        check_config,
        lambda o: _server(o)["env"].append({"name": "BITMOJI_PORT", "value": "50052"}),
    ),
    "threads beyond the limit": (check_config, lambda o: _server(o)["args"].append("--torch-threads=8")),
    "cores beyond the limit": (check_config, lambda o: _server(o)["args"].append("--cores=8")),
    "threads sized to the node": (
        check_config,
        lambda o: _server(o).update(env=[e for e in _server(o)["env"] if e["name"] != "BITMOJI_CORES"]),
    ),
    "cores of another container": (
        check_config,
        lambda o: [
            e["valueFrom"]["resourceFieldRef"].update(containerName="fetch-models")
            for e in _server(o)["env"]
            if e["name"] == "BITMOJI_CORES"
        ],
    ),
    "grace period too short": (check_grace, lambda o: _pod(o).update(terminationGracePeriodSeconds=15)),
    "drain longer than the pod may take": (check_grace, lambda o: _server(o)["args"].append("--grace-period-s=60")),
    "no pre-stop window": (
        check_grace,
        lambda o: _server(o).update(args=[a for a in _server(o)["args"] if not a.startswith("--shutdown-delay-s")]),
    ),
    "models on no volume": (
        check_config,
        lambda o: _server(o).update(volumeMounts=[m for m in _server(o)["volumeMounts"] if m["name"] != "model"]),
    ),
    "no memory limit": (check_resources, lambda o: _server(o)["resources"]["limits"].pop("memory")),
    "request above limit": (check_resources, lambda o: _server(o)["resources"]["requests"].update(cpu="8")),
    "Service selects nothing": (
        check_selection,
        lambda o: [s["spec"]["selector"].update(app="x") for s in o if s["kind"] == "Service"],
    ),
    "HPA targets another Deployment": (
        check_selection,
        lambda o: one(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="x"),
    ),
    "scrape the gRPC port": (check_metrics, lambda o: _annotations(o).update({"prometheus.io/port": "50051"})),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checks_catch_broken_manifests(breakage):
    check, mutate = BREAKAGES[breakage]
    objects = build(DEPLOY)
    check(objects)  # the real manifests pass ...
    with pytest.raises(AssertionError):
        check(_break(objects, mutate))  # ... and this breakage does not
