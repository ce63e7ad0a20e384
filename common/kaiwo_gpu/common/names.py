"""What names and free text from the network may look like: one rule each, used everywhere.

Nodes are named like their hosts, and Kubernetes names them the same way, so a node name is
a DNS-1123 subdomain wherever it appears (a request's selector, an agent's registration,
the inventory file, `--node`). Request ids, GPU UUIDs, model names and reasons likewise have
one rule each; the modules that read them check with these functions.
"""

from __future__ import annotations

import re

from kaiwo_gpu.common.errors import InvalidArgumentError

DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
NODE_NAME_RULE = (
    "a DNS-1123 name: 1-253 lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit"
)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
REQUEST_ID_RULE = "1-128 characters of [A-Za-z0-9._:/-]"
GPU_UUID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GPU_UUID_RULE = "1-128 characters of [A-Za-z0-9._:-]"
GPU_MODEL = re.compile(r"\S{1,64}")
GPU_MODEL_RULE = "a market name of 1-64 characters without spaces"
AGENT_BACKENDS = ("amdsmi", "simulated")
"""The backends an agent may say it reads its GPUs through."""
MAX_REASON_CHARS = 256
"""A health or cordon reason: enough for a sentence, too short to flood a table."""


def is_node_name(value: object) -> bool:
    return isinstance(value, str) and DNS_SUBDOMAIN.fullmatch(value) is not None


def check_node_name(value: object, field: str) -> str:
    if not is_node_name(value):
        raise InvalidArgumentError(field, value, NODE_NAME_RULE)
    assert isinstance(value, str)
    return value


def is_request_id(value: object) -> bool:
    return isinstance(value, str) and REQUEST_ID.fullmatch(value) is not None


def check_request_id(value: object, field: str) -> str:
    if not is_request_id(value):
        raise InvalidArgumentError(field, value, REQUEST_ID_RULE)
    assert isinstance(value, str)
    return value


def check_gpu_uuid(value: object, field: str) -> str:
    if not isinstance(value, str) or not GPU_UUID.fullmatch(value):
        raise InvalidArgumentError(field, value, GPU_UUID_RULE)
    return value


def check_gpu_model(value: object, field: str) -> str:
    if not isinstance(value, str) or not GPU_MODEL.fullmatch(value):
        raise InvalidArgumentError(field, value, GPU_MODEL_RULE)
    return value


def check_reason(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        shown = "(too long)" if isinstance(value, str) else value
        raise InvalidArgumentError(field, shown, f"a text of up to {MAX_REASON_CHARS} characters")
    return value
