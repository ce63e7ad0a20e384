"""Kubernetes manifests in, AllocationRequests (or errors that name the manifest path) out."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.annotations import AmdGpuUnit
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.common.pods import load_manifest, request_from_pod

PODS = Path(__file__).parent / "pods"
TERM = (
    "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
)


def load(name: str) -> Mapping[str, object]:
    return load_manifest((PODS / name).read_text(), source=name)


def request(name: str, **options: object) -> AllocationRequest:
    return request_from_pod(load(name), **options)  # type: ignore[arg-type]


def pod(**spec: object) -> dict[str, object]:
    """A minimal valid pod asking for half a GPU; keyword arguments replace spec keys."""
    body: dict[str, object] = {
        "containers": [{"name": "main", "resources": {"limits": {"amd.com/gpu": 500}}}]
    }
    body.update(spec)
    return {"kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}, "spec": body}


def refused(manifest: object, **options: object) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        request_from_pod(manifest, **options)  # type: ignore[arg-type]
    return caught.value


# Good manifests ---------------------------------------------------------------------------


def test_training_pod_with_kaiwo_annotations() -> None:
    req = request("pytorch-training-pod.yaml")
    assert (
        req.request_id == "k8s:ml-research/llama-finetune-7b:4f1c2b7e-9d0a-4c55-8e2f-1a6b3c9d7e01"
    )
    assert req.owner == "ml-research/llama-finetune-7b"
    assert (req.count, req.fraction_millis, req.memory_mib) == (1, 500, 24 * 1024)
    assert req.isolation is Isolation.CU_MASK
    assert req.sharing is True
    assert req.labels == (("app.kubernetes.io/name", "llama-finetune"), ("team", "nlp"))
    assert req.selector.is_empty


def test_inference_deployment_uses_template_and_workload_identity() -> None:
    req = request("inference-deployment.yaml")
    assert req.owner == "serving/vllm-mistral"
    assert (
        req.request_id == "k8s:serving/deployment/vllm-mistral:0b8a6d52-3f7e-4a1b-9c0d-5e6f7a8b9c0d"
    )
    assert (req.count, req.fraction_millis, req.memory_mib) == (1, 500, None)
    assert req.labels == (("app", "vllm-mistral"), ("tier", "inference"))
    assert req.selector.node_labels == (("amd.com/gpu.product-name", "MI300X"),)


def test_job_counts_whole_devices_in_device_unit() -> None:
    req = request("training-job-devices.yaml", amd_gpu_unit=AmdGpuUnit.DEVICE)
    assert (req.count, req.fraction_millis) == (2, 1000)
    assert req.sharing is False
    assert req.needs_idle_gpu
    assert req.request_id == "k8s:vision/job/resnet-ddp"
    assert req.owner == "vision/resnet-ddp"


def test_same_job_in_milli_unit_is_too_small_and_says_so() -> None:
    error = refused(load("training-job-devices.yaml"), amd_gpu_unit=AmdGpuUnit.MILLI)
    assert error.field == "spec.template.spec.containers[0].resources.limits[amd.com/gpu]"
    assert "100-1000 millis" in error.allowed


def test_same_job_in_the_default_auto_unit_counts_devices() -> None:
    req = request("training-job-devices.yaml")
    assert (req.count, req.fraction_millis) == (2, 1000)


def test_kaiwojob_reads_the_jobs_pod_template_and_its_own_annotations() -> None:
    req = request("kaiwojob.yaml")
    assert (req.count, req.fraction_millis, req.memory_mib) == (1, 500, 4000)
    assert req.sharing is True
    assert req.isolation is Isolation.NONE
    assert "time-slicing" in req.isolation_note
    assert req.owner == "research/amd-gpu-fractional-job"
    assert req.request_id == "k8s:research/kaiwojob/amd-gpu-fractional-job"
    assert req.labels == (("app", "fractional-job"),)


def test_kaiwojob_in_the_proof_of_concepts_shape_asks_the_same() -> None:
    upstream = load("kaiwojob.yaml")
    poc: dict[str, Any] = copy.deepcopy(dict(upstream))
    poc["spec"]["template"] = poc["spec"].pop("job")["spec"]["template"]
    assert request_from_pod(poc) == request_from_pod(upstream)


def test_kaiwoservice_reads_the_deployments_pod_template() -> None:
    req = request("kaiwoservice.yaml")
    assert (req.count, req.fraction_millis, req.memory_mib) == (1, 250, 32 * 1024)
    assert req.request_id == (
        "k8s:serving/kaiwoservice/vllm-online:7d2e9a41-5b3c-4f10-8e6d-2c9b0a1f3e57"
    )
    assert req.labels == (("app", "vllm-online"),)
    assert req.selector.node_labels == (("amd.com/gpu.product-name", "MI300X"),)


def kaiwo(kind: str, **spec: object) -> dict[str, object]:
    return {"kind": kind, "metadata": {"name": "k", "namespace": "ns"}, "spec": spec}


_TEMPLATE = {"spec": {"containers": [{"resources": {"limits": {"amd.com/gpu": 500}}}]}}


@pytest.mark.parametrize(
    ("manifest", "field", "allowed"),
    [
        (kaiwo("KaiwoJob", image="rocm/pytorch", entrypoint="python x.py"),
         "spec.job.spec.template", "spec.job.spec.template or spec.template"),
        (kaiwo("KaiwoService", image="rocm/vllm"),
         "spec.deployment.spec.template", "spec.deployment.spec.template or spec.template"),
        (kaiwo("KaiwoJob", gpus=1, template=_TEMPLATE), "spec.gpus", "0 or unset"),
        (kaiwo("KaiwoJob", gpusPerReplica=2, replicas=2, template=_TEMPLATE),
         "spec.gpusPerReplica", "0 or unset"),
        (kaiwo("KaiwoJob", rayJob={"spec": {"entrypoint": "python x.py"}}), "spec.rayJob",
         "head and worker pods"),
        (kaiwo("KaiwoJob", ray=True, template=_TEMPLATE), "spec.ray", "head and worker pods"),
        (kaiwo("KaiwoService", ray={"serveConfigV2": "applications: []"}), "spec.ray",
         "head and worker pods"),
        (kaiwo("KaiwoService", type="Ray", deployment={"spec": {"template": _TEMPLATE}}),
         "spec.type", "head and worker pods"),
        (kaiwo("KaiwoService", aim={"model": "meta/llama-3-8b"}), "spec.aim", "AIM"),
        (kaiwo("KaiwoJob", template=_TEMPLATE, job={"spec": {"template": _TEMPLATE}}),
         "spec.template", "not both"),
        (kaiwo("KaiwoJob", job="batch/v1 Job", template=_TEMPLATE), "spec.job", "a mapping"),
        ({"kind": "KaiwoJob", "metadata": {"name": "k"}, "spec": []}, "spec", "a mapping"),
    ],
)  # fmt: skip
def test_kaiwo_shapes_without_one_readable_pod_template_name_the_field(
    manifest: dict[str, object], field: str, allowed: str
) -> None:
    error = refused(manifest)
    assert error.field == field
    assert allowed in error.allowed


def test_kaiwo_shapes_kaiwo_does_not_size_are_fine() -> None:
    req = request_from_pod(kaiwo("KaiwoJob", gpus=0, ray=False, replicas=3, template=_TEMPLATE))
    assert (req.count, req.fraction_millis) == (1, 500)
    quoted = request_from_pod(kaiwo("KaiwoJob", gpus="0", template=_TEMPLATE))
    assert quoted.fraction_millis == 500  # "0" is no GPU, as amd.com/gpu reads it
    service = kaiwo("KaiwoService", type="deployment", deployment={"spec": {"template": _TEMPLATE}})
    assert request_from_pod(service).fraction_millis == 500


def test_kaiwo_annotations_on_the_object_and_the_template_must_agree() -> None:
    manifest = load("kaiwojob.yaml")
    broken = copy.deepcopy(dict(manifest))
    template = broken["spec"]["job"]["spec"]["template"]  # type: ignore[index]
    template["metadata"]["annotations"] = {"kaiwo.ai/gpu-fraction": "0.25"}
    error = refused(broken)
    assert error.field == "metadata.annotations[kaiwo.ai/gpu-fraction]"
    assert "'0.25', as spec.job.spec.template.metadata.annotations says" in error.allowed
    template["metadata"]["annotations"] = {"kaiwo.ai/gpu-fraction": "0.5"}
    assert request_from_pod(broken).fraction_millis == 500


def with_gpu(*amounts: object) -> dict[str, object]:
    containers = [{"resources": {"limits": {"amd.com/gpu": amount}}} for amount in amounts]
    return pod(containers=containers)


@pytest.mark.parametrize(
    ("amounts", "fraction", "expected"),
    [
        ((1,), "0.5", (1, 500)),
        (("2",), "0.5", (2, 500)),
        ((1,), None, (1, 1000)),
        ((64,), None, (64, 1000)),
        ((1, 1), "0.3", (2, 300)),
        ((100,), None, (1, 100)),
        (("500",), None, (1, 500)),
        ((500,), "0.5", (1, 500)),
        ((250, 250), None, (1, 500)),
        ((2000,), None, (2, 1000)),
    ],
)
def test_auto_unit_reads_below_100_as_devices_and_the_rest_as_millis(
    amounts: tuple[object, ...], fraction: str | None, expected: tuple[int, int]
) -> None:
    manifest = with_gpu(*amounts)
    if fraction is not None:
        manifest["metadata"] = {"name": "p", "annotations": {"kaiwo.ai/gpu-fraction": fraction}}
    req = request_from_pod(manifest)
    assert (req.count, req.fraction_millis) == expected


def test_auto_unit_refuses_what_neither_reading_takes() -> None:
    error = refused(with_gpu(99))
    assert error.field == "spec.containers[0].resources.limits[amd.com/gpu]"
    assert "1-64 devices" in error.allowed
    assert "below 100 as devices" in error.allowed
    assert "below 100 as devices" in refused(with_gpu(1500)).allowed
    assert "1-64 devices" in refused(with_gpu(40, 40)).allowed  # 80 devices for the pod


def test_auto_unit_refuses_devices_and_millis_in_one_pod() -> None:
    error = refused(with_gpu(1, 500))
    assert error.field == "spec.containers[1].resources.limits[amd.com/gpu]"
    assert "an amount in devices, as spec.containers[0] gives" in error.allowed


def test_a_fraction_contradicting_a_milli_amount_is_still_refused_in_auto() -> None:
    manifest = with_gpu(500)
    manifest["metadata"] = {"name": "p", "annotations": {"kaiwo.ai/gpu-fraction": "0.25"}}
    assert refused(manifest).field == "annotation kaiwo.ai/gpu-fraction"


@pytest.mark.parametrize(
    ("amount", "unit", "expected"),
    [
        (500, AmdGpuUnit.MILLI, (1, 500)),
        (2000, AmdGpuUnit.MILLI, (2, 1000)),
        (1, AmdGpuUnit.MILLI, "100-1000 millis"),
        (99, AmdGpuUnit.MILLI, "100-1000 millis"),
        (1, AmdGpuUnit.DEVICE, (1, 1000)),
        (99, AmdGpuUnit.DEVICE, "1-64 devices"),
        (500, AmdGpuUnit.DEVICE, "1-64 devices"),
    ],
)
def test_explicit_milli_and_device_units_read_as_before(
    amount: int, unit: AmdGpuUnit, expected: tuple[int, int] | str
) -> None:
    manifest = with_gpu(amount)
    if isinstance(expected, str):
        assert expected in refused(manifest, amd_gpu_unit=unit).allowed
        return
    req = request_from_pod(manifest, amd_gpu_unit=unit)
    assert (req.count, req.fraction_millis) == expected


def test_a_missing_limit_is_called_missing() -> None:
    error = refused(load("broken-no-gpu.yaml"))
    assert str(error).startswith("spec.containers[*].resources.limits[amd.com/gpu]: missing;")
    request_only = pod(containers=[{"resources": {"requests": {"amd.com/gpu": 500}}}])
    message = str(refused(request_only))
    assert message.startswith("spec.containers[0].resources.limits[amd.com/gpu]: missing;")
    assert "None" not in message


def test_node_selector_and_hostname_affinity_become_the_selector() -> None:
    req = request("pinned-pod.yaml")
    assert req.request_id == "k8s:jupyter/notebook-alice"
    assert req.fraction_millis == 250
    selector = req.selector
    assert selector.nodes == {"gpu-node-01", "gpu-node-02", "gpu-node-03"}
    assert selector.exclude_nodes == {"gpu-node-03"}
    assert dict(selector.node_labels) == {
        "amd.com/gpu.family": "AI",
        "topology.kubernetes.io/zone": "eu-west-1a",
    }


def test_init_container_peak_is_the_pod_request() -> None:
    # Containers and the sidecar need 300 + 100; the first init container alone needs 800.
    assert request("init-containers-pod.yaml").fraction_millis == 800


def test_cronjob_reads_the_job_templates_pod_template() -> None:
    req = request("nightly-eval-cronjob.yaml")
    assert (req.fraction_millis, req.memory_mib) == (None, 16 * 1024)
    assert req.labels == (("app", "nightly-eval"),)
    assert req.request_id == "k8s:ml-research/cronjob/nightly-eval"


def test_containers_add_up_and_strings_equal_ints() -> None:
    spec = pod(
        containers=[
            {"name": "a", "resources": {"limits": {"amd.com/gpu": "250"}}},
            {"name": "b", "resources": {"limits": {"amd.com/gpu": 250}, "requests": {}}},
            {"name": "c", "resources": {"limits": {"amd.com/gpu": 0}}},
        ]
    )
    assert request_from_pod(spec).fraction_millis == 500


def test_native_sidecars_add_to_containers_and_to_later_init_containers() -> None:
    sidecar = {
        "name": "s",
        "restartPolicy": "Always",
        "resources": {"limits": {"amd.com/gpu": 200}},
    }
    late_init = {"name": "i", "resources": {"limits": {"amd.com/gpu": 700}}}
    assert request_from_pod(pod(initContainers=[sidecar])).fraction_millis == 700
    assert request_from_pod(pod(initContainers=[sidecar, late_init])).fraction_millis == 900
    assert request_from_pod(pod(initContainers=[late_init, sidecar])).fraction_millis == 700


def test_given_request_id_wins_and_namespace_defaults() -> None:
    manifest = pod()
    manifest["metadata"] = {"name": "p"}
    req = request_from_pod(manifest, request_id="retry-7")
    assert (req.request_id, req.owner) == ("retry-7", "default/p")
    assert request_from_pod(manifest).request_id == "k8s:default/p"


def test_long_names_hash_to_a_deterministic_valid_id() -> None:
    manifest = pod()
    manifest["metadata"] = {"name": "x" * 200, "namespace": "n" * 40, "uid": "u-1"}
    first = request_from_pod(manifest).request_id
    assert first == request_from_pod(copy.deepcopy(manifest)).request_id
    assert first.startswith("k8s:")
    assert len(first) <= 128
    manifest["metadata"] = {"name": "x" * 200, "namespace": "n" * 40, "uid": "u-2"}
    assert request_from_pod(manifest).request_id != first


def test_match_fields_and_node_name_pin_nodes() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]},
                            {"key": "metadata.name", "operator": "NotIn", "values": ["n9"]},
                        ]
                    }
                ]
            },
        }
    }
    selector = request_from_pod(pod(affinity=affinity, nodeName="n2")).selector
    assert selector.nodes == {"n2"}
    assert selector.exclude_nodes == {"n9"}


def test_a_hostname_node_selector_pins_the_node_not_a_label() -> None:
    selector = request_from_pod(
        pod(nodeSelector={"kubernetes.io/hostname": "n3", "zone": "a"})
    ).selector
    assert selector.nodes == {"n3"}
    assert selector.node_labels == (("zone", "a"),)
    clash = refused(pod(nodeSelector={"kubernetes.io/hostname": "n3"}, nodeName="n4"))
    assert "spec" in clash.field


def test_non_kaiwo_annotations_and_preferences_are_ignored() -> None:
    manifest = pod(
        affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": "x"}}
    )
    manifest["metadata"] = {"name": "p", "annotations": {"kaiwo.ai/queue": 3, "a/b": None}}
    assert request_from_pod(manifest).selector.is_empty


# Broken manifests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field", "allowed"),
    [
        ("broken-unknown-annotation.yaml", "annotation kaiwo.ai/gpu-fractoin", "gpu-fraction"),
        ("broken-fraction-out-of-range.yaml", "annotation kaiwo.ai/gpu-fraction", "0.1 to 1.0"),
        (
            "broken-fraction-contradicts-resource.yaml",
            "annotation kaiwo.ai/gpu-fraction",
            "amd.com/gpu: 500 (500 millis)",
        ),
        (
            "broken-limits-not-requests.yaml",
            "spec.containers[1].resources.limits[amd.com/gpu]",
            "the same amount as requests[amd.com/gpu] (250)",
        ),
        (
            "broken-two-affinity-terms.yaml",
            TERM.removesuffix("[0]"),
            "exactly one term",
        ),
        ("broken-exists-operator.yaml", f"{TERM}.matchExpressions[2].operator", "In with one"),
        ("broken-no-name.yaml", "metadata.name", "generateName"),
        ("broken-service.yaml", "kind", "Pod, Deployment, StatefulSet"),
        (
            "broken-no-gpu.yaml",
            "spec.containers[*].resources.limits[amd.com/gpu]",
            "this pod asks for no GPU",
        ),
    ],
)
def test_broken_manifests_name_the_field_and_what_is_allowed(
    name: str, field: str, allowed: str
) -> None:
    error = refused(load(name))
    assert error.field == field
    assert allowed in error.allowed
    assert field in str(error)


def _pod_asking(amount: str) -> dict[str, object]:
    limits = {"amd.com/gpu": amount}
    resources = {"limits": limits, "requests": limits}
    spec = {"containers": [{"resources": resources}]}
    return {"kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


@pytest.mark.parametrize("amount", ["1" * 5000, "1" + "0" * 12])
def test_an_amd_gpu_amount_of_any_length_is_refused_not_a_traceback(amount: str) -> None:
    assert "up to 64000" in refused(_pod_asking(amount)).allowed


def test_leading_zeros_do_not_make_an_amd_gpu_amount_too_long() -> None:
    assert request_from_pod(_pod_asking("0" * 30 + "500")).fraction_millis == 500


def test_multi_document_yaml_names_the_source() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        load("broken-multi-document.yaml")
    assert caught.value.field == "broken-multi-document.yaml"
    assert "exactly one document" in caught.value.allowed


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        load("broken-syntax.yaml")
    assert caught.value.field == "broken-syntax.yaml line 7"
    assert caught.value.value == "labels: app: broken"
    assert "valid YAML" in caught.value.allowed


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("", "exactly one document"),
        ("- a\n- b\n", "a mapping"),
        ("[" * 5000, "nested less deeply"),
        ("a: *b", "undefined alias"),
        ("a: " + "1" * 5000, "integer string conversion"),  # int() refuses 4,300+ digits
    ],
)
def test_load_manifest_refuses_what_is_not_one_object(text: str, allowed: str) -> None:
    with pytest.raises(InvalidArgumentError, match=allowed):
        load_manifest(text, source="stdin")


def test_workload_annotations_outside_the_template_are_an_error() -> None:
    manifest = load("inference-deployment.yaml")
    broken = copy.deepcopy(dict(manifest))
    broken["metadata"]["annotations"] = {"kaiwo.ai/gpu-fraction": "0.5"}  # type: ignore[index]
    error = refused(broken)
    assert error.field == "metadata.annotations[kaiwo.ai/gpu-fraction]"
    assert "spec.template.metadata.annotations" in error.allowed


@pytest.mark.parametrize(
    ("expression", "field_suffix", "allowed"),
    [
        ({"key": "zone", "operator": "In", "values": ["a", "b"]}, ".values", "one value"),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, ".operator", "NotIn on other"),
        ({"key": "gen", "operator": "Gt", "values": ["3"]}, ".operator", "Gt"),
        ({"key": "kubernetes.io/hostname", "operator": "In", "values": []}, ".values", "node"),
        ({"key": "kubernetes.io/hostname", "operator": "In", "values": ["a b"]}, ".values", "name"),
        ({"key": "zone", "operator": "In", "values": [3]}, ".values", "strings"),
        ({"key": "zone", "operator": "In", "values": ["bad value!"]}, "[zone]", "label value"),
        ({"key": "team", "operator": "In", "values": ["b"]}, ".values", "'a'"),
        (["not", "a", "mapping"], "", "a mapping"),
    ],
)
def test_unsupported_or_malformed_expressions_name_their_path(
    expression: object, field_suffix: str, allowed: str
) -> None:
    term = {"matchExpressions": [expression]}
    manifest = pod(
        nodeSelector={"team": "a"},
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        },
    )
    error = refused(manifest)
    path = f"{TERM}.matchExpressions[0]"
    assert error.field == path + field_suffix
    assert allowed in error.allowed


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"containers": {"name": "main"}}, "spec.containers"),
        ({"containers": []}, "spec.containers"),
        ({"containers": ["main"]}, "spec.containers[0]"),
        ({"containers": [{"resources": []}]}, "spec.containers[0].resources"),
        ({"containers": [{"resources": {"limits": "1"}}]}, "spec.containers[0].resources.limits"),
        (
            {"containers": [{"resources": {"limits": {"amd.com/gpu": "500m"}}}]},
            "spec.containers[0].resources.limits[amd.com/gpu]",
        ),
        (
            {"containers": [{"resources": {"limits": {"amd.com/gpu": 0.5}}}]},
            "spec.containers[0].resources.limits[amd.com/gpu]",
        ),
        (
            {"containers": [{"resources": {"requests": {"amd.com/gpu": 500}}}]},
            "spec.containers[0].resources.limits[amd.com/gpu]",
        ),
        (
            {
                "containers": [
                    {"resources": {"limits": {"amd.com/gpu": 1000}}},
                    {"resources": {"limits": {"amd.com/gpu": 500}}},
                ]
            },
            "spec.containers[*].resources.limits[amd.com/gpu]",
        ),
        (
            {"initContainers": [{"restartPolicy": "OnFailure"}]},
            "spec.initContainers[0].restartPolicy",
        ),
        ({"nodeSelector": ["gpu"]}, "spec.nodeSelector"),
        ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector.key"),
        ({"nodeName": 7}, "spec.nodeName"),
        ({"nodeName": "no spaces"}, "spec.nodeName"),
        ({"affinity": []}, "spec.affinity"),
        ({"affinity": {"nodeAffinity": "x"}}, "spec.affinity.nodeAffinity"),
        (
            {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": 1}}},
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
        ),
    ],
)
def test_malformed_spec_names_the_path(spec: dict[str, object], field: str) -> None:
    assert refused(pod(**spec)).field == field


def test_empty_and_contradictory_node_terms_are_errors() -> None:
    def with_term(term: object, **spec: object) -> dict[str, object]:
        required = {"nodeSelectorTerms": [term]}
        return pod(
            affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}},
            **spec,
        )

    assert refused(with_term({})).field == TERM
    hosts = {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}
    assert refused(with_term({"matchExpressions": [hosts]}, nodeName="n2")).field.endswith(
        "matchExpressions[0].values"
    )
    avoid = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}
    assert refused(with_term({"matchExpressions": [hosts, avoid]})).field == "spec.affinity"
    other_field = {"key": "metadata.uid", "operator": "In", "values": ["n1"]}
    assert refused(with_term({"matchFields": [other_field]})).field == f"{TERM}.matchFields[0].key"


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        ({"kind": "Pod", "metadata": [], "spec": {}}, "metadata"),
        ({"kind": "Pod", "metadata": {"name": "Bad_Name"}}, "metadata.name"),
        ({"kind": "Pod", "metadata": {"name": "p", "namespace": 3}}, "metadata.namespace"),
        ({"kind": "Pod", "metadata": {"name": "p", "uid": 3}}, "metadata.uid"),
        ({"metadata": {"name": "p"}}, "kind"),
        ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": []}, "spec"),
        (
            {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {}}},
            "spec.template.spec.containers",
        ),
        (
            {"kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": "x"}},
            "spec.jobTemplate",
        ),
        ("kind: Pod", "manifest"),
    ],
)
def test_malformed_objects_name_the_path(manifest: object, field: str) -> None:
    assert refused(manifest).field == field


def test_annotation_values_must_be_strings() -> None:
    manifest = pod()
    manifest["metadata"] = {"name": "p", "annotations": {"kaiwo.ai/gpu-fraction": 0.5}}
    error = refused(manifest)
    assert error.field == "annotation kaiwo.ai/gpu-fraction"
    assert "quote" in error.allowed


def test_bad_labels_name_the_template_path() -> None:
    manifest = load("nightly-eval-cronjob.yaml")
    broken = copy.deepcopy(dict(manifest))
    template = broken["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[index]
    template["metadata"]["labels"] = {"app": "no spaces allowed"}
    field = refused(broken).field
    assert field == "spec.jobTemplate.spec.template.metadata.labels[app]"


# Properties -------------------------------------------------------------------------------


@given(st.integers(min_value=100, max_value=1000), st.booleans())
def test_any_milli_amount_round_trips_to_fraction_millis(millis: int, as_text: bool) -> None:
    amount: object = str(millis) if as_text else millis
    manifest = pod(containers=[{"resources": {"limits": {"amd.com/gpu": amount}}}])
    req = request_from_pod(manifest)
    assert (req.count, req.fraction_millis) == (1, millis)


@given(st.integers(min_value=1, max_value=64))
def test_any_device_count_round_trips_to_count(devices: int) -> None:
    manifest = pod(containers=[{"resources": {"limits": {"amd.com/gpu": devices}}}])
    req = request_from_pod(manifest, amd_gpu_unit=AmdGpuUnit.DEVICE)
    assert (req.count, req.fraction_millis) == (devices, 1000)


_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_SPOTS = [
    ("metadata",),
    ("metadata", "annotations"),
    ("spec", "containers"),
    ("spec", "containers", 0),
    ("spec", "containers", 0, "resources", "limits"),
    ("spec", "initContainers"),
    ("spec", "nodeSelector"),
    ("spec", "affinity"),
    ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution"),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SPOTS), _JUNK)
def test_junk_anywhere_is_an_invalid_argument_never_a_crash(
    spot: tuple[str | int, ...], junk: object
) -> None:
    manifest: dict[str, object] = pod(affinity={"nodeAffinity": {}})
    node: object = manifest
    for key in spot[:-1]:
        node = node[key]  # type: ignore[index]
    node[spot[-1]] = junk  # type: ignore[index]
    field = "no error"
    try:
        request_from_pod(manifest)
    except InvalidArgumentError as error:
        field = error.field
    assert field
