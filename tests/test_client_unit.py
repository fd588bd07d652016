"""Client pieces that need no model server: conversion, tensors, the retry policy's config, channel settings,
CLI helpers, and the client's call behaviour against a scripted in-process gRPC server."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from bitmoji.client import AsyncBitmojiClient, BitmojiClient, BitmojiError, cli, convert, retry, tensors
from bitmoji.client.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_credentials, channel_options
from bitmoji.client.metadata import bearer
from bitmoji.client.tensors import to_torch
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc


def png(color=(200, 30, 60), size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- convert ---------------------------------------------------------------------------------


def test_paths_bytes_and_pil_images_become_encoded_images(tmp_path):
    data = png()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    image = Image.open(io.BytesIO(data))
    inputs = convert.to_inputs([str(path), path, data, bytearray(data), image])
    assert [i.WhichOneof("kind") for i in inputs] == ["image"] * 5
    assert all(i.image == data for i in inputs[:4])
    decoded = Image.open(io.BytesIO(inputs[4].image))
    assert decoded.format == "PNG" and decoded.tobytes() == image.tobytes()  # lossless


def test_a_single_item_is_accepted_as_well_as_a_list(tmp_path):
    assert len(convert.to_inputs(png())) == 1
    assert len(convert.to_inputs(torch.rand(3, 8, 8))) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.uint8])
def test_numpy_arrays_round_trip_as_raw_tensors(dtype):
    array = (np.random.default_rng(0).random((3, 5, 4)) * 200).astype(dtype)
    (item,) = convert.to_inputs([array])
    assert item.tensor.shape == [3, 5, 4]
    back = to_torch(item.tensor)
    assert back.dtype == getattr(torch, np.dtype(dtype).name)
    np.testing.assert_array_equal(back.numpy(), array)


def test_a_4d_tensor_is_a_batch_of_items_and_lists_are_flattened():
    batch = torch.rand(3, 3, 4, 4)
    inputs = convert.to_inputs([batch, torch.rand(3, 4, 4)])
    assert len(inputs) == 4
    for i in range(3):
        assert torch.equal(to_torch(inputs[i].tensor), batch[i])


def test_non_contiguous_and_big_endian_arrays_are_sent_row_major_little_endian():
    array = np.arange(24, dtype=">f4").reshape(2, 3, 4).transpose(2, 0, 1)  # [4, 2, 3], big-endian, strided
    tensor = convert.tensor_proto(array)
    assert tensor.dtype == pb.DATA_TYPE_FLOAT32 and list(tensor.shape) == [4, 2, 3]
    assert tensor.data == np.ascontiguousarray(array, dtype="<f4").tobytes()
    assert torch.equal(to_torch(tensor), torch.from_numpy(np.ascontiguousarray(array, dtype="<f4")))
    gpu_free = torch.rand(2, 3).t()  # non-contiguous torch
    assert torch.equal(to_torch(convert.tensor_proto(gpu_free)), gpu_free)


@pytest.mark.parametrize(
    "bad", [np.zeros(3, dtype=np.int64), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bool)]
)
def test_unsupported_dtypes_are_refused_with_the_item_index(bad):
    with pytest.raises(ValueError, match=r"item 1: unsupported dtype"):
        convert.to_inputs([png(), bad])


def test_unsupported_item_types_are_refused():
    with pytest.raises(TypeError, match=r"item 0: unsupported item type float"):
        convert.to_inputs([1.5])
    with pytest.raises(TypeError, match="unsupported item type int"):
        convert.to_inputs(7)


def test_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.to_inputs([tmp_path / "missing.png"])


def test_to_torch_checks_the_byte_count_and_handles_empty_tensors():
    with pytest.raises(ValueError, match="needs 16 bytes, got 3"):
        to_torch(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"abc"))
    assert to_torch(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 3])).shape == (0, 3)


# --- tensors from the server -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.uint8])
def test_tensors_decode_as_numpy_lists_or_torch_in_their_shape(dtype):
    array = (np.random.default_rng(1).random((2, 3, 4)) * 200).astype(dtype)
    wire = convert.tensor_proto(array)
    as_numpy = tensors.decode(wire, "numpy")
    assert as_numpy.dtype == array.dtype and as_numpy.flags.writeable
    np.testing.assert_array_equal(as_numpy, array)
    assert tensors.decode(wire, "auto").dtype == array.dtype  # numpy is installed here
    as_list = tensors.decode(wire, "list")
    assert as_list == array.tolist()  # nested lists, [2][3][4], the same numbers
    assert len(as_list) == 2 and len(as_list[0]) == 3 and len(as_list[0][0]) == 4
    np.testing.assert_array_equal(tensors.decode(wire, "torch").numpy(), array)


def test_list_tensors_keep_scalar_and_empty_shapes():
    scalar = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[], data=np.float64(2.5).tobytes())
    assert tensors.decode(scalar, "list") == 2.5
    assert tensors.decode(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 3]), "list") == []
    assert tensors.decode(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 0]), "list") == [[], []]
    assert tensors.decode(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 3]), "numpy").shape == (0, 3)
    assert tensors.flat([[1.0, 2.0], [3.0, 4.0]]) == [1.0, 2.0, 3.0, 4.0] == tensors.flat(np.arange(1.0, 5.0))
    assert tensors.flat(2.5) == [2.5]


def test_tensor_types_are_checked_before_use(monkeypatch):
    with pytest.raises(ValueError, match="tensor_type must be one of auto, numpy, list, torch"):
        tensors.resolve("jax")
    with pytest.raises(ValueError, match="unsupported tensor dtype DATA_TYPE_UNSPECIFIED"):
        tensors.decode(pb.Tensor(shape=[1], data=b"x"), "list")
    monkeypatch.setattr(tensors, "installed", lambda module: False)  # a client without numpy or torch
    assert tensors.resolve("auto") == "list"
    with pytest.raises(ImportError, match=r"tensor_type='torch' needs torch, which is not installed"):
        tensors.resolve("torch")


def test_targets_and_probe_requests():
    assert convert.to_targets(1) == [1.0]
    assert convert.to_targets([0, 1]) == [0.0, 1.0]
    assert convert.to_targets(torch.tensor([[3.0], [0.5]])) == [3.0, 0.5]
    assert convert.to_targets(np.array([1, 0])) == [1.0, 0.0]
    request = convert.probe_request([torch.tensor([1.0])], [3.0], "mse", True, False)
    assert request.loss == pb.LOSS_MSE and request.include_values and not request.include_saliency_png
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        convert.probe_request([png()], [1], "l1", False, False)
    with pytest.raises(ValueError, match="at least one input"):
        convert.probe_request([], [], "bce", False, False)


# --- channel settings ------------------------------------------------------------------------


def test_channel_options_carry_limits_retry_policy_round_robin_and_overrides():
    options = dict(
        channel_options(max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, load_balancing=None, retries=3, backoff=0.1)
    )
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.per_rpc_retry_buffer_size"] == 64 * 1024 * 1024  # gRPC's 256 KiB would not retry images
    config = json.loads(options["grpc.service_config"])
    assert "loadBalancingConfig" not in config
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    (method,) = config["methodConfig"]
    assert {"service": "bitmoji.v1.Classifier"} in method["name"]
    assert {"service": "bitmoji.v1.ModelRepository"} in method["name"]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.100s",
        "maxBackoff": "0.400s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"],
    }
    options = dict(
        channel_options(
            max_message_bytes=1000,
            load_balancing="round_robin",
            retries=0,
            backoff=0.1,
            options=[("grpc.max_receive_message_length", 5)],
        )
    )
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "retryPolicy" not in config["methodConfig"][0]  # retries=0: gRPC wants maxAttempts >= 2, or no policy
    assert options["grpc.max_receive_message_length"] == 5 and options["grpc.max_send_message_length"] == 1000
    with pytest.raises(ValueError, match="load_balancing"):
        channel_options(max_message_bytes=1, load_balancing="random", retries=3, backoff=0.1)


def test_backoff_zero_becomes_grpcs_smallest_and_retries_stay_within_grpcs_five_attempts():
    assert retry.method_config(1, 0.0)["retryPolicy"]["initialBackoff"] == "0.001s"
    assert retry.method_config(4, 0.25)["retryPolicy"]["maxBackoff"] == "2.000s"  # 0.25 * 2**3: never capped
    with pytest.raises(ValueError, match="retries must be 0 to 4"):
        retry.service_config(retries=5, backoff=0.1, load_balancing=None)


def test_credentials_and_token_metadata():
    assert channel_credentials(tls=False, root_certificates=None, private_key=None, certificate_chain=None) is None
    assert channel_credentials(tls=True, root_certificates=None, private_key=None, certificate_chain=None) is not None
    with pytest.raises(ValueError, match="both"):
        channel_credentials(tls=True, root_certificates=None, private_key=b"k", certificate_chain=None)
    assert bearer(None) == ()
    assert bearer("s3cret") == (("authorization", "Bearer s3cret"),)


def test_constructor_refuses_nonsense():
    for kwargs in (
        {"timeout": 0},
        {"retries": -1},
        {"retries": 5},
        {"backoff": -0.1},
        {"max_message_bytes": 0},
        {"load_balancing": "random"},
    ):
        with pytest.raises(ValueError):
            BitmojiClient("127.0.0.1:1", **kwargs)
    with pytest.raises(TypeError, match="model must be a str"):
        BitmojiClient("127.0.0.1:1", model=3.5)


# --- against a scripted in-process server ----------------------------------------------------


class ScriptedClassifier(classifier_pb2_grpc.ClassifierServicer):
    """Fails the first `failures` calls with `code`, then answers; records what it saw."""

    def __init__(self):
        self.calls = 0
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.delay = 0.0
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    def Classify(self, request, context):
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        self.metadata.append(dict(context.invocation_metadata()))
        time.sleep(self.delay)
        if fail:
            context.abort(self.code, f"scripted failure {self.calls}")
        return pb.ClassifyResponse(
            predictions=[pb.Prediction(label="eva", probability=0.75, logit=1.0986) for _ in request.inputs],
            model_version="v-test",
        )

    def StreamClassify(self, request_iterator, context):
        for request in request_iterator:
            yield pb.ClassifyResponse(
                predictions=[pb.Prediction(label=str(len(request.inputs)), probability=0.5) for _ in request.inputs],
                model_version="v-test",
            )

    def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(
            model_version="v-test",
            class_names=["eva", "not_eva"],
            positive_class="eva",
            input_shape=[3, 128, 128],
            metadata_json='{"metrics": {"accuracy": 0.9}}',
        )


@pytest.fixture
def scripted_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = ScriptedClassifier()
    health_servicer = health.HealthServicer()
    classifier_pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer, health_servicer
    server.stop(None)


def test_results_and_token_reach_the_caller(scripted_server):
    target, servicer, _ = scripted_server
    with BitmojiClient(target, token="s3cret") as client:
        predictions = client.classify([png(), png((0, 0, 0))])
        info = client.model_info()
    assert [(p.label, p.model_version) for p in predictions] == [("eva", "v-test")] * 2
    assert predictions[0].probability == pytest.approx(0.75)
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert info.class_names == ("eva", "not_eva") and info.input_shape == (3, 128, 128)
    assert info.metadata == {"metrics": {"accuracy": 0.9}}


def test_an_empty_list_makes_no_call(scripted_server):
    target, servicer, _ = scripted_server
    with BitmojiClient(target) as client:
        assert client.classify([]) == []
    assert servicer.calls == 0


def test_server_unavailable_is_retried_and_invalid_argument_is_not(scripted_server):
    target, servicer, _ = scripted_server
    with BitmojiClient(target, backoff=0.01) as client:
        servicer.failures = 2
        assert len(client.classify([png()])) == 1
        assert servicer.calls == 3
        servicer.calls, servicer.failures, servicer.code = 0, 1, grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(BitmojiError) as info:
            client.classify([png()])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "scripted failure 1" in info.value.details
    assert servicer.calls == 1


def test_every_call_has_a_deadline(scripted_server):
    target, servicer, _ = scripted_server
    servicer.delay = 1.0
    with BitmojiClient(target, timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(BitmojiError) as info:
            client.classify([png()])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 0.9 and servicer.calls == 1


def test_health_and_wait_until_serving(scripted_server):
    target, _, health_servicer = scripted_server
    health_servicer.set("bitmoji.v1.Classifier", health_pb2.HealthCheckResponse.NOT_SERVING)
    with BitmojiClient(target) as client:
        assert client.health() == "SERVING"  # grpcio's servicer starts "" as SERVING
        assert client.health("bitmoji.v1.Classifier") == "NOT_SERVING"
        assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
        with pytest.raises(BitmojiError) as info:
            client.wait_until_serving(0.3, service="bitmoji.v1.Classifier")
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "NOT_SERVING" in info.value.details
        threading.Timer(
            0.2, health_servicer.set, ("bitmoji.v1.Classifier", health_pb2.HealthCheckResponse.SERVING)
        ).start()
        client.wait_until_serving(5, service="bitmoji.v1.Classifier")
        assert client.health("bitmoji.v1.Classifier") == "SERVING"


def test_async_client_retries_and_answers(scripted_server):
    target, servicer, _ = scripted_server
    servicer.failures = 1

    async def main():
        async with AsyncBitmojiClient(target, backoff=0.01) as client:
            predictions = await client.classify(png())
            info = await client.model_info()
            status = await client.health()
            await client.wait_until_serving(2)
            return predictions, info, status

    predictions, info, status = asyncio.run(main())
    assert [p.label for p in predictions] == ["eva"] and servicer.calls == 2
    assert info.model_version == "v-test" and status == "SERVING"


def test_stream_answers_each_batch_in_order_and_reports_bad_items(scripted_server):
    target, _, _ = scripted_server
    with BitmojiClient(target) as client:
        answers = [
            [p.label for p in predictions] for predictions in client.classify_stream([[png()], [png(), png()], png()])
        ]
        assert answers == [["1"], ["2", "2"], ["1"]]
        stream = client.classify_stream([[png()], [1.5], [png()]])
        assert [p.label for p in next(stream)] == ["1"]
        with pytest.raises(TypeError, match="item 0: unsupported item type float"):
            next(stream)


def test_async_stream_takes_async_iterables(scripted_server):
    target, _, _ = scripted_server

    async def batches():
        for n in (2, 1):
            yield [png()] * n

    async def main():
        async with AsyncBitmojiClient(target) as client:
            return [[p.label for p in predictions] async for predictions in client.classify_stream(batches())]

    assert asyncio.run(main()) == [["2", "2"], ["1"]]


def self_signed(directory, name: str) -> tuple[bytes, bytes]:
    """(private key, certificate) for 127.0.0.1 and localhost, from the openssl command line."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
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
            f"/CN={name}",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return key.read_bytes(), cert.read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_mutual_tls(tmp_path):
    server_key, server_cert = self_signed(tmp_path, "server")
    client_key, client_cert = self_signed(tmp_path, "client")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ScriptedClassifier(), server)
    credentials = grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=client_cert, require_client_auth=True
    )
    target = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    server.start()
    try:
        with BitmojiClient(
            target, root_certificates=server_cert, private_key=client_key, certificate_chain=client_cert
        ) as client:
            assert client.model_info().model_version == "v-test"
        for refused in (
            BitmojiClient(target, retries=0, timeout=3, root_certificates=server_cert),  # no client certificate
            BitmojiClient(target, retries=0, timeout=3),  # plaintext
        ):
            with refused, pytest.raises(BitmojiError) as info:
                refused.model_info()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


# --- nobody listening ------------------------------------------------------------------------


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = 0

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls += 1
        return continuation(client_call_details, request)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: nothing listens there


def test_nothing_listening_is_retried_then_unavailable():
    counter = CountingInterceptor()
    with BitmojiClient(f"127.0.0.1:{closed_port()}", retries=3, backoff=0.05, interceptors=[counter]) as client:
        start = time.monotonic()
        with pytest.raises(BitmojiError) as info:
            client.classify([png()])
        elapsed = time.monotonic() - start
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert counter.calls == 1  # gRPC retries below the interceptors: they see the call once
    assert elapsed >= 0.8 * (0.05 + 0.1 + 0.2)  # the three backoff waits, at their smallest jitter


# --- CLI helpers -----------------------------------------------------------------------------


def test_table_aligns_text_left_and_numbers_right():
    text = cli.table(("file", "p"), [("a.png", 0.5), ("long_name.png", 0.25)])
    assert text.splitlines() == [
        "file                p",
        "a.png          0.5000",
        "long_name.png  0.2500",
    ]


def test_label_names_and_numbers_become_targets():
    assert cli.target_value("eva", ["eva", "not_eva"], "eva") == 1.0
    assert cli.target_value("not_eva", ["eva", "not_eva"], "eva") == 0.0
    assert cli.target_value("1", ["eva", "not_eva"], "eva") == 1.0
    with pytest.raises(ValueError, match="neither a class name"):
        cli.target_value("bob", ["eva", "not_eva"], "eva")


def test_cli_errors_are_one_line_and_exit_nonzero(capsys, tmp_path):
    assert cli.main(["--target", f"127.0.0.1:{closed_port()}", "--timeout", "2", "health"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bitmoji-client: health failed: UNAVAILABLE") and err.count("\n") == 1
    assert cli.main(["classify", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: No such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", "x.png"])  # --label is required
    assert exit_info.value.code == 2
