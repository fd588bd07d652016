"""Security: TLS and mutual TLS with certificates made here, bearer tokens (and GradientProbe's own),
the metrics endpoint's address, the trust model of loading, and logs free of payloads and tokens.

Two servers serve the module: `guarded` (TLS, a token from a file, a probe token from the
environment, metrics on 127.0.0.2, DEBUG logging) and `mutual` (mutual TLS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import image_input, rpc_error, small_image, start_server, tensor_input

from bitmoji.client import BitmojiClient, BitmojiError
from bitmoji.server.config import ServerConfig
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TOKEN = "tok-7f3a9c-caller"
PROBE_TOKEN = "tok-51d2e8-prober"
MARKER = b"PAYLOAD-MARKER-d41d8cd9"
CLASSIFY = "/bitmoji.v1.Classifier/Classify"


# -- certificates ----------------------------------------------------------------------


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _key_and_request(directory: Path, name: str) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        csr,
    )
    return key, csr


def _sign(directory: Path, name: str, ca: str, extensions: str) -> Path:
    key, csr = _key_and_request(directory, name)
    cert, ext = directory / f"{name}.crt", directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        directory / f"{ca}.crt",
        "-CAkey",
        directory / f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    return cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA; a server certificate for 127.0.0.1 and a client certificate it signed;
    a second CA and a rogue client of it.
    """
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={ca}",
            "-keyout",
            d / f"{ca}.key",
            "-out",
            d / f"{ca}.crt",
        )
    _sign(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _sign(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _sign(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return d


def read(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


@pytest.fixture(scope="module")
def guarded(pki, mlp_model_file, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_server(
        mlp_model_file,
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--auth-token-file",
        str(token_file),
        "--metrics-host",
        "127.0.0.2",
        "--log-level",
        "DEBUG",
        "--max-batch-size",
        "4",
        env={"BITMOJI_PROBE_TOKEN": PROBE_TOKEN},
    )
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def mutual(pki, mlp_model_file):
    server = start_server(
        mlp_model_file,
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.crt"),
        "--max-batch-size",
        "4",
    )
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


def secure_channel(server, pki, **client_cert) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(read(pki, "ca.crt"), **client_cert)
    return grpc.secure_channel(server.target, credentials)


def auth(token: str | None = TOKEN) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- TLS and mutual TLS -------------------------------------------------------------------


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(guarded, pki):
    with BitmojiClient(guarded.target, root_certificates=read(pki, "ca.crt"), token=TOKEN, timeout=30) as client:
        assert len(client.classify([small_image(64)])) == 1
        assert client.health() == "SERVING"
    for refused in (
        BitmojiClient(guarded.target, token=TOKEN, retries=0, timeout=5),  # plaintext
        BitmojiClient(
            guarded.target, tls=True, token=TOKEN, retries=0, timeout=5
        ),  # the system's roots do not know our CA
    ):
        with refused, pytest.raises(BitmojiError) as info:
            refused.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "TLS" in guarded.output().split("ready on", 1)[1].splitlines()[0]


def test_mutual_tls_requires_a_client_certificate_signed_by_the_configured_ca(mutual, pki):
    with BitmojiClient(
        mutual.target,
        root_certificates=read(pki, "ca.crt"),
        private_key=read(pki, "client.key"),
        certificate_chain=read(pki, "client.crt"),
        timeout=30,
    ) as client:
        assert len(client.classify([small_image(64)])) == 1
    for what, kwargs in {
        "no client certificate": {},
        "a certificate of another CA": {
            "private_key": read(pki, "rogue.key"),
            "certificate_chain": read(pki, "rogue.crt"),
        },
    }.items():
        with BitmojiClient(
            mutual.target, root_certificates=read(pki, "ca.crt"), retries=0, timeout=5, **kwargs
        ) as client:
            with pytest.raises(BitmojiError) as info:
                client.model_info()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, what
    with grpc.insecure_channel(mutual.target) as channel:
        assert (
            rpc_error(pb_grpc.ClassifierStub(channel).GetModelInfo, pb.GetModelInfoRequest(), timeout=5).code()
            == grpc.StatusCode.UNAVAILABLE
        )


def test_client_cli_takes_client_certificates(mutual, pki):
    from bitmoji.client.cli import main

    common = ["--target", mutual.target, "--ca-file", str(pki / "ca.crt"), "--timeout", "5"]
    assert main([*common, "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"), "health"]) == 0
    assert main([*common, "health"]) == 1
    assert main([*common, "--cert", str(pki / "client.crt"), "health"]) == 1  # --cert without --key


# -- tokens -------------------------------------------------------------------------------


def test_calls_without_the_right_token_are_unauthenticated_and_health_stays_open(guarded, pki):
    with secure_channel(guarded, pki) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(inputs=[image_input(small_image(64))])
        for metadata, message in (
            ((), "missing bearer token"),
            (auth("tok-wrong"), "invalid bearer token"),
            (auth(TOKEN + "x"), "invalid bearer token"),
            ((("authorization", f"Basic {TOKEN}"),), "missing bearer token"),
            ((("x-api-key", TOKEN),), "missing bearer token"),
        ):
            error = rpc_error(stub.Classify, request, metadata=metadata, timeout=10)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and message in error.details(), (
                metadata,
                error.details(),
            )
        assert (
            rpc_error(stub.GetModelInfo, pb.GetModelInfoRequest(), timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
        )
        stream = stub.StreamClassify(iter([request]), timeout=10)
        assert rpc_error(list, stream).code() == grpc.StatusCode.UNAUTHENTICATED
        # reflection describes the API: behind the token too
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health is for load balancers and probes, which send no tokens
        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        # the right token (or the probe token, which covers everything) gets through
        assert stub.Classify(request, metadata=auth(), timeout=30).model_version
        assert stub.Classify(request, metadata=auth(PROBE_TOKEN), timeout=30).model_version
        assert len(list(stub.StreamClassify(iter([request]), metadata=auth(), timeout=30))) == 1
    with urllib.request.urlopen(f"http://127.0.0.2:{guarded.metrics_port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    refused = re.search(
        r'bitmoji_requests_total\{code="UNAUTHENTICATED",method="Classify",model="",version=""\} (\S+)', scraped
    )
    assert refused and float(refused.group(1)) >= 5, "refused calls are counted"


def test_gradient_probe_needs_its_own_token(guarded, pki):
    probe = pb.GradientProbeRequest(inputs=[image_input(small_image(64))], targets=[1.0])
    with secure_channel(guarded, pki) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        error = rpc_error(stub.GradientProbe, probe, metadata=auth(TOKEN), timeout=30)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "probe token" in error.details()
        assert rpc_error(stub.GradientProbe, probe, timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            rpc_error(stub.GradientProbe, probe, metadata=auth("nope"), timeout=30).code()
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.GradientProbe(probe, metadata=auth(PROBE_TOKEN), timeout=60).parameters


# -- the metrics endpoint ------------------------------------------------------------------


def _listening(pid: int, port: int) -> set[str]:
    """Addresses a process's network namespace listens on at `port` (IPv4, from /proc)."""
    found = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_metrics_bind_where_told_and_to_loopback_by_default(guarded, mutual):
    assert ServerConfig(model="m.pt").metrics_host == "127.0.0.1" and ServerConfig(model="m.pt").host == "127.0.0.1"
    assert _listening(mutual.proc.pid, mutual.metrics_port) == {"127.0.0.1"}  # the default
    assert _listening(guarded.proc.pid, guarded.metrics_port) == {"127.0.0.2"}  # --metrics-host 127.0.0.2
    with urllib.request.urlopen(f"http://127.0.0.2:{guarded.metrics_port}/metrics", timeout=10) as response:
        assert b"bitmoji_requests_total" in response.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{guarded.metrics_port}/metrics", timeout=5)


# -- loading: the trust model ------------------------------------------------------------------


# -- logs -------------------------------------------------------------------------------------


def test_logs_never_contain_payloads_or_tokens_even_at_debug(guarded, pki):
    """Runs last in this module: it stops `guarded` to read everything it logged."""
    with secure_channel(guarded, pki) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        hostile = [
            pb.ClassifyRequest(inputs=[image_input(MARKER)]),  # not an image
            pb.ClassifyRequest(inputs=[image_input(b"\x89PNG\r\n\x1a\n" + MARKER * 4)]),  # a broken PNG
            pb.ClassifyRequest(inputs=[image_input(small_image(32)[:60] + MARKER)]),  # truncated, marker inside
            pb.ClassifyRequest(
                inputs=[pb.Input(tensor=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[len(MARKER)], data=MARKER))]
            ),
            pb.ClassifyRequest(inputs=[tensor_input(torch.zeros(3, 128, 128))]),  # fine
        ]
        for request in hostile:
            for metadata in (auth(), auth("WRONG-" + TOKEN), auth(MARKER.decode())):
                try:
                    stub.Classify(request, metadata=metadata, timeout=30)
                except grpc.RpcError:
                    pass
        probe = pb.GradientProbeRequest(inputs=[image_input(MARKER)], targets=[1.0])
        for metadata in (auth(), auth(PROBE_TOKEN)):
            try:
                stub.GradientProbe(probe, metadata=metadata, timeout=30)
            except grpc.RpcError:
                pass
    assert guarded.stop() == 0
    output = guarded.output()
    assert "refused: UNAUTHENTICATED" in output and "refused: PERMISSION_DENIED" in output  # DEBUG lines were written
    for secret in (TOKEN, PROBE_TOKEN, MARKER.decode(), MARKER.hex(), repr(MARKER)[2:-1]):
        assert secret not in output, f"{secret!r} in the server's log"
    assert os.environ.get("BITMOJI_PROBE_TOKEN") is None  # the test did not leak it into its own environment either
