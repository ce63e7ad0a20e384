"""The fault suite, one round: hosts in network namespaces, real processes, real faults.

Three etcd members, two coordinators and three agents on hosts of their own speak mutual
TLS while tenants allocate, renew and release and a schedule kills, partitions, freezes and
corrupts (see `tests.netns.suite`). The checker then replays etcd's whole history against
what the tenants were told. Runs where the tests run as root with `ip netns` (CI does);
elsewhere it is skipped with the reason. The longer soak: `python -m tests.netns.suite
--rounds 10`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import checker
from tests.netns.network import netns_unavailable
from tests.netns.suite import run_suite

pytestmark = [pytest.mark.integration, pytest.mark.netns]


@pytest.fixture
def namespaces() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"the fault suite needs network namespaces: {why}")


@pytest.mark.timeout(480)
@pytest.mark.usefixtures("namespaces")
def test_a_round_of_faults_breaks_no_invariant(tmp_path: Path) -> None:
    report = run_suite(tmp_path)
    shown = checker.table(report)
    print(shown)  # in the log of a failing run, and with -s
    assert report.violation_count == 0, shown
    # Every scheduled fault was injected: 12, or 11 on a kernel without sch_netem.
    assert len(report.faults) >= 11, shown
    for op in ("allocate", "keepalive", "release"):
        assert report.operations[(op, "ok")] > 20, shown
    assert report.revisions_checked > 1000, shown
    # Each side served again after each fault (the frozen coordinator once thawed).
    for fault, address, after, _ in report.recoveries:
        assert after is not None, f"{address} never granted after {fault!r}\n{shown}"
