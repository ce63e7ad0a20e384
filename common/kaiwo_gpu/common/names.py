"""What names and free text from the network may look like: one rule each, used everywhere.

Nodes are named like their hosts, and Kubernetes names them the same way, so a node name is
a DNS-1123 subdomain wherever it appears (a request's selector, an agent's registration,
the inventory file, `--node`). Request ids, GPU UUIDs, model names and reasons likewise have
one rule each; the modules that read them check with these functions.

Free text (reasons, model names, process names, PCI addresses) must be printable: no
control, format or separator character other than the space, so a forged reason cannot
move a terminal's cursor, retitle it or fake a line. What reaches a terminal anyway (from
an older coordinator, or an error message) goes through `escaped`.
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
ALLOCATION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ALLOCATION_ID_RULE = "1-128 characters of [A-Za-z0-9._-]"
GPU_UUID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GPU_UUID_RULE = "1-128 characters of [A-Za-z0-9._:-]"
GPU_MODEL = re.compile(r"\S{1,64}")
GPU_MODEL_RULE = "a market name of 1-64 printable characters without spaces"
PRINTABLE_RULE = "printable characters only (no control, format or line-separator characters)"
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


def check_allocation_id(value: object, field: str) -> str:
    """An allocation id as Get, Release and KeepAlive take it, and as a page token is one
    (the last id of the page before)."""
    if not isinstance(value, str) or not ALLOCATION_ID.fullmatch(value):
        raise InvalidArgumentError(field, value, ALLOCATION_ID_RULE)
    return value


def check_gpu_uuid(value: object, field: str) -> str:
    if not isinstance(value, str) or not GPU_UUID.fullmatch(value):
        raise InvalidArgumentError(field, value, GPU_UUID_RULE)
    return value


def check_gpu_model(value: object, field: str) -> str:
    if not isinstance(value, str) or not GPU_MODEL.fullmatch(value) or not value.isprintable():
        raise InvalidArgumentError(field, value, GPU_MODEL_RULE)
    return value


def check_reason(value: object, field: str) -> str:
    return check_text(value, field, MAX_REASON_CHARS)


def check_text(value: object, field: str, max_chars: int) -> str:
    """Free text from the network: at most `max_chars`, printable (`str.isprintable`)."""
    if not isinstance(value, str) or len(value) > max_chars or not value.isprintable():
        raise InvalidArgumentError(
            field, value, f"a text of up to {max_chars} characters, {PRINTABLE_RULE}"
        )
    return value


def escaped(text: str) -> str:
    """The text with each character that is not printable written as an escape (`\\x1b`),
    for a terminal: whatever a message carries, it cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
