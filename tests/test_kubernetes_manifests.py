"""deploy/kubernetes, rendered as kustomize would and checked offline: every object against
the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: an unknown field
fails), and the fields that tie the objects together against each other and against the
CLI's own parser. The coordinator's health probe runs against a real coordinator over
mutual TLS.

`render` is a small kustomize for the features these kustomizations use, and only those
(any other key fails here rather than being skipped): `resources` (files, and directories
holding a kustomization), `namespace`, `images`, `configMapGenerator` with `files` (the
name gets a content hash, not kustomize's exact one, and pod volumes of the same namespace
naming it follow) and `patches` by path as strategic merge on exactly one existing object,
merging the lists of containers, env, volumes and volumeMounts by kustomize's keys, new
items first. Where kubectl is on PATH, its built-in kustomize renders the same objects (a
test says so). No cluster is involved: deploy/kubernetes/README.md says what was not run.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import hashlib
import json
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kaiwo_gpu.common import credentials, pki
from kaiwo_gpu.common.channels import channel_credentials
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.identity import Role, from_uri
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import SERVICE_NAME
from kaiwo_gpu.coordinator.state.inventory import parse_inventory
from tests.conftest import coordinator_running
from tests.deployments import PROJECT, REPO, check_command, clean_environment, pinned, port_of

Object = dict[str, Any]

KUBERNETES = REPO / "deploy" / "kubernetes"
RENDERS = {
    "base": KUBERNETES / "base",
    "etcd": KUBERNETES / "etcd",
    "cert-manager": KUBERNETES / "cert-manager",
    "overlay": KUBERNETES / "overlays" / "example",
}
WITH_SERVICES = ("base", "overlay")
"""The renders that hold the coordinator and the agent."""
NAMESPACE = "kaiwo-gpu"
KUBECTL = shutil.which("kubectl")
KUBERNETES_VERSIONS = ("1.30", "1.37")
"""An older release still common on managed clusters, and the newest schemas shipped."""
CERT_MANAGER = "cert-manager.io/v1"
"""No schema ships for cert-manager's kinds: their fields are checked by hand below."""
CERT_MANAGER_KINDS = frozenset({"Issuer", "Certificate"})
"""The cert-manager kinds test_the_coordinator_certificate_names_what_clients_dial reads."""
CERTIFICATE_FIELDS = frozenset(
    {"secretName", "issuerRef", "commonName", "dnsNames", "uris", "usages", "privateKey"}
    | {"duration", "renewBefore"}
)
TLS_SECRET_KEYS = frozenset({"tls.crt", "tls.key", "ca.crt"})
"""What cert-manager writes, and what a Secret made by hand must hold (README.md)."""
FIELD_VALUES = {"spec.nodeName": "gpu-node-07", "metadata.name": "kaiwo-gpu-etcd-0"}
"""What the downward API would give, for the parser to check."""
PROBE_HOST = "127.0.0.1"
PROBE_TIMEOUT_S = float(runpy.run_path(str(KUBERNETES / "base" / "health_probe.py"))["TIMEOUT_S"])
"""How long the probe script itself waits for an answer (its __main__ block is not run)."""
CLIENT_LABEL = {"kaiwo-gpu/client": "true"}
CLIENT_NAMESPACE_LABEL = {"kaiwo-gpu/clients": "true"}
"""What an admin puts on a namespace whose labelled pods may call the coordinator: a pod's
own label is anyone's to set who can create one."""
HOST_PATH_TYPES = {"/dev/kfd": "CharDevice", "/dev/dri": "Directory"}
"""Without a type a missing device is bind-mounted as a new empty directory, and amdsmi
fails inside the pod instead of the pod failing to start."""
ETCD_LISTENERS = {
    "listen-client-urls": "client",
    "listen-peer-urls": "peer",
    "listen-metrics-urls": "metrics",
}
"""Each etcd listen flag and the container port (probes and Services name it) it serves."""
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})

KUSTOMIZATION_KEYS = frozenset(
    {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator", "patches"}
)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
"""Lists a strategic merge patch merges item by item, by this key of each item."""
REPLACED_LISTS = frozenset({"args", "command"})
"""Lists a strategic merge patch replaces whole."""
WORKLOADS = frozenset({"Deployment", "DaemonSet", "StatefulSet"})
CLUSTER_SCOPED = frozenset({"Namespace"})


# -- the renderer ------------------------------------------------------------------------


def _merge(base: Any, patch: Any, key: str) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        for name, value in patch.items():
            assert not name.startswith("$"), f"the renderer does not do the directive {name}"
            if value is None:
                base.pop(name, None)
            else:
                base[name] = _merge(base[name], value, name) if name in base else value
        return base
    if isinstance(base, list) and isinstance(patch, list) and key not in REPLACED_LISTS:
        assert key in MERGE_KEYS, f"the renderer does not know how kustomize merges {key!r}"
        by = MERGE_KEYS[key]
        added = []
        for item in patch:
            same = [old for old in base if old[by] == item[by]]
            if same:
                _merge(same[0], item, key)
            else:
                added.append(item)
        base[:0] = added  # kustomize puts new items first
        return base
    return patch


def split_image(image: str) -> tuple[str, str]:
    """(name, ':tag' or '@digest' or '') of an image reference."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, f"@{digest}"
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > image.rfind("/") else (image, "")


def pod_spec(workload: Object) -> Object:
    spec: Object = workload["spec"]["template"]["spec"]
    return spec


def containers(objects: list[Object]) -> list[tuple[Object, Object]]:
    """(workload, container) for every container of every workload."""
    return [
        (workload, container)
        for workload in objects
        if workload["kind"] in WORKLOADS
        for container in pod_spec(workload).get("initContainers", [])
        + pod_spec(workload)["containers"]
    ]


def _set_images(objects: list[Object], rules: list[Object]) -> None:
    for rule in rules:
        assert set(rule) <= {"name", "newName", "newTag", "digest"}, rule
    for _, container in containers(objects):
        name, suffix = split_image(container["image"])
        for rule in (rule for rule in rules if rule["name"] == name):
            if "digest" in rule:
                suffix = f"@{rule['digest']}"
            elif "newTag" in rule:
                suffix = f":{rule['newTag']}"
            container["image"] = rule.get("newName", name) + suffix


def _rename_config_maps(
    objects: list[Object], renamed: Mapping[tuple[str | None, str], str]
) -> None:
    """Pod volumes naming a generated ConfigMap take its hashed name, as kustomize's name
    references do: only from a pod of the ConfigMap's own namespace."""
    for workload, container in containers(objects):
        assert "envFrom" not in container, "the renderer does not rename ConfigMaps in envFrom"
        for variable in container.get("env", []):
            assert "configMapKeyRef" not in variable.get("valueFrom", {}), variable
        namespace = workload["metadata"].get("namespace")
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                volume["configMap"]["name"] = renamed.get((namespace, name), name)


@functools.cache
def _render(directory: Path) -> tuple[Object, ...]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test's renderer does not do {sorted(unknown)}"
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += copy.deepcopy(list(_render(path)))
        else:
            objects += [item for item in yaml.safe_load_all(path.read_text()) if item]
    generated: list[tuple[str, Object]] = []
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) == {"name", "files"}, generator
        data = {Path(file).name: (directory / file).read_text() for file in generator["files"]}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{generator['name']}-{digest}"},
            "data": data,
        }
        generated.append((generator["name"], config_map))
        objects.append(config_map)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"only patches by path: {entry}"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        identity = (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
        targets = [o for o in objects if (o["apiVersion"], o["kind"], name_of(o)) == identity]
        assert len(targets) == 1, f"{entry['path']} patches {len(targets)} objects"
        _merge(targets[0], patch, "")
    if "namespace" in kustomization:
        for item in objects:
            if item["kind"] not in CLUSTER_SCOPED:
                item["metadata"]["namespace"] = kustomization["namespace"]
    _set_images(objects, kustomization.get("images", []))
    renamed = {(c["metadata"].get("namespace"), original): name_of(c) for original, c in generated}
    _rename_config_maps(objects, renamed)
    return tuple(objects)


def render(name: str) -> list[Object]:
    return copy.deepcopy(list(_render(RENDERS[name])))


# -- reading a render --------------------------------------------------------------------


def name_of(item: Object) -> str:
    name: str = item["metadata"]["name"]
    return name


def of_kind(objects: list[Object], kind: str) -> list[Object]:
    return [item for item in objects if item["kind"] == kind]


def workload_with(objects: list[Object], container_name: str) -> tuple[Object, Object]:
    (found,) = [pair for pair in containers(objects) if pair[1]["name"] == container_name]
    return found


def pod_labels(workload: Object) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector's verdict: matchLabels and matchExpressions, all of them."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        verdict = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not verdict:
            return False
    return True


def selected_workloads(objects: list[Object], selector: Mapping[str, Any]) -> list[Object]:
    return [w for w in objects if w["kind"] in WORKLOADS and selects(selector, pod_labels(w))]


def container_port(container: Object, port: int | str) -> int | None:
    """The number of `port` (a name or a number) among the container's declared ports."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            number: int = declared["containerPort"]
            return number
    return None


def environment(container: Object) -> dict[str, str]:
    values: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
        else:
            values[variable["name"]] = FIELD_VALUES[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    return values


def flag_values(arguments: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in arguments if a.startswith("--"))


def parse(container: Object) -> argparse.Namespace:
    """The container's args under its environment, as the CLI parses them."""
    return check_command(container["args"], environment(container))


def coordinator_service(objects: list[Object]) -> tuple[Object, Object]:
    """The Service in front of the coordinators, and its port for their gRPC port."""
    workload, container = workload_with(objects, "coordinator")
    (service,) = [
        s
        for s in of_kind(objects, "Service")
        if selects({"matchLabels": s["spec"]["selector"]}, pod_labels(workload))
    ]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert container_port(container, port["targetPort"]) == container_port(container, "grpc")
    return service, port


def service_dns_name(service: Object) -> str:
    return f"{name_of(service)}.{service['metadata']['namespace']}.svc"


# -- the checks --------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", RENDERS)
def test_every_object_validates_against_the_kubernetes_schemas(name: str, version: str) -> None:
    objects = render(name)
    assert objects
    unschemed = {item["kind"] for item in objects if item["apiVersion"] == CERT_MANAGER}
    assert unschemed <= CERT_MANAGER_KINDS, f"{name}: no check reads {unschemed}"
    for item in (item for item in objects if item["apiVersion"] != CERT_MANAGER):
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.absolute_path))
            pytest.fail(f"{name}: {item['kind']}/{name_of(item)}: {where}: {error.message}")


@pytest.mark.parametrize("name", RENDERS)
def test_everything_lives_in_one_namespace(name: str) -> None:
    """A namespaced object without one lands in kubectl's current namespace, away from the
    pods that mount it."""
    objects = render(name)
    assert objects, name
    for item in objects:
        expected = None if item["kind"] in CLUSTER_SCOPED else NAMESPACE
        assert item["metadata"].get("namespace") == expected, f"{item['kind']}/{name_of(item)}"
    assert [name_of(n) for n in of_kind(objects, "Namespace")] == (
        [NAMESPACE] if name in WITH_SERVICES else []
    )


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_every_volume_names_an_object_of_its_namespace(name: str) -> None:
    """A pod whose ConfigMap or Secret is missing never starts. ConfigMaps come from the
    render; the coordinator's Secret from the render's Certificate, or (the base alone) from
    the operator, as README.md says."""
    objects = render(name)
    certificates = [c for c in objects if c["apiVersion"] == CERT_MANAGER]
    checked = 0
    for workload in (w for w in objects if w["kind"] in WORKLOADS):
        namespace = workload["metadata"]["namespace"]
        present = {
            (item["kind"], name_of(item))
            for item in objects
            if item["metadata"].get("namespace") == namespace
        } | {
            ("Secret", c["spec"]["secretName"])
            for c in certificates
            if c["kind"] == "Certificate" and c["metadata"]["namespace"] == namespace
        }
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                wanted = ("ConfigMap", volume["configMap"]["name"])
            elif "secret" in volume and name == "overlay":
                wanted = ("Secret", volume["secret"]["secretName"])
            else:
                continue
            assert wanted in present, f"{name_of(workload)} mounts {wanted}, not in {namespace}"
            checked += 1
    assert checked, f"{name}: no pod mounts a ConfigMap or Secret"


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_a_group_readable_secret_is_readable_by_its_pod(name: str) -> None:
    """A Secret whose files others may not read (0440) is read through the group, which
    the kubelet makes fsGroup: it must be the group the pod runs as."""
    checked = 0
    objects = render(name)
    for workload, container in containers(objects):
        pod = pod_spec(workload).get("securityContext", {})
        runs_as = pod | container.get("securityContext", {})
        if runs_as.get("runAsUser") == 0:
            continue  # root reads it whatever its mode
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            # (a StatefulSet's claims are not among its volumes)
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret is None:
                continue
            modes = {secret.get("defaultMode", 0o644)}
            modes |= {i["mode"] for i in secret.get("items", []) if "mode" in i}
            for mode in (m for m in modes if not m & 0o004):
                where = f"{name_of(workload)}/{container['name']}: {oct(mode)}"
                assert mode & 0o040, f"{where}: only root can read it"
                assert pod.get("fsGroup") is not None, f"{where}: owned by root's group"
                assert pod["fsGroup"] == runs_as.get("runAsGroup"), where
                checked += 1
    assert checked, "the coordinator's TLS Secret is mode 0440"


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_the_scrape_annotations_name_the_metrics_port(name: str) -> None:
    """(Each metrics listener is tied to the `metrics` port elsewhere: the CLI's
    --metrics-listen in test_the_services_run_what_the_cli_accepts, etcd's
    --listen-metrics-urls in test_the_etcd_example_is_three_members_the_coordinators_reach.)"""
    annotated = 0
    for workload in (w for w in render(name) if w["kind"] in WORKLOADS):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" not in annotations:
            assert annotations.get("prometheus.io/scrape") != "true", name_of(workload)
            continue
        declared = [container_port(c, "metrics") for c in pod_spec(workload)["containers"]]
        assert int(annotations["prometheus.io/port"]) in declared, name_of(workload)
        annotated += 1
    assert annotated, f"{name}: no workload is annotated for Prometheus"


@pytest.mark.integration  # it runs kubectl
@pytest.mark.skipif(KUBECTL is None, reason="kubectl (its built-in kustomize) is not on PATH")
@pytest.mark.parametrize("name", RENDERS)
def test_the_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    """Where kubectl is installed, the renderer every other check reads is held to
    kustomize itself (generated names aside: kustomize's hash is its own)."""
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(RENDERS[name])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    theirs = [item for item in yaml.safe_load_all(done.stdout) if item]
    assert _comparable(render(name)) == _comparable(theirs)


def _comparable(objects: list[Object]) -> list[str]:
    """The objects as sorted JSON, with each generated name's hash suffix made one."""
    generators = {
        generator["name"]
        for kustomization in KUBERNETES.rglob("kustomization.yaml")
        for generator in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", [])
    }
    texts = []
    for item in objects:
        text = json.dumps(item, sort_keys=True)
        for generator in generators:
            text = re.sub(rf'"{re.escape(generator)}-[a-z0-9]{{10}}"', f'"{generator}-#"', text)
        texts.append(text)
    return sorted(texts)


@pytest.mark.parametrize("name", [*WITH_SERVICES, "etcd"])
def test_images_are_pinned_and_of_one_release(name: str) -> None:
    images = {container["name"]: container["image"] for _, container in containers(render(name))}
    assert images, name
    for container_name, image in images.items():
        assert pinned(image), f"{container_name}: {image} is not pinned"
    if "etcd" in images:
        compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
        repository = split_image(images["etcd"])[0]
        etcd_images = {
            service["image"]
            for service in compose["services"].values()
            if split_image(service.get("image", ""))[0] == repository
        }
        assert etcd_images == {images["etcd"]}, "one etcd release for compose and Kubernetes"
    if name in WITH_SERVICES:
        version = PROJECT["version"]
        assert split_image(images["coordinator"])[1] == f":{version}"
        assert split_image(images["agent"])[1].startswith(f":{version}-rocm")


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_the_services_run_what_the_cli_accepts(name: str) -> None:
    """Args and KAIWO_GPU_* variables through check_command: a variable no flag reads
    (a typo) would be ignored by the CLI, so it fails here. (The images' entry point is
    the CLI: test_dockerfiles.py checks it.)"""
    objects = render(name)
    parsed: dict[str, tuple[Object, argparse.Namespace]] = {}
    for command in ("coordinator", "agent"):
        _, container = workload_with(objects, command)
        assert "command" not in container, "the image's entry point is kaiwo-gpu"
        args = parse(container)
        assert args.command == command
        held = (args.tls_ca, args.tls_cert, args.tls_key)
        assert None not in held, f"{command} without mutual TLS"
        assert port_of(args.metrics_listen) == container_port(container, "metrics")
        parsed[command] = container, args
    coordinator, args = parsed["coordinator"]
    assert not args.insecure
    assert not credentials.is_loopback(args.listen), "other pods could not reach it"
    assert port_of(args.listen) == container_port(coordinator, "grpc")


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_the_agents_dial_the_coordinator_service(name: str) -> None:
    objects = render(name)
    service, port = coordinator_service(objects)
    daemonset, agent = workload_with(objects, "agent")
    args = parse(agent)
    assert args.coordinator == (f"{service_dns_name(service)}:{port['port']}",)
    assert args.node == FIELD_VALUES["spec.nodeName"]
    mounted = {mount["mountPath"] for mount in agent["volumeMounts"]}
    assert {"/dev/kfd", "/dev/dri"} <= mounted
    assert agent["securityContext"]["privileged"], "amdsmi needs the host's device nodes"
    assert agent["securityContext"].get("runAsUser") == 0 or pod_spec(daemonset).get(
        "securityContext", {}
    ).get("supplementalGroups"), "the image's user is in no host group that owns /dev/kfd"


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_a_root_agent_sees_the_hosts_processes(name: str) -> None:
    """Root is there for amdsmi's per-process VRAM, which it reads from /proc: in the pod's
    own PID namespace it finds only the agent. The Dockerfile's `docker run` advice agrees."""
    daemonset, agent = workload_with(render(name), "agent")
    if agent["securityContext"].get("runAsUser") == 0:
        assert pod_spec(daemonset).get("hostPID") is True, "root without the host's /proc"
    comment = " ".join(
        line.lstrip("# ")
        for line in (REPO / "deploy" / "Dockerfile.agent").read_text().splitlines()
        if line.startswith("#")
    )
    if "--user 0" in comment:
        assert "--pid=host" in comment, "docker run --user 0 alone sees no other process"


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_every_host_path_is_checked_for_its_type(name: str) -> None:
    daemonset, agent = workload_with(render(name), "agent")
    volumes = {v["name"]: v for v in pod_spec(daemonset)["volumes"]}
    types = {
        mount["mountPath"]: volumes[mount["name"]]["hostPath"].get("type", "")
        for mount in agent["volumeMounts"]
        if "hostPath" in volumes[mount["name"]]
    }
    assert all(types.values()), f"a host path without a type: {types}"
    assert {path: types.get(path) for path in HOST_PATH_TYPES} == HOST_PATH_TYPES


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_the_files_the_services_read_are_mounted(name: str) -> None:
    """Every path a setting or the probe names lies in a volume that holds it: a key of a
    ConfigMap of the render, a key a TLS Secret has, or a directory of the host."""
    objects = render(name)
    config_maps = {name_of(c): c["data"] for c in of_kind(objects, "ConfigMap")}
    checked: set[str] = set()
    for workload, container in containers(objects):
        if container["name"] not in ("coordinator", "agent"):
            continue
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        paths = [value for value in environment(container).values() if value.startswith("/")]
        paths += [
            container[probe]["exec"]["command"][1]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe")
            if probe in container
        ]
        for path in paths:
            (mount,) = [
                m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")
            ]
            key = path.removeprefix(mount["mountPath"] + "/")
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                assert key in config_maps[volume["configMap"]["name"]], path
            elif "secret" in volume:
                assert key in TLS_SECRET_KEYS, path
            else:
                assert volume["hostPath"]["type"] == "Directory", path
            checked.add(container["name"])
    assert checked == {"coordinator", "agent"}, f"{name}: only {checked} read a file"
    if name == "overlay":
        (inventory,) = [data for n, data in config_maps.items() if "inventory" in n]
        assert parse_inventory(inventory["nodes.yaml"], "the inventory ConfigMap")


@pytest.mark.parametrize("name", WITH_SERVICES)
def test_the_coordinator_probes_check_grpc_health_on_its_port(name: str) -> None:
    objects = render(name)
    service, _ = coordinator_service(objects)
    _, container = workload_with(objects, "coordinator")
    wanted = {"startupProbe": [], "livenessProbe": [], "readinessProbe": [SERVICE_NAME]}
    for probe, service_name in wanted.items():
        python, script, address, server_name, *asked = container[probe]["exec"]["command"]
        assert (python, Path(script).name) == ("python", "health_probe.py")
        assert address == f"{PROBE_HOST}:{container_port(container, 'grpc')}", probe
        assert server_name == service_dns_name(service), "the name agents check, too"
        assert asked == service_name, probe
        assert container[probe]["timeoutSeconds"] > PROBE_TIMEOUT_S, "the probe's own timeout"
    startup = container["startupProbe"]
    etcd_wait_s = parse(container).etcd_wait
    assert startup["periodSeconds"] * startup["failureThreshold"] > etcd_wait_s


@pytest.mark.parametrize("name", [*WITH_SERVICES, "etcd"])
def test_every_probe_and_service_names_a_declared_port(name: str) -> None:
    objects = render(name)
    probes = 0
    for _, container in containers(objects):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            handler = container.get(probe, {})
            for kind in ("httpGet", "tcpSocket", "grpc"):
                if kind in handler:
                    assert container_port(container, handler[kind]["port"]), (probe, kind)
            probes += probe in container
    assert probes, f"{name}: no container is probed"
    assert of_kind(objects, "Service"), f"{name} has no Service"
    for service in of_kind(objects, "Service"):
        (workload,) = selected_workloads(objects, {"matchLabels": service["spec"]["selector"]})
        for port in service["spec"]["ports"]:
            declared = pod_spec(workload)["containers"]
            assert any(container_port(c, port["targetPort"]) for c in declared), (
                f"Service {name_of(service)} port {port['name']}"
            )


@pytest.mark.parametrize("name", [*WITH_SERVICES, "etcd"])
def test_disruption_budgets_cover_their_workloads(name: str) -> None:
    objects = render(name)
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets
    for budget in budgets:
        (workload,) = selected_workloads(objects, budget["spec"]["selector"])
        assert budget["spec"]["selector"] == workload["spec"]["selector"]
        replicas, floor = workload["spec"]["replicas"], budget["spec"]["minAvailable"]
        assert 1 <= floor < replicas, "a drain could never proceed, or nothing would stay"
        policy = budget["spec"].get("unhealthyPodEvictionPolicy", "IfHealthyBudget")
        if workload["kind"] == "StatefulSet":
            assert floor > replicas // 2, "etcd must keep its quorum"
            # A not-ready member still votes: evicting it could take the quorum away.
            assert policy == "IfHealthyBudget", name_of(budget)
        else:
            # Stateless, and NotReady together whenever etcd is away: drains must go on.
            assert policy == "AlwaysAllow", name_of(budget)


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    labelled_namespace: Mapping[str, str] = field(default_factory=dict)
    """The labels an admin put on the pod's namespace."""

    @property
    def namespace_labels(self) -> dict[str, str]:
        # kubernetes.io/metadata.name is set by Kubernetes itself
        return {**self.labelled_namespace, "kubernetes.io/metadata.name": self.namespace}


def admitted(objects: list[Object], source: Pod, workload: Object, port: str) -> bool:
    """Whether the NetworkPolicies admit `source` to the container port named `port` of
    `workload`'s pods (ingress; a pod no policy selects admits everything)."""
    namespace, labels = workload["metadata"]["namespace"], pod_labels(workload)
    declared = pod_spec(workload)["containers"]
    (number,) = {container_port(c, port) for c in declared} - {None}
    policies = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True

    def port_matches(entry: Object) -> bool:
        assert "endPort" not in entry
        wanted = entry.get("port")
        return entry.get("protocol", "TCP") == "TCP" and (
            wanted is None or any(container_port(c, wanted) == number for c in declared)
        )

    def peer_matches(peer: Object) -> bool:
        assert "ipBlock" not in peer, "the check knows pods, not addresses"
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], source.namespace_labels):
                return False
        elif source.namespace != namespace:
            return False
        return selects(peer.get("podSelector", {}), source.labels)

    return any(
        ("ports" not in rule or any(map(port_matches, rule["ports"])))
        and ("from" not in rule or any(map(peer_matches, rule["from"])))
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
    )


def test_network_policies_admit_only_what_must_reach_each_port() -> None:
    objects = render("overlay")
    coordinator, _ = workload_with(objects, "coordinator")
    agent, _ = workload_with(objects, "agent")
    etcd, _ = workload_with(objects, "etcd")

    def pod_of(workload: Object) -> Pod:
        return Pod(workload["metadata"]["namespace"], pod_labels(workload))

    client = Pod("ml-jobs", CLIENT_LABEL, CLIENT_NAMESPACE_LABEL)
    self_labelled = Pod("scratch", CLIENT_LABEL)  # its own label, in a namespace no admin chose
    stranger = Pod("ml-jobs", {"app": "notebook"}, CLIENT_NAMESPACE_LABEL)
    labelled_neighbour = Pod("kaiwo-gpu", CLIENT_LABEL)
    neighbour = Pod("kaiwo-gpu", {"app": "debug-shell"})
    prometheus = Pod(*PROMETHEUS)
    cases = [
        (pod_of(agent), coordinator, "grpc", True),
        (client, coordinator, "grpc", True),
        (self_labelled, coordinator, "grpc", False),
        (labelled_neighbour, coordinator, "grpc", False),
        (stranger, coordinator, "grpc", False),
        (neighbour, coordinator, "grpc", False),
        (Pod("ml-jobs", pod_labels(agent)), coordinator, "grpc", False),
        (prometheus, coordinator, "metrics", True),
        (client, coordinator, "metrics", False),
        (pod_of(agent), coordinator, "metrics", False),
        (prometheus, agent, "metrics", True),
        (stranger, agent, "metrics", False),
        (pod_of(coordinator), etcd, "client", True),
        (pod_of(agent), etcd, "client", False),
        (client, etcd, "client", False),
        (neighbour, etcd, "client", False),
        (prometheus, etcd, "client", False),
        (pod_of(etcd), etcd, "peer", True),
        (pod_of(coordinator), etcd, "peer", False),
        (prometheus, etcd, "metrics", True),
        (pod_of(coordinator), etcd, "metrics", False),
    ]
    wrong = [
        f"{source} -> {name_of(target)}:{port} should be {'admitted' if expected else 'refused'}"
        for source, target, port, expected in cases
        if admitted(objects, source, target, port) != expected
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", ["etcd", "overlay"])
def test_the_etcd_example_is_three_members_the_coordinators_reach(name: str) -> None:
    objects = render(name)
    members, container = workload_with(objects, "etcd")
    spec, namespace = members["spec"], members["metadata"]["namespace"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel", "no member is ready before a quorum"
    (peers,) = [s for s in of_kind(objects, "Service") if name_of(s) == spec["serviceName"]]
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"], "members must find each other first"
    domain = f"{name_of(peers)}.{namespace}.svc"
    flags = flag_values(container["args"])
    peer, client = container_port(container, "peer"), container_port(container, "client")
    assert flags["initial-cluster"] == ",".join(
        f"{name_of(members)}-{i}=http://{name_of(members)}-{i}.{domain}:{peer}"
        for i in range(spec["replicas"])
    )
    assert flags["name"] == "$(POD_NAME)"
    assert flags["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{domain}:{peer}"
    assert flags["advertise-client-urls"] == f"http://$(POD_NAME).{domain}:{client}"
    assert environment(container)["POD_NAME"] == FIELD_VALUES["metadata.name"]
    for flag, port_name in ETCD_LISTENERS.items():
        (url,) = [urlsplit(u) for u in flags[flag].split(",")]
        assert url.hostname == "0.0.0.0", f"--{flag}: other pods and the kubelet reach it"
        assert url.port == container_port(container, port_name), f"--{flag}"
    if name == "etcd":
        quota = check_command(["coordinator"], {}).etcd_quota
    else:
        _, coordinator = workload_with(objects, "coordinator")
        args = parse(coordinator)
        quota = args.etcd_quota
        ((host, port),) = [endpoint.rsplit(":", 1) for endpoint in args.etcd]
        (service,) = [s for s in of_kind(objects, "Service") if service_dns_name(s) == host]
        assert selected_workloads(objects, {"matchLabels": service["spec"]["selector"]}) == [
            members
        ]
        (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
        assert container_port(container, target) == client
    assert int(flags["quota-backend-bytes"]) == quota, "the coordinator warns at 80% of it"


@pytest.mark.parametrize("name", ["cert-manager", "overlay"])
def test_the_coordinator_certificate_names_what_clients_dial(name: str) -> None:
    objects = render(name)
    (certificate,) = of_kind(objects, "Certificate")
    spec = certificate["spec"]
    assert set(spec) <= CERTIFICATE_FIELDS, set(spec) - CERTIFICATE_FIELDS
    issuers = {name_of(i): i for i in of_kind(objects, "Issuer")}
    assert spec["issuerRef"]["kind"] == "Issuer"
    assert issuers[spec["issuerRef"]["name"]]["spec"]["ca"]["secretName"]
    assert {"server auth", "client auth"} <= set(spec["usages"]), "it serves and probes"
    (uri,) = spec["uris"]
    identity = from_uri(uri)
    assert identity is not None
    assert identity.role is Role.COORDINATOR
    if name == "overlay":
        service, _ = coordinator_service(objects)
        assert service_dns_name(service) in spec["dnsNames"]
        coordinator, _ = workload_with(objects, "coordinator")
        (tls,) = [v for v in pod_spec(coordinator)["volumes"] if "secret" in v]
        assert tls["secret"]["secretName"] == spec["secretName"]


# -- the probe, run ----------------------------------------------------------------------


def _pod_files(root: Path, certificate: Object, container: Object, objects: list[Object]) -> None:
    """The coordinator pod's mounted files under `root`: the probe from its ConfigMap, and a
    TLS Secret as cert-manager would write it for the Certificate's names."""
    workload, _ = workload_with(objects, "coordinator")
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    config_maps = {name_of(c): c["data"] for c in of_kind(objects, "ConfigMap")}
    ca = pki.new_ca()
    holder = from_uri(certificate["spec"]["uris"][0])
    assert holder is not None
    pair = pki.issue(ca, holder, sans=tuple(certificate["spec"]["dnsNames"]))
    secret = {
        "tls.crt": pair.certificate_pem,
        "tls.key": pair.key_pem,
        "ca.crt": ca.certificate_pem,
    }
    for mount in container["volumeMounts"]:
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            for key, data in secret.items():
                (directory / key).write_bytes(data)
        elif "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]].items():
                (directory / key).write_text(text)


async def _probe(
    command: list[str], root: Path, port: int, env: Mapping[str, str]
) -> tuple[int, str]:
    python, script, address, *rest = command
    assert python == "python"
    assert address.rpartition(":")[0] == PROBE_HOST
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(root / script.lstrip("/")),
        f"{PROBE_HOST}:{port}",
        *rest,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_probes_pass_on_a_serving_coordinator_over_mutual_tls(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    """The overlay's probe script and commands, the Secret its Certificate asks for, a real
    coordinator with that certificate requiring client certificates."""
    objects = render("overlay")
    _, container = workload_with(objects, "coordinator")
    (certificate,) = of_kind(objects, "Certificate")
    root = tmp_path / "pod"
    _pod_files(root, certificate, container, objects)
    pod_env = {
        variable: str(root / value.lstrip("/")) if value.startswith("/") else value
        for variable, value in environment(container).items()
    }
    env = clean_environment() | pod_env
    tls = credentials.from_environment(pod_env)
    assert tls.tls_ca is not None, "the pod holds no CA"
    assert tls.tls_cert is not None, "the pod holds no certificate"
    async with coordinator_running(etcd.endpoint, prefix, None, tls=tls) as running:
        port = port_of(running.target)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            code, output = await _probe(container[probe]["exec"]["command"], root, port, env)
            assert code == 0, f"{probe}: {output}"
            assert output.rstrip().endswith(": SERVING"), output

        # What losing the etcd watch does: readiness fails, liveness does not.
        await running.coordinator.health.set(
            SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING
        )
        code, output = await _probe(container["readinessProbe"]["exec"]["command"], root, port, env)
        assert (code, "NOT_SERVING" in output) == (1, True), output
        code, output = await _probe(container["livenessProbe"]["exec"]["command"], root, port, env)
        assert code == 0, output

        # The name is checked: a certificate without the name it is dialed by fails.
        command = [*container["livenessProbe"]["exec"]["command"]]
        command[3] = "kaiwo-gpu-coordinator.elsewhere.svc"
        code, output = await _probe(command, root, port, env)
        assert code == 1, output

        # Why not the kubelet's `grpc:` probe: plaintext, no client certificate; and TLS
        # without one is refused as well, so the probe must hold the pod's.
        anonymous = channel_credentials(Credentials(tls_ca=tls.tls_ca))
        assert anonymous is not None
        name = [("grpc.ssl_target_name_override", certificate["spec"]["dnsNames"][0])]
        for channel in (
            grpc.aio.insecure_channel(running.target),
            grpc.aio.secure_channel(running.target, anonymous, options=name),
        ):
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=3
                    )
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
