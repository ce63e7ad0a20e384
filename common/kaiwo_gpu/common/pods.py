"""Kubernetes manifests read into an AllocationRequest, so a pod spec can be the request itself.

A Pod, or the pod template of a workload (Kubernetes' or Kaiwo's KaiwoJob and KaiwoService),
gives the GPU amount (`amd.com/gpu` and the Kaiwo annotations), the labels and where the pod
may land (nodeSelector, nodeName, required node affinity). Whatever a Selector cannot express
is an error naming the manifest path, never a silent approximation. Pure: callers read the
file and pass its text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import yaml

from kaiwo_gpu.common import names
from kaiwo_gpu.common.annotations import (
    AMD_GPU_RESOURCE,
    AUTO_UNIT_RULE,
    AmdGpuUnit,
    parse_gpu_annotations,
    read_amd_gpu,
)
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Selector, freeze_labels

# Where each kind keeps the pod template, as keys from the manifest's root; where a kind has
# two spellings, a manifest gives one of them.
POD_TEMPLATE_KEYS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "Pod": ((),),
    "Deployment": (("spec", "template"),),
    "StatefulSet": (("spec", "template"),),
    "ReplicaSet": (("spec", "template"),),
    "DaemonSet": (("spec", "template"),),
    "Job": (("spec", "template"),),
    "CronJob": (("spec", "jobTemplate", "spec", "template"),),
    # kaiwo.silogen.ai/v1alpha1. Upstream (github.com/silogen/kaiwo, apis/kaiwo/v1alpha1/
    # kaiwojob_types.go and kaiwoservice_types.go) nests a batchv1.Job at spec.job and a
    # Deployment (later a DeploymentSpec, at .spec either way) at spec.deployment; the
    # proof-of-concept's CRDs (github.com/Yu-amd/kaiwo-PoC, config/crd/bases/
    # kaiwo.silogen.ai_kaiwojobs-simple.yaml and _kaiwoservices-simple.yaml) use spec.template.
    "KaiwoJob": (("spec", "job", "spec", "template"), ("spec", "template")),
    "KaiwoService": (("spec", "deployment", "spec", "template"), ("spec", "template")),
}
# Kaiwo users annotate the Kaiwo object itself, so its kaiwo.ai annotations count as its pods'.
KAIWO_KINDS = frozenset({"KaiwoJob", "KaiwoService"})
_KAIWO_RAY = (
    "a Job or Deployment pod template instead: Kaiwo runs a Ray workload as head and worker "
    "pods from several templates; pass each group's pod template as a Pod"
)
_KAIWO_GPUS = (
    f"0 or unset: Kaiwo sets every container's {AMD_GPU_RESOURCE} from it, which kaiwo-gpu "
    f"does not model; give each pod's amount as {AMD_GPU_RESOURCE} in the pod template's "
    "container limits or with the kaiwo.ai/gpu-* annotations"
)
# Kaiwo fields (upstream common_types.go, kaiwojob_types.go, kaiwoservice_types.go and the AIM
# docs) by which Kaiwo builds or sizes the pods itself, so no pod template says how much.
_KAIWO_POD_BUILDERS: Mapping[str, str] = {
    "ray": _KAIWO_RAY,
    "rayJob": _KAIWO_RAY,
    "rayService": _KAIWO_RAY,
    "aim": "a Deployment pod template instead: an AIM service's pods come from its template",
    "gpus": _KAIWO_GPUS,
    "gpusPerReplica": _KAIWO_GPUS,
}
_KAIWO_BUILT_TYPES = frozenset({"ray", "aim"})
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
        raise InvalidArgumentError(source, text, f"valid YAML ({problem})") from None
    except RecursionError:
        raise InvalidArgumentError(source, text, "YAML nested less deeply") from None
    except ValueError as error:  # a value YAML's constructors cannot build: 5,000 digits
        problem = str(error).split(";", 1)[0]  # not Python's hint of sys.set_int_max_str_digits
        raise InvalidArgumentError(source, text, f"valid YAML ({problem})") from None
    if len(documents) != 1:
        allowed = "exactly one document (split a multi-document file and pass each part)"
        raise InvalidArgumentError(source, f"{len(documents)} YAML documents", allowed)
    return _mapping(documents[0], source, required=True)


def request_from_pod(
    manifest: Mapping[str, object],
    *,
    amd_gpu_unit: AmdGpuUnit = AmdGpuUnit.AUTO,
    request_id: str | None = None,
) -> AllocationRequest:
    """The request one pod of `manifest` (a Pod or a workload with a pod template) makes."""
    root = _mapping(manifest, "manifest", required=True)
    kind = root.get("kind")
    if not isinstance(kind, str) or kind not in POD_TEMPLATE_KEYS:
        raise InvalidArgumentError("kind", kind, "one of " + ", ".join(POD_TEMPLATE_KEYS))
    metadata = _mapping(root.get("metadata"), "metadata")
    namespace, name, uid = _identity(metadata)

    template, prefix = _pod_template(root, kind)
    pod_meta_path = f"{prefix}.metadata" if prefix else "metadata"
    pod_metadata = _mapping(template.get("metadata"), pod_meta_path) if prefix else metadata
    spec_path = f"{prefix}.spec" if prefix else "spec"
    spec = _mapping(template.get("spec"), spec_path)

    annotations = _gpu_annotations(pod_metadata, pod_meta_path)
    if prefix:
        for key, value in _gpu_annotations(metadata, "metadata").items():
            on_pods = annotations.get(key)
            if kind in KAIWO_KINDS and on_pods is None:
                annotations[key] = value
            elif on_pods != value:
                allowed = (
                    f"{on_pods!r}, as {pod_meta_path}.annotations says (or only one of them)"
                    if kind in KAIWO_KINDS
                    else f"it on {pod_meta_path}.annotations: pods get only the template's"
                )
                raise InvalidArgumentError(f"metadata.annotations[{key}]", value, allowed)
    amd_gpu, unit = _pod_amd_gpu(spec, spec_path, amd_gpu_unit)
    shape = parse_gpu_annotations(annotations, amd_gpu, unit)
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


def _pod_template(root: Mapping[str, object], kind: str) -> tuple[Mapping[str, object], str]:
    """The pod template of `root` and its manifest path ('' for a Pod, which is its own)."""
    shapes = POD_TEMPLATE_KEYS[kind]
    if kind in KAIWO_KINDS:
        _refuse_kaiwo_built_pods(_mapping(root.get("spec"), "spec"))
    given = [keys for keys in shapes if _reaches(root, keys)]
    if len(given) > 1:
        for keys in given:
            _walk(root, keys)  # a malformed one is the error to name
        first, second = (".".join(keys) for keys in given[:2])
        allowed = f"one pod template: {first} or {second}, not both"
        raise InvalidArgumentError(second, "a second pod template", allowed)
    if not given and kind in KAIWO_KINDS:
        spellings = " or ".join(".".join(keys) for keys in shapes)
        allowed = (
            f"a pod template at {spellings}: without one, Kaiwo builds the pod from "
            "spec.image and spec.entrypoint, and kaiwo-gpu cannot see its GPU amount"
        )
        raise InvalidArgumentError(".".join(shapes[0]), None, allowed)
    keys = given[0] if given else shapes[0]
    return _walk(root, keys), ".".join(keys)


def _reaches(root: Mapping[str, object], keys: tuple[str, ...]) -> bool:
    """Whether the manifest gives something at `keys` (a non-mapping on the way counts)."""
    node: object = root
    for key in keys:
        if not isinstance(node, Mapping):
            return node is not None
        node = node.get(key)
    return node is not None


def _walk(root: Mapping[str, object], keys: tuple[str, ...]) -> Mapping[str, object]:
    node, path = root, ""
    for key in keys:
        path = f"{path}.{key}" if path else key
        node = _mapping(node.get(key), path)
    return node


def _refuse_kaiwo_built_pods(spec: Mapping[str, object]) -> None:
    """Kaiwo fields that have Kaiwo build or size the pods, which no pod template then says."""
    for key, allowed in _KAIWO_POD_BUILDERS.items():
        value = spec.get(key)
        if value is not False and not _asks_for_none(value):
            raise InvalidArgumentError(f"spec.{key}", value, allowed)
    workload_type = spec.get("type")
    if isinstance(workload_type, str) and workload_type.lower() in _KAIWO_BUILT_TYPES:
        allowed = _KAIWO_POD_BUILDERS[workload_type.lower()]
        raise InvalidArgumentError("spec.type", workload_type, allowed)


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


def _asks_for_none(value: object) -> bool:
    """An amount of GPUs that is none: unset, 0 or "0" (not False, which is no number)."""
    return value is None or (type(value) is int and value == 0) or value == "0"


def _gpu_amount(value: object, path: str, unit: AmdGpuUnit) -> tuple[int, AmdGpuUnit]:
    """A container's `amd.com/gpu` in its unit's own amounts and that unit; 0 is none."""
    if _asks_for_none(value):
        return 0, unit
    try:
        return read_amd_gpu(value, unit)  # type: ignore[arg-type]  # it judges any value
    except InvalidArgumentError as error:
        raise InvalidArgumentError(path, value, error.allowed) from None


@dataclass(frozen=True, slots=True)
class _ContainerGpu:
    path: str
    amount: int  # in `unit`, the configured one with `auto` resolved
    unit: AmdGpuUnit
    restart_policy: object


def _container_gpu(item: object, path: str, unit: AmdGpuUnit) -> _ContainerGpu:
    container = _mapping(item, path, required=True)
    resources = _mapping(container.get("resources"), f"{path}.resources")
    limits = _mapping(resources.get("limits"), f"{path}.resources.limits")
    requests = _mapping(resources.get("requests"), f"{path}.resources.requests")
    limit_path = f"{path}.resources.limits[{AMD_GPU_RESOURCE}]"
    request_path = f"{path}.resources.requests[{AMD_GPU_RESOURCE}]"
    limit, resolved = _gpu_amount(limits.get(AMD_GPU_RESOURCE), limit_path, unit)
    if requests.get(AMD_GPU_RESOURCE) is not None:
        request, _ = _gpu_amount(requests[AMD_GPU_RESOURCE], request_path, unit)
        if request != limit or limits.get(AMD_GPU_RESOURCE) is None:
            allowed = (
                f"the same amount as requests[{AMD_GPU_RESOURCE}] "
                f"({requests[AMD_GPU_RESOURCE]!r}): Kubernetes requires a limit equal to the "
                "request for extended resources"
            )
            raise InvalidArgumentError(limit_path, limits.get(AMD_GPU_RESOURCE), allowed)
    return _ContainerGpu(path, limit, resolved, container.get("restartPolicy"))


def _pod_unit(gpus: list[_ContainerGpu], unit: AmdGpuUnit) -> AmdGpuUnit:
    """The one unit the containers' amounts are in; `auto` may not read them in two."""
    asking = [gpu for gpu in gpus if gpu.amount]
    for gpu in asking[1:]:
        if gpu.unit is not asking[0].unit:
            allowed = (
                f"an amount in {asking[0].unit.value}s, as {asking[0].path} gives "
                f"({AUTO_UNIT_RULE}; set the unit to say which)"
            )
            field = f"{gpu.path}.resources.limits[{AMD_GPU_RESOURCE}]"
            raise InvalidArgumentError(field, gpu.amount, allowed)
    return asking[0].unit if asking else unit


def _pod_amd_gpu(
    spec: Mapping[str, object], spec_path: str, unit: AmdGpuUnit
) -> tuple[int | None, AmdGpuUnit]:
    """The pod's effective `amd.com/gpu` and its unit, by Kubernetes' rule, with sidecars."""
    containers_path = f"{spec_path}.containers"
    containers = _sequence(spec.get("containers"), containers_path)
    if not containers:
        raise InvalidArgumentError(containers_path, None, "a list of at least one container")
    init_path = f"{spec_path}.initContainers"
    main = [
        _container_gpu(item, f"{containers_path}[{i}]", unit) for i, item in enumerate(containers)
    ]
    init = [
        _container_gpu(item, f"{init_path}[{i}]", unit)
        for i, item in enumerate(_sequence(spec.get("initContainers"), init_path))
    ]
    pod_unit = _pod_unit(main + init, unit)
    sidecars = peak = 0
    for gpu in init:
        if gpu.restart_policy == "Always":
            sidecars += gpu.amount
            peak = max(peak, sidecars)
        elif gpu.restart_policy is None:
            peak = max(peak, sidecars + gpu.amount)
        else:
            field = f"{gpu.path}.restartPolicy"
            raise InvalidArgumentError(field, gpu.restart_policy, "Always (a sidecar) or unset")
    total = max(sum(gpu.amount for gpu in main) + sidecars, peak)
    if total == 0:
        return None, pod_unit
    try:
        read_amd_gpu(total, pod_unit)
    except InvalidArgumentError as error:
        field = f"{containers_path}[*].resources.limits[{AMD_GPU_RESOURCE}]"
        allowed = f"{error.allowed}, for the pod: containers + sidecars, or an init container"
        raise InvalidArgumentError(field, total, allowed) from None
    return total, pod_unit


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
