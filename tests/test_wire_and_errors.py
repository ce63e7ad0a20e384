from __future__ import annotations

import pytest

from kaiwo_gpu.common import errors
from kaiwo_gpu.common.errors import InvalidArgumentError, error_from_status
from kaiwo_gpu.common.models import AllocationRequest, Isolation, Selector
from kaiwo_gpu.common.wire import request_from_proto, request_to_proto
from kaiwo_gpu.v1 import types_pb2


def test_request_round_trips_through_the_wire() -> None:
    request = AllocationRequest(
        request_id="job-7",
        count=2,
        fraction_millis=250,
        memory_mib=8192,
        sharing=False,
        isolation=Isolation.CU_MASK,
        selector=Selector(
            node_labels=(("zone", "a"),),
            gpu_models=frozenset({"MI300X"}),
            exclude_nodes=frozenset({"n1"}),
            nodes=frozenset({"n0", "n2"}),
        ),
        strategy="best-fit",
        owner="slurm/7",
        labels=(("team", "ml"),),
        ttl_seconds=600,
    )
    assert request_from_proto(request_to_proto(request)) == request


def test_zero_means_not_given_and_sharing_defaults_to_true() -> None:
    request = request_from_proto(types_pb2.AllocationRequest(request_id="r", memory_mib=100))
    assert request.count == 1
    assert request.fraction_millis is None
    assert request.sharing is True
    assert request.ttl_seconds is None


def test_isolation_name_takes_the_mps_alias() -> None:
    message = types_pb2.AllocationRequest(request_id="r", fraction_millis=500, isolation_name="mps")
    request = request_from_proto(message)
    assert request.isolation is Isolation.CU_MASK
    assert "mps" in request.isolation_note


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            types_pb2.AllocationRequest(request_id="r", fraction_millis=50),
            "request.fraction_millis",
        ),
        (types_pb2.AllocationRequest(fraction_millis=500), "request.request_id"),
        (
            types_pb2.AllocationRequest(request_id="r", fraction_millis=500, count=99),
            "request.count",
        ),
        (
            types_pb2.AllocationRequest(request_id="r", fraction_millis=500, isolation_name="x"),
            "request.isolation_name",
        ),
        (
            types_pb2.AllocationRequest(request_id="r", fraction_millis=500, isolation=42),  # type: ignore[arg-type]
            "request.isolation",
        ),
        (
            types_pb2.AllocationRequest(
                request_id="r",
                fraction_millis=500,
                selector=types_pb2.Selector(node_labels={"": "x"}),
            ),
            "request.selector.node_labels.key",
        ),
    ],
)
def test_bad_wire_fields_are_named(message: types_pb2.AllocationRequest, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        request_from_proto(message)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "cls",
    [
        errors.NoCapacityError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.UnavailableError,
        errors.PermissionDeniedError,
        errors.FailedPreconditionError,
    ],
)
def test_status_codes_map_back_to_the_same_class(cls: type[errors.KaiwoGpuError]) -> None:
    error = error_from_status(cls.status_code, "words")
    assert type(error) is cls
    assert error.message == "words"


def test_invalid_argument_comes_back_as_invalid_argument() -> None:
    error = error_from_status("INVALID_ARGUMENT", "count: 0 is not allowed")
    assert isinstance(error, InvalidArgumentError)
    assert error.status_code == "INVALID_ARGUMENT"


def test_unknown_status_keeps_its_code() -> None:
    assert error_from_status("DATA_LOSS", "x").status_code == "DATA_LOSS"
