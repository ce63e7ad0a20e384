"""Writes etcd's whole revision history under a prefix as JSON lines, for the checker, and
(`--stamps`) when each revision was seen.

Runs on the client host (`python -m tests.netns.etcd_dump ...`), since etcd listens only
inside the namespaces. It puts an end marker under the prefix and reads the history from
revision 1 up to it (`tests.harness.history_until_now`), so the last revision read is
known to be the newest. One line per change: revision, key, value (base64, null for a
delete) and lease.

etcd's revisions carry no time, so during a run `--stamps FILE --for SECONDS` watches the
prefix and writes, per watch response, its revision and the CLOCK_MONOTONIC reading when it
arrived: an upper bound on when each revision up to it happened (later than the truth while
the watch was broken and caught up, never earlier).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.store import EtcdStore
from tests.harness import history_until_now


async def dump(endpoints: list[str], security: EtcdSecurity, prefix: bytes, out: Path) -> int:
    """Changes written."""
    store = EtcdStore(endpoints, security=security, timeout_s=10.0)
    written = 0
    try:
        with out.open("w") as file:
            async for change in history_until_now(store, prefix):
                value = None if change.value is None else base64.b64encode(change.value)
                file.write(json.dumps({
                    "revision": change.revision,
                    "key": change.key.decode(errors="replace"),
                    "value": None if value is None else value.decode(),
                    "lease": change.lease,
                }) + "\n")  # fmt: skip
                written += 1
    finally:
        await store.close()
    return written


RESUME_PAUSE_S = 0.2


async def stamp(
    endpoints: list[str], security: EtcdSecurity, prefix: bytes, out: Path, for_s: float
) -> int:
    """Stamps each watch response's revision until `for_s` have passed; returns how many."""
    store = EtcdStore(endpoints, security=security, timeout_s=5.0)
    deadline = time.monotonic() + for_s
    written, start = 0, 0
    try:
        with out.open("a") as file:
            while time.monotonic() < deadline:
                try:
                    start = start or await store.revision() + 1
                    watch = store.watch(prefix, start)
                    while True:
                        revision, _ = await asyncio.wait_for(
                            anext(watch), max(0.01, deadline - time.monotonic())
                        )
                        if revision:
                            file.write(json.dumps({"revision": revision,
                                                   "seen": time.monotonic()}) + "\n")  # fmt: skip
                            file.flush()
                            written += 1
                            start = revision + 1
                except (UnavailableError, StopAsyncIteration):
                    await asyncio.sleep(RESUME_PAUSE_S)  # the member went: resume from start
                except TimeoutError:
                    break
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
    parser.add_argument("--out", type=Path, help="write the whole history here")
    parser.add_argument("--stamps", type=Path, help="stamp revisions as they come, here")
    parser.add_argument("--for", dest="for_s", type=float, default=600.0)
    args = parser.parse_args(argv)
    security = EtcdSecurity(ca=args.ca, cert=args.cert, key=args.key)
    endpoints, prefix = args.endpoints.split(","), args.prefix.encode()
    if args.stamps is not None:
        stamped = asyncio.run(stamp(endpoints, security, prefix, args.stamps, args.for_s))
        print(json.dumps({"stamped": stamped}))
    elif args.out is not None:
        print(json.dumps({"changes": asyncio.run(dump(endpoints, security, prefix, args.out))}))
    else:
        parser.error("give --out or --stamps")


if __name__ == "__main__":
    main(sys.argv[1:])
