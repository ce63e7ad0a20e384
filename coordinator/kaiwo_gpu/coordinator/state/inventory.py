"""Static node inventory from a YAML file, for clusters (and tests) without node agents.

    nodes:
      - name: gpu-01
        labels: {kaiwo.ai/pool: training}
        schedulable: true                        # false cordons it (with an optional reason)
        gpus:
          - {model: MI300X, count: 8}            # UUIDs and BDFs derived from the node name
          - {uuid: GPU-1f2e, index: 8, bdf: "0000:c1:00.0", model: MI210,
             vram_mib: 65536, compute_units: 104, compute_partition: SPX}

Parsing is pure and names the offending path (`nodes[0].gpus[1].vram_mib`) on error. Nodes
carry the label `kaiwo.ai/source: inventory`; a node of that source missing from the file is
removed from etcd when a coordinator starts with it, unless allocations hold its GPUs (then
the coordinator does not start: release them first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import yaml

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.models import freeze_labels
from kaiwo_gpu.coordinator.placement.cluster import MAX_COMPUTE_UNITS
from kaiwo_gpu.coordinator.state.keys import FROM_INVENTORY, SOURCE_LABEL
from kaiwo_gpu.v1 import types_pb2

MAX_GPUS_PER_NODE = 64  # 8 MI300X split into CPX partitions
MAX_GPU_INDEX = 255
MAX_VRAM_MIB = 16 * 1024 * 1024
"""16 TiB: far above any GPU, low enough to catch a unit mistake."""
MAX_BDF_CHARS = 64
COMPUTE_PARTITIONS = ("", "SPX", "DPX", "TPX", "QPX", "CPX")
MEMORY_PARTITIONS = ("", "NPS1", "NPS2", "NPS4", "NPS8")
_NODE_KEYS = {"name", "labels", "gpus", "schedulable", "reason"}
_GPU_KEYS = {
    "model", "count", "uuid", "index", "bdf", "vram_mib", "compute_units", "compute_partition",
}  # fmt: skip


def _int(value: object, where: str, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(where, value, f"a whole number {low}-{high}{why}")
    return value


def _one_of(value: object, where: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(where, value, "empty or one of " + ", ".join(allowed[1:]))
    return value


def _mapping(value: object, where: str, keys: set[str]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise InvalidArgumentError(where, value, "a mapping")
    unknown = sorted(set(map(str, value)) - keys)
    if unknown:
        raise InvalidArgumentError(where, unknown[0], "one of " + ", ".join(sorted(keys)))
    return value


def checked_gpu(
    where: str,
    *,
    uuid: object,
    index: object,
    bdf: object,
    model: object,
    vram_mib: object,
    compute_units: object,
    compute_partition: object = "",
    memory_partition: object = "",
) -> types_pb2.GpuInventory:
    """A GPU's inventory with every field checked: the one rule for the inventory file and
    for agents' registrations, naming the field (`where`.vram_mib) on error.

    A model kaiwo-gpu knows by name may report less VRAM and fewer compute units than its
    published figures (a partition of it does), never more: more is a broken or lying
    report, and capacity that is not there would be granted."""
    if not isinstance(bdf, str) or len(bdf) > MAX_BDF_CHARS or not bdf.isprintable():
        raise InvalidArgumentError(
            f"{where}.bdf", bdf, f"a PCI address of up to {MAX_BDF_CHARS} printable characters"
        )
    model = names.check_gpu_model(model, f"{where}.model")
    known = GPU_MODELS.get(model)
    of_model = f" (an {model} has {{}} at most)" if known else ""
    max_vram = known.vram_mib if known else MAX_VRAM_MIB
    max_units = known.compute_units if known else MAX_COMPUTE_UNITS
    return types_pb2.GpuInventory(
        uuid=names.check_gpu_uuid(uuid, f"{where}.uuid"),
        index=_int(index, f"{where}.index", 0, MAX_GPU_INDEX),
        bdf=bdf,
        model=model,
        vram_mib=_int(vram_mib, f"{where}.vram_mib", 1, max_vram, of_model.format("that")),
        compute_units=_int(
            compute_units, f"{where}.compute_units", 1, max_units, of_model.format("those")
        ),
        compute_partition=_one_of(
            compute_partition, f"{where}.compute_partition", COMPUTE_PARTITIONS
        ),
        memory_partition=_one_of(memory_partition, f"{where}.memory_partition", MEMORY_PARTITIONS),
    )


def check_gpu_inventory(gpu: types_pb2.GpuInventory, where: str) -> None:
    """Raises InvalidArgumentError naming the first field of `gpu` out of its range."""
    checked_gpu(
        where,
        uuid=gpu.uuid,
        index=gpu.index,
        bdf=gpu.bdf,
        model=gpu.model,
        vram_mib=gpu.vram_mib,
        compute_units=gpu.compute_units,
        compute_partition=gpu.compute_partition,
        memory_partition=gpu.memory_partition,
    )


def _derived_uuid(node: str, index: object) -> str:
    return "GPU-" + hashlib.sha256(f"{node}/{index}".encode()).hexdigest()[:16]


def _gpus(
    entry: Mapping[str, object], where: str, node: str, next_index: int
) -> list[types_pb2.GpuInventory]:
    model = names.check_gpu_model(entry.get("model"), f"{where}.model")
    known = GPU_MODELS.get(model)
    vram = entry.get("vram_mib", known.vram_mib if known else None)
    units = entry.get("compute_units", known.compute_units if known else None)
    if vram is None or units is None:
        raise InvalidArgumentError(
            f"{where}.vram_mib",
            None,
            f"vram_mib and compute_units for a model other than {', '.join(GPU_MODELS)}",
        )
    figures = {
        "model": model,
        "vram_mib": vram,
        "compute_units": units,
        "compute_partition": entry.get("compute_partition", ""),
    }
    if "count" in entry:
        if {"uuid", "index", "bdf"} & set(entry):
            raise InvalidArgumentError(
                f"{where}.count", entry["count"], "either count or uuid/index/bdf"
            )
        count = _int(entry["count"], f"{where}.count", 1, MAX_GPUS_PER_NODE)
        return [
            checked_gpu(
                where,
                uuid=_derived_uuid(node, i),
                index=i,
                bdf=f"0000:{0x10 + i:02x}:00.0",
                **figures,
            )
            for i in range(next_index, next_index + count)
        ]
    index = entry.get("index", next_index)
    return [
        checked_gpu(
            where,
            uuid=entry.get("uuid", _derived_uuid(node, index)),
            index=index,
            bdf=str(entry.get("bdf", "")),
            **figures,
        )
    ]


def parse_inventory(text: str, source: str = "inventory") -> list[types_pb2.NodeStatus]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidArgumentError(source, "(YAML)", f"valid YAML: {error}") from None
    top = _mapping(document, source, {"nodes"})
    entries = top.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(f"{source}: nodes", entries, "a non-empty list of nodes")
    nodes: list[types_pb2.NodeStatus] = []
    seen: set[str] = set()
    uuids: set[str] = set()
    for n, raw in enumerate(entries):
        where = f"{source}: nodes[{n}]"
        entry = _mapping(raw, where, _NODE_KEYS)
        name = names.check_node_name(entry.get("name"), f"{where}.name")
        if name in seen:
            raise InvalidArgumentError(f"{where}.name", name, "a name not used by another node")
        seen.add(name)
        labels = dict(freeze_labels(entry.get("labels", {}), f"{where}.labels"))
        raw_gpus = entry.get("gpus")
        if not isinstance(raw_gpus, list) or not raw_gpus:
            raise InvalidArgumentError(f"{where}.gpus", raw_gpus, "a non-empty list of GPUs")
        gpus: list[types_pb2.GpuInventory] = []
        for g, raw_gpu in enumerate(raw_gpus):
            gpu_where = f"{where}.gpus[{g}]"
            next_index = max((gpu.index for gpu in gpus), default=-1) + 1
            gpus += _gpus(_mapping(raw_gpu, gpu_where, _GPU_KEYS), gpu_where, name, next_index)
        indices = [gpu.index for gpu in gpus]
        if len(set(indices)) != len(indices):
            raise InvalidArgumentError(f"{where}.gpus", indices, "distinct device indices")
        for gpu in gpus:
            if gpu.uuid in uuids:
                raise InvalidArgumentError(f"{where}.gpus", gpu.uuid, "UUIDs unique in the cluster")
            uuids.add(gpu.uuid)
        schedulable = entry.get("schedulable", True)
        if not isinstance(schedulable, bool):
            raise InvalidArgumentError(f"{where}.schedulable", schedulable, "true or false")
        reason = names.check_reason(
            entry.get("reason", "" if schedulable else "cordoned in the inventory"),
            f"{where}.reason",
        )
        if SOURCE_LABEL in labels:
            raise InvalidArgumentError(f"{where}.labels", SOURCE_LABEL, "a label not reserved")
        nodes.append(
            types_pb2.NodeStatus(
                name=name,
                labels={**labels, SOURCE_LABEL: FROM_INVENTORY},
                schedulable=schedulable,
                unschedulable_reason="" if schedulable else reason,
                gpus=[
                    types_pb2.GpuStatus(inventory=gpu, health=types_pb2.HEALTH_HEALTHY)
                    for gpu in gpus
                ],
            )
        )
    return nodes


def load_inventory(path: Path) -> list[types_pb2.NodeStatus]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidArgumentError(
            "--inventory", str(path), f"a readable file ({error.strerror})"
        ) from None
    return parse_inventory(text, str(path))


def synthetic_inventory_yaml(node_count: int, gpus_per_node: int, model: str) -> str:
    """The inventory `kaiwo-gpu up` and the benchmarks use: nodes named node-00, node-01, ..."""
    width = max(2, len(str(node_count - 1)))
    return yaml.safe_dump(
        {
            "nodes": [
                {
                    "name": f"node-{n:0{width}d}",
                    "labels": {"kaiwo.ai/pool": "default"},
                    "gpus": [{"model": model, "count": gpus_per_node}],
                }
                for n in range(node_count)
            ]
        },
        sort_keys=False,
    )


def synthetic_inventory(
    node_count: int, gpus_per_node: int, model: str
) -> list[types_pb2.NodeStatus]:
    return parse_inventory(
        synthetic_inventory_yaml(node_count, gpus_per_node, model), "synthetic inventory"
    )
