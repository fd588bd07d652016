"""The committed Python stubs are exactly what grpcio-tools generates from proto/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / "bitmoji" / "v1" / "classifier.proto")],
        check=True,
    )
    for name in STUBS:
        generated = (tmp_path / "bitmoji" / "v1" / name).read_text()
        committed = (ROOT / "proto" / "bitmoji" / "v1" / name).read_text()
        assert committed == generated, f"proto/bitmoji/v1/{name} is stale: run scripts/gen-proto"
