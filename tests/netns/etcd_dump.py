"""Writes etcd's whole revision history under a prefix as JSON lines, for the checker.

Runs on the client host (`python -m tests.netns.etcd_dump ...`), since etcd listens only
inside the namespaces. It puts an end marker under the prefix and reads the history from
revision 1 up to it, as `tests.harness.audit_history` does, so the last revision read is
known to be the newest. One line per change: revision, key, value (base64, null for a
delete) and lease.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from pathlib import Path

from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.store import EtcdStore

END_MARKER = b"netns-audit-end"


async def dump(endpoints: list[str], security: EtcdSecurity, prefix: bytes, out: Path) -> int:
    """Changes written; the marker's own put and delete are left out."""
    store = EtcdStore(endpoints, security=security, timeout_s=10.0)
    written = 0
    try:
        marker = prefix + END_MARKER
        final = (await store.commit(Txn(puts=(Put(marker, b""),)))).revision
        with out.open("w") as file:
            async for revision, changes in store.watch(prefix, 1):
                for change in changes:
                    if change.key == marker:
                        continue
                    value = None if change.value is None else base64.b64encode(change.value)
                    file.write(json.dumps({
                        "revision": change.revision,
                        "key": change.key.decode(errors="replace"),
                        "value": None if value is None else value.decode(),
                        "lease": change.lease,
                    }) + "\n")  # fmt: skip
                    written += 1
                if revision >= final:
                    break
        await store.commit(Txn(deletes=(marker,)))
    finally:
        await store.close()
    return written


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns.etcd_dump")
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--prefix", default="/kaiwo-gpu/v1/")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    security = EtcdSecurity(ca=args.ca, cert=args.cert, key=args.key)
    written = asyncio.run(dump(args.endpoints.split(","), security, args.prefix.encode(), args.out))
    print(json.dumps({"changes": written}))


if __name__ == "__main__":
    main(sys.argv[1:])
