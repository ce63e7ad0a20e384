"""The committed generated code matches the protos, and the API has the RPCs clients rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, types_pb2

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "common" / "kaiwo_gpu" / "v1"


@pytest.mark.integration
def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh_dir = tmp_path / "kaiwo_gpu" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.suffix in {".py", ".pyi"}}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.suffix in {".py", ".pyi"}}
    assert sorted(fresh) == sorted(committed), "generated files added or removed"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code, run `python proto/generate.py`: {stale}"


def test_allocation_service_has_every_rpc() -> None:
    service = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"]
    assert set(service.methods_by_name) == {
        "Allocate",
        "Release",
        "KeepAlive",
        "GetAllocation",
        "ListAllocations",
        "WatchAllocations",
        "RemoveNode",
        "ListNodes",
        "GetClusterStats",
    }
    assert service.methods_by_name["WatchAllocations"].server_streaming


def test_agent_connect_is_one_bidirectional_stream() -> None:
    connect = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["Connect"]
    assert connect.client_streaming
    assert connect.server_streaming


def test_accounted_fields_are_integers() -> None:
    request = types_pb2.AllocationRequest.DESCRIPTOR.fields_by_name
    grant = types_pb2.GpuGrant.DESCRIPTOR.fields_by_name
    for field in (
        request["fraction_millis"],
        request["memory_mib"],
        grant["granted_millis"],
        grant["granted_memory_mib"],
    ):
        assert field.type in (field.TYPE_UINT32, field.TYPE_UINT64), field.name
