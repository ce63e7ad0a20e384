"""How each end of a connection knows the other is alive, set once for both ends.

An agent's stream: the coordinator promises in its registration answer to send something
at least every HEARTBEAT_S (a heartbeat when it has nothing else to say), and an agent that
hears nothing for MISSED_HEARTBEATS of those, or gets no answer to its registration in as
long, ends the stream and tries its next coordinator. gRPC keepalive alone does not find a
frozen peer while the stream keeps writing: its pings queue behind the writes.

A coordinator that is stopped (SIGSTOP, a hung host) keeps its TCP connections open. Every
channel to a coordinator pings after PING_AFTER_MS without a frame from it and drops the
connection when no answer comes within PING_TIMEOUT_MS, so a client's retry (each attempt
has its own timeout) dials again, and the next address if the target names several. The
coordinator accepts pings that often, with or without calls (by default it answers GOAWAY
"too_many_pings" to anything more frequent than every 5 minutes, which is what agents got).
"""

from __future__ import annotations

HEARTBEAT_S = 2.0
MISSED_HEARTBEATS = 3

PING_AFTER_MS = 2_000
PING_TIMEOUT_MS = 2_000

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", PING_AFTER_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
"""For every channel to a coordinator: agents' and clients'."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", PING_AFTER_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    # The coordinator's own pings find a frozen agent host; its stream check (no batch for
    # three intervals) finds a silent one.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
)
"""For the coordinator's server: the pings above are welcome."""
