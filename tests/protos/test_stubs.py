"""The committed stubs in kvfuse/v1 are exactly what `make proto` generates from protos/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
STUB_DIR = REPO / "kvfuse" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated(root: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(root.iterdir())
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "kvfuse/v1").glob("*.proto")
    )
    assert protos, "no .proto files found"
    # Same flags as the Makefile's `proto` target, with the grpc_tools include path that
    # `python -m grpc_tools.protoc` adds on its own.
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *protos,
    ]
    # protoc resolves the proto file names against -I paths; run from the proto dir.
    assert protoc.main(args) == 0, "protoc failed"
    fresh = _generated(tmp_path / "kvfuse" / "v1")
    committed = _generated(STUB_DIR)
    assert fresh.keys() == committed.keys(), "stub files differ: run `make proto` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit kvfuse/v1"


@pytest.mark.parametrize("module", ["kvfuse.v1.common_pb2", "kvfuse.v1.cache_pb2_grpc"])
def test_stubs_import(module: str) -> None:
    __import__(module)
    assert module in sys.modules
