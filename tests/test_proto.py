"""The committed Python stubs are exactly what grpcio-tools generates from proto/."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# proto file (relative to proto/) -> its committed stubs
PROTOS = {
    "bitmoji/v1/classifier.proto": ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py"),
    "bitmoji/inference/grpc_service.proto": ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py"),
}


@pytest.mark.parametrize("proto", sorted(PROTOS))
def test_committed_stubs_match_the_proto(tmp_path, proto):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / proto),
        ],
        check=True,
    )
    folder = Path(proto).parent
    for name in PROTOS[proto]:
        generated = (tmp_path / folder / name).read_text()
        committed = (ROOT / "proto" / folder / name).read_text()
        assert committed == generated, f"proto/{folder}/{name} is stale: run scripts/gen-proto"
