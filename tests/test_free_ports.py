"""Ports handed out for local servers are never handed out twice by one process."""

from __future__ import annotations

import socket

from kaiwo_gpu.coordinator.local.etcd import free_port


def test_ports_handed_out_are_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as probe:  # the last one is free to bind now
        probe.bind(("127.0.0.1", ports[-1]))
