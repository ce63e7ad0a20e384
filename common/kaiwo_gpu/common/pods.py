"""Kubernetes manifests read into an AllocationRequest, so a pod spec can be the request itself.

A Pod, or the pod template of a workload, gives the GPU amount (`amd.com/gpu` and the Kaiwo
annotations), the labels and where the pod may land (nodeSelector, nodeName, required node
affinity). Whatever a Selector cannot express is an error naming the manifest path, never a
silent approximation. Pure: callers read the file and pass its text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict

import yaml

from kaiwo_gpu.common import names
from kaiwo_gpu.common.annotations import (
    AMD_GPU_RESOURCE,
    AmdGpuUnit,
    parse_amd_gpu,
    parse_gpu_annotations,
)
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Selector, freeze_labels

# Where each kind keeps the pod template, as keys from the manifest's root.
POD_TEMPLATE_KEYS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
HOSTNAME_LABEL = "kubernetes.io/hostname"
NODE_NAME_FIELD = "metadata.name"
_KAIWO_GPU_PREFIX = "kaiwo.ai/gpu-"
_HASHED_ID_HEX_CHARS = 40
_SUPPORTED_EXPRESSIONS = (
    f"In with one value (the node label must equal it), or In / NotIn on {HOSTNAME_LABEL} "
    "(nodes to use / to avoid); Exists, DoesNotExist, Gt, Lt, NotIn on other keys and "
    "several values on other keys cannot be expressed by a kaiwo selector"
)
_NEEDS_GPU = (
    f"a GPU amount: this pod asks for no GPU; set {AMD_GPU_RESOURCE} in a container's "
    "resources.limits, or the kaiwo.ai/gpu-fraction or kaiwo.ai/gpu-memory annotation"
)

# (what it constrains: "label", "nodes" or "exclude_nodes"; label key; values; manifest path)
_Constraint = tuple[str, str, frozenset[str], str]


def load_manifest(text: str, source: str = "manifest") -> Mapping[str, object]:
    """Parses exactly one YAML document holding one object; `source` names it in errors."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 0
        lines = text.splitlines()
        shown = lines[line - 1].strip()[:120] if 0 < line <= len(lines) else ""
        allowed = f"valid YAML ({error.problem or error.context})"
        raise InvalidArgumentError(f"{source} line {line}", shown, allowed) from None
    except yaml.YAMLError as error:  # e.g. bytes that are not text: one line all the same
        problem = " ".join(str(error).split())
        raise InvalidArgumentError(source, None, f"valid YAML ({problem})") from None
    except RecursionError:
        raise InvalidArgumentError(source, None, "YAML nested less deeply") from None
    if len(documents) != 1:
        allowed = "exactly one document (split a multi-document file and pass each part)"
        raise InvalidArgumentError(source, f"{len(documents)} YAML documents", allowed)
    return _mapping(documents[0], source, required=True)


def request_from_pod(
    manifest: Mapping[str, object],
    *,
    amd_gpu_unit: AmdGpuUnit = AmdGpuUnit.MILLI,
    request_id: str | None = None,
) -> AllocationRequest:
    """The request one pod of `manifest` (a Pod or a workload with a pod template) makes."""
    root = _mapping(manifest, "manifest", required=True)
    kind = root.get("kind")
    if not isinstance(kind, str) or kind not in POD_TEMPLATE_KEYS:
        raise InvalidArgumentError("kind", kind, "one of " + ", ".join(POD_TEMPLATE_KEYS))
    metadata = _mapping(root.get("metadata"), "metadata")
    namespace, name, uid = _identity(metadata)

    template, prefix = root, ""
    for key in POD_TEMPLATE_KEYS[kind]:
        prefix = f"{prefix}.{key}" if prefix else key
        template = _mapping(template.get(key), prefix)
    pod_meta_path = f"{prefix}.metadata" if prefix else "metadata"
    pod_metadata = _mapping(template.get("metadata"), pod_meta_path) if prefix else metadata
    spec_path = f"{prefix}.spec" if prefix else "spec"
    spec = _mapping(template.get("spec"), spec_path)

    annotations = _gpu_annotations(pod_metadata, pod_meta_path)
    if prefix:
        for key, value in _gpu_annotations(metadata, "metadata").items():
            if annotations.get(key) != value:
                allowed = f"it on {pod_meta_path}.annotations: pods get only the template's"
                raise InvalidArgumentError(f"metadata.annotations[{key}]", value, allowed)
    amd_gpu = _pod_amd_gpu(spec, spec_path, amd_gpu_unit)
    shape = parse_gpu_annotations(annotations, amd_gpu, amd_gpu_unit)
    labels_path = f"{pod_meta_path}.labels"
    labels = freeze_labels(_mapping(pod_metadata.get("labels"), labels_path), labels_path)
    selector = _selector(spec, spec_path)
    if request_id is None:
        request_id = _default_request_id(kind, namespace, name, uid)
    try:
        return AllocationRequest(
            request_id,
            **asdict(shape),
            selector=selector,
            owner=f"{namespace}/{name}",
            labels=labels,
        )
    except InvalidArgumentError as error:
        if error.field == "fraction_millis" and error.value is None:
            field = f"{spec_path}.containers[*].resources.limits[{AMD_GPU_RESOURCE}]"
            raise InvalidArgumentError(field, None, _NEEDS_GPU) from None
        raise


def _mapping(value: object, path: str, *, required: bool = False) -> Mapping[str, object]:
    """The mapping at `path`; an absent one reads as empty, as the API server treats it."""
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(path, type(value).__name__, "a mapping")
    return value


def _sequence(value: object, path: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgumentError(path, type(value).__name__, "a list")
    return value


def _identity(metadata: Mapping[str, object]) -> tuple[str, str, str]:
    name = metadata.get("name")
    if name is None and "generateName" in metadata:
        allowed = "a name; generateName is resolved by the API server, so pass the created object"
        raise InvalidArgumentError("metadata.name", None, allowed)
    if not isinstance(name, str) or not names.DNS_SUBDOMAIN.fullmatch(name):
        allowed = "a DNS subdomain name: up to 253 lowercase alphanumerics, '-' and '.'"
        raise InvalidArgumentError("metadata.name", name, allowed)
    namespace = metadata.get("namespace") or "default"
    if not isinstance(namespace, str) or not names.DNS_LABEL.fullmatch(namespace):
        allowed = "a DNS label: up to 63 lowercase alphanumerics and '-'"
        raise InvalidArgumentError("metadata.namespace", namespace, allowed)
    uid = metadata.get("uid") or ""
    if not isinstance(uid, str):
        raise InvalidArgumentError("metadata.uid", uid, "a string such as a UUID")
    return namespace, name, uid


def _default_request_id(kind: str, namespace: str, name: str, uid: str) -> str:
    """`k8s:<ns>/<name>[:<uid>]`; workloads add their kind, since a pod may share the name."""
    path = f"{namespace}/{name}" if kind == "Pod" else f"{namespace}/{kind.lower()}/{name}"
    text = f"k8s:{path}:{uid}" if uid else f"k8s:{path}"
    if names.is_request_id(text):
        return text
    return "k8s:" + hashlib.sha256(text.encode()).hexdigest()[:_HASHED_ID_HEX_CHARS]


def _gpu_annotations(metadata: Mapping[str, object], path: str) -> dict[str, str]:
    annotations = _mapping(metadata.get("annotations"), f"{path}.annotations")
    kaiwo: dict[str, str] = {}
    for key, value in annotations.items():
        if isinstance(key, str) and key.startswith(_KAIWO_GPU_PREFIX):
            if not isinstance(value, str):
                allowed = 'a string: annotation values are text, so quote it ("0.5")'
                raise InvalidArgumentError(f"annotation {key}", value, allowed)
            kaiwo[key] = value
    return kaiwo


def _gpu_amount(value: object, path: str, unit: AmdGpuUnit) -> int | None:
    """A container's `amd.com/gpu` in the unit's own amounts (millis or devices); 0 is none."""
    if value is None:
        return None
    if (type(value) is int and value == 0) or value == "0":
        return 0
    try:
        count, millis = parse_amd_gpu(value, unit)  # type: ignore[arg-type]  # it judges any
    except InvalidArgumentError as error:
        raise InvalidArgumentError(path, value, error.allowed) from None
    return count if unit is AmdGpuUnit.DEVICE else count * millis


def _container_gpu(item: object, path: str, unit: AmdGpuUnit) -> tuple[int, Mapping[str, object]]:
    container = _mapping(item, path, required=True)
    resources = _mapping(container.get("resources"), f"{path}.resources")
    limits = _mapping(resources.get("limits"), f"{path}.resources.limits")
    requests = _mapping(resources.get("requests"), f"{path}.resources.requests")
    limit_path = f"{path}.resources.limits[{AMD_GPU_RESOURCE}]"
    request_path = f"{path}.resources.requests[{AMD_GPU_RESOURCE}]"
    limit = _gpu_amount(limits.get(AMD_GPU_RESOURCE), limit_path, unit)
    request = _gpu_amount(requests.get(AMD_GPU_RESOURCE), request_path, unit)
    if request is not None and request != limit:
        allowed = (
            f"the same amount as requests[{AMD_GPU_RESOURCE}] ({requests[AMD_GPU_RESOURCE]!r}): "
            "Kubernetes requires a limit equal to the request for extended resources"
        )
        raise InvalidArgumentError(limit_path, limits.get(AMD_GPU_RESOURCE), allowed)
    return limit or 0, container


def _pod_amd_gpu(spec: Mapping[str, object], spec_path: str, unit: AmdGpuUnit) -> int | None:
    """The pod's effective `amd.com/gpu`, by Kubernetes' rule, including native sidecars."""
    containers_path = f"{spec_path}.containers"
    containers = _sequence(spec.get("containers"), containers_path)
    if not containers:
        raise InvalidArgumentError(containers_path, None, "a list of at least one container")
    running = sum(
        _container_gpu(item, f"{containers_path}[{i}]", unit)[0]
        for i, item in enumerate(containers)
    )
    sidecars = peak = 0
    init_path = f"{spec_path}.initContainers"
    for i, item in enumerate(_sequence(spec.get("initContainers"), init_path)):
        amount, container = _container_gpu(item, f"{init_path}[{i}]", unit)
        restart = container.get("restartPolicy")
        if restart == "Always":
            sidecars += amount
            peak = max(peak, sidecars)
        elif restart is None:
            peak = max(peak, sidecars + amount)
        else:
            field = f"{init_path}[{i}].restartPolicy"
            raise InvalidArgumentError(field, restart, "Always (a sidecar) or unset")
    total = max(running + sidecars, peak)
    if total == 0:
        return None
    try:
        parse_amd_gpu(total, unit)
    except InvalidArgumentError as error:
        field = f"{containers_path}[*].resources.limits[{AMD_GPU_RESOURCE}]"
        allowed = f"{error.allowed}, for the pod: containers + sidecars, or an init container"
        raise InvalidArgumentError(field, total, allowed) from None
    return total


def _check_node_names(names: frozenset[str], path: str) -> None:
    try:
        Selector(nodes=names)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(path, error.value, error.allowed) from None


def _expression(item: object, path: str, *, is_field: bool) -> _Constraint:
    """One matchExpressions / matchFields entry as a constraint the Selector can hold."""
    expression = _mapping(item, path, required=True)
    key = expression.get("key")
    operator = expression.get("operator")
    values = _sequence(expression.get("values"), f"{path}.values")
    if not isinstance(key, str):
        raise InvalidArgumentError(f"{path}.key", key, "a node label key")
    if not all(isinstance(value, str) for value in values):
        raise InvalidArgumentError(f"{path}.values", values, "a list of strings")
    names = frozenset(str(value) for value in values)
    node_key = NODE_NAME_FIELD if is_field else HOSTNAME_LABEL
    if key == node_key and operator in ("In", "NotIn"):
        if not names:
            raise InvalidArgumentError(f"{path}.values", values, "at least one node name")
        _check_node_names(names, f"{path}.values")
        return ("nodes" if operator == "In" else "exclude_nodes"), key, names, path
    if is_field:
        field = f"{path}.operator" if key == NODE_NAME_FIELD else f"{path}.key"
        value = operator if key == NODE_NAME_FIELD else key
        raise InvalidArgumentError(field, value, f"{NODE_NAME_FIELD} with In or NotIn")
    if operator == "In" and len(values) == 1:
        freeze_labels({key: values[0]}, path)
        return "label", key, names, path
    if operator == "In":
        raise InvalidArgumentError(f"{path}.values", values, _SUPPORTED_EXPRESSIONS)
    raise InvalidArgumentError(f"{path}.operator", operator, _SUPPORTED_EXPRESSIONS)


def _node_constraints(spec: Mapping[str, object], spec_path: str) -> list[_Constraint]:
    """Constraints from spec.nodeName and the one required node-affinity term."""
    constraints: list[_Constraint] = []
    node_name = spec.get("nodeName")
    if node_name is not None:
        if not isinstance(node_name, str):
            raise InvalidArgumentError(f"{spec_path}.nodeName", node_name, "a node name")
        _check_node_names(frozenset({node_name}), f"{spec_path}.nodeName")
        constraints.append(("nodes", "", frozenset({node_name}), f"{spec_path}.nodeName"))
    affinity = _mapping(spec.get("affinity"), f"{spec_path}.affinity")
    node_path = f"{spec_path}.affinity.nodeAffinity"
    node_affinity = _mapping(affinity.get("nodeAffinity"), node_path)
    required_path = f"{node_path}.requiredDuringSchedulingIgnoredDuringExecution"
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return constraints
    required = _mapping(required, required_path)
    terms_path = f"{required_path}.nodeSelectorTerms"
    terms = _sequence(required.get("nodeSelectorTerms"), terms_path)
    if len(terms) != 1:
        allowed = "exactly one term (Kubernetes ORs terms; a kaiwo selector cannot express OR)"
        raise InvalidArgumentError(terms_path, f"{len(terms)} terms", allowed)
    term_path = f"{terms_path}[0]"
    term = _mapping(terms[0], term_path, required=True)
    requirements = [
        _expression(item, f"{term_path}.{key}[{i}]", is_field=key == "matchFields")
        for key in ("matchExpressions", "matchFields")
        for i, item in enumerate(_sequence(term.get(key), f"{term_path}.{key}"))
    ]
    if not requirements:
        raise InvalidArgumentError(term_path, {}, "a term with requirements (empty matches none)")
    return constraints + requirements


def _selector(spec: Mapping[str, object], spec_path: str) -> Selector:
    selector_path = f"{spec_path}.nodeSelector"
    node_selector = _mapping(spec.get("nodeSelector"), selector_path)
    labels = dict(freeze_labels(node_selector, selector_path))
    # The scheduler's most common pin: nodes carry their name under this label.
    hostname = labels.pop(HOSTNAME_LABEL, None)
    nodes: frozenset[str] | None = None if hostname is None else frozenset({hostname})
    sources = dict.fromkeys(labels, selector_path)
    exclude_nodes: frozenset[str] = frozenset()
    for target, key, values, path in _node_constraints(spec, spec_path):
        field = f"{path}.values"
        if target == "label":
            (value,) = values
            if labels.get(key, value) != value:
                allowed = f"[{labels[key]!r}], as {sources[key]} requires; both must hold"
                raise InvalidArgumentError(field, [value], allowed)
            labels[key] = value
            sources[key] = path
        elif target == "nodes":
            nodes = values if nodes is None else nodes & values
            if not nodes:
                allowed = "nodes that overlap the other node requirements"
                raise InvalidArgumentError(field, sorted(values), allowed)
        else:
            exclude_nodes |= values
    if nodes is not None and nodes <= exclude_nodes:
        raise InvalidArgumentError(f"{spec_path}.affinity", sorted(nodes), "a node not excluded")
    return Selector(
        node_labels=tuple(labels.items()), nodes=nodes or frozenset(), exclude_nodes=exclude_nodes
    )
