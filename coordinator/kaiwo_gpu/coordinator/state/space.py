"""How close etcd is to its space quota, in words an operator acts on (pure).

At the quota etcd raises NOSPACE and refuses every write, so Allocate and Release fail for
everyone until someone compacts, defragments and disarms the alarm by hand. The coordinator
reads etcd's database size periodically and says so well before: in its log, loudly, and
in GetClusterStats (`kaiwo-gpu stats`).
"""

from __future__ import annotations

WARN_AT_FRACTION = 0.8


def space_warning(db_size_bytes: int, quota_bytes: int) -> str:
    """A warning when the database holds WARN_AT_FRACTION of the quota or more, else ""."""
    if quota_bytes <= 0 or db_size_bytes < WARN_AT_FRACTION * quota_bytes:
        return ""
    used = db_size_bytes / quota_bytes
    return (
        f"etcd's database is {db_size_bytes / 2**20:.1f} MiB, {used:.0%} of its "
        f"{quota_bytes / 2**20:.0f} MiB quota; at the quota every write fails (NOSPACE): "
        "compact and defragment it (etcdctl compact, etcdctl defrag), or raise "
        "--quota-backend-bytes and --etcd-quota together"
    )
