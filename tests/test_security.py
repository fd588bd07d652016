"""Who may call the server, in-process: token rules (constant-time, per method), token and TLS configuration,
files a request can never name, and a checkpoint whose pickle would run code. The same rules over real gRPC
are tests/e2e/test_hardening_security.py's."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmoji.server.config import ServerConfig, parse_config
from bitmoji.server.security import PROBE_METHOD, SecurityConfigError, TokenCheck, server_credentials, tokens
from bitmoji.v1 import classifier_pb2 as pb

CLASSIFY = "/bitmoji.v1.Classifier/Classify"
LOAD = "/bitmoji.v1.ModelRepository/LoadModel"


def test_token_rules_and_constant_time_comparison():
    both = TokenCheck("a-token", "p-token")
    all3 = TokenCheck("a-token", "p-token", "m-token")
    meta = lambda value: (("authorization", value),)  # noqa: E731
    cases = [
        (both, CLASSIFY, meta("Bearer a-token"), None),
        (both, CLASSIFY, meta("bearer   a-token  "), None),  # the scheme is case-insensitive
        (both, CLASSIFY, meta("Bearer p-token"), None),
        (both, CLASSIFY, meta("Bearer a-toke"), grpc.StatusCode.UNAUTHENTICATED),
        (both, CLASSIFY, meta("Bearer "), grpc.StatusCode.UNAUTHENTICATED),
        (both, CLASSIFY, (), grpc.StatusCode.UNAUTHENTICATED),
        (both, PROBE_METHOD, meta("Bearer a-token"), grpc.StatusCode.PERMISSION_DENIED),
        (both, PROBE_METHOD, meta("Bearer p-token"), None),
        (both, PROBE_METHOD, meta("Bearer x"), grpc.StatusCode.UNAUTHENTICATED),
        (both, "/grpc.health.v1.Health/Check", (), None),
        (both, "/grpc.health.v1.Health/Watch", (), None),
        (both, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", (), grpc.StatusCode.UNAUTHENTICATED),
        (
            TokenCheck("a-token", None),
            PROBE_METHOD,
            meta("Bearer a-token"),
            None,
        ),  # no probe token: the normal one
        (TokenCheck(None, "p-token"), CLASSIFY, (), None),  # only the probe is guarded
        (TokenCheck(None, "p-token"), PROBE_METHOD, (), grpc.StatusCode.UNAUTHENTICATED),
        # changing what is served needs the management token; listing models needs the normal one
        (both, LOAD, meta("Bearer a-token"), grpc.StatusCode.PERMISSION_DENIED),  # no management token: off
        (all3, LOAD, meta("Bearer m-token"), None),
        (all3, LOAD, meta("Bearer a-token"), grpc.StatusCode.PERMISSION_DENIED),
        (all3, LOAD, meta("Bearer p-token"), grpc.StatusCode.PERMISSION_DENIED),
        (all3, LOAD, (), grpc.StatusCode.UNAUTHENTICATED),
        (
            all3,
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            meta("Bearer a-token"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (all3, "/bitmoji.v1.ModelRepository/ListModels", meta("Bearer a-token"), None),
        (all3, "/bitmoji.v1.ModelRepository/ListModels", (), grpc.StatusCode.UNAUTHENTICATED),
        (all3, CLASSIFY, meta("Bearer m-token"), None),  # the management token works everywhere
        (TokenCheck(None, None, "m-token"), CLASSIFY, (), None),  # only management is guarded
        (TokenCheck(None, None, "m-token"), LOAD, (), grpc.StatusCode.UNAUTHENTICATED),
    ]
    for interceptor, method, metadata, expected in cases:
        refusal = interceptor.check(method, metadata)
        assert (refusal and refusal[0]) == expected, (method, metadata, refusal)
    import inspect

    from bitmoji.server import security

    assert "hmac.compare_digest" in inspect.getsource(security._matches)


def _presented(header: str) -> str | None:
    scheme, _, credentials = header.strip().partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "", "Basic ", "Token "]),
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["Zq9-secret", " Pr0be-secret ", "Zq9-secre", "Zq9-secret\x00", "Pr0be-secret Zq9-secret"]),
    ),
)
def test_random_authorization_headers_pass_only_with_a_token(scheme, value):
    interceptor = TokenCheck("Zq9-secret", "Pr0be-secret")
    header = scheme + value
    presented = _presented(header)
    for method, accepted in ((CLASSIFY, ("Zq9-secret", "Pr0be-secret")), (PROBE_METHOD, ("Pr0be-secret",))):
        refusal = interceptor.check(method, (("authorization", header),))
        assert (refusal is None) == (presented in accepted), (method, header, refusal)


def test_token_and_tls_configuration(tmp_path):
    def config(argv, env=None):
        return parse_config(["--model", "m.pt", *argv], environ=env or {})

    assert config([], {"BITMOJI_AUTH_TOKEN": ""}).auth_token is None  # an empty variable means unset
    assert config([], {"BITMOJI_AUTH_TOKEN": "t0k"}).auth_token == "t0k"
    assert "t0k" not in repr(config(["--auth-token", "t0k", "--probe-token", "pr0"])) and "pr0" not in repr(
        config(["--probe-token", "pr0"])
    )
    token_file = tmp_path / "token"
    token_file.write_text("  from-a-file\n")
    assert tokens(config(["--auth-token-file", str(token_file)])) == ("from-a-file", None, None)
    assert tokens(config(["--management-token-file", str(token_file)])) == (None, None, "from-a-file")
    for argv in (
        ["--tls-cert", "c.pem"],  # without the key
        ["--tls-client-ca", "ca.pem"],  # mutual TLS without TLS
        ["--auth-token", "a", "--auth-token-file", "f"],
        ["--auth-token", "has space"],
        ["--reload-poll-s", "-1"],
    ):
        with pytest.raises(SystemExit):
            config(argv)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match="--tls-key .*missing.pem"):
        server_credentials(ServerConfig(model="m.pt", tls_cert=str(bad), tls_key=str(tmp_path / "missing.pem")))
    with pytest.raises(SecurityConfigError, match="not a PEM file"):
        server_credentials(ServerConfig(model="m.pt", tls_cert=str(bad), tls_key=str(bad)))
    with pytest.raises(SecurityConfigError, match="empty"):
        tokens(ServerConfig(model="m.pt", probe_token_file=str(empty)))


def test_a_bad_certificate_path_stops_the_server_before_it_loads_the_model(tmp_path):
    import asyncio

    from bitmoji.server.server import serve

    config = ServerConfig(
        model=str(tmp_path / "no-model.pt"), tls_cert=str(tmp_path / "none.crt"), tls_key=str(tmp_path / "none.key")
    )
    with pytest.raises(
        SecurityConfigError, match="--tls-key .*none.key"
    ):  # not ModelFileError: the model was not loaded
        asyncio.run(serve(config))


def test_clients_cannot_name_files_requests_carry_only_model_names():
    from google.protobuf.descriptor import FieldDescriptor

    def strings(descriptor, seen=()):
        for field in descriptor.fields:
            if field.type == FieldDescriptor.TYPE_STRING:
                yield f"{descriptor.full_name}.{field.name}"
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type not in seen:
                yield from strings(field.message_type, (*seen, descriptor))

    service = pb.DESCRIPTOR.services_by_name["Classifier"]
    found = {s.rsplit(".", 1)[1] for method in service.methods for s in strings(method.input_type)}
    # names looked up among the loaded models, never used as paths (see e2e/test_repository_serving.py)
    assert found == {"model_name", "model_version"}


class _Payload:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_checkpoint_with_a_pickled_object_is_refused_unrun(tmp_path):
    from bitmoji.trainer import synth
    from bitmoji.trainer.train import TrainConfig, fit

    data = synth.generate(tmp_path / "data", n_train=8, n_valid=4, seed=0, progress=False)
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 1, "model": _Payload(str(marker))}, out / "checkpoint.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        fit(TrainConfig(data=str(data), out=str(out), arch="mlp", epochs=1, batch_size=4, resume=True, progress=False))
    assert not marker.exists(), "torch.load ran the pickled code"
