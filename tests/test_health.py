"""The health classifier: rules, hysteresis and staleness, as sequences of readings in and
verdicts out (pure, so no clock and no backend)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.agent.backend import GpuReading
from kaiwo_gpu.agent.health import (
    Cause,
    GpuHealth,
    HealthLimits,
    classify,
    initial,
    limits_for,
    stale,
)
from kaiwo_gpu.common.models import Health

LIMITS = HealthLimits(
    hotspot_limit_c=110,
    hotspot_warn_c=100,
    memory_limit_c=95,
    memory_warn_c=85,
    stale_after_s=10,
    raise_after=2,
    clear_after=3,
    clear_margin_c=5,
    correctable_ecc_warn=100,
)
SEVERITY = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.UNHEALTHY: 2}


def sample(
    hotspot_c: float | None = 60.0,
    memory_c: float | None = 60.0,
    uncorrectable: int | None = 0,
    correctable: int | None = 0,
    edge_c: float | None = 50.0,
) -> GpuReading:
    return GpuReading(
        edge_temperature_c=edge_c,
        hotspot_temperature_c=hotspot_c,
        memory_temperature_c=memory_c,
        ecc_uncorrectable_total=uncorrectable,
        ecc_correctable_total=correctable,
    )


def run(
    readings: Iterable[GpuReading | None],
    limits: HealthLimits = LIMITS,
    start: GpuHealth | None = None,
) -> list[GpuHealth]:
    """Each verdict after each reading, one second apart."""
    health = initial() if start is None else start
    verdicts = []
    for tick, reading in enumerate(readings):
        health = classify(health, reading, float(tick), limits)
        verdicts.append(health)
    return verdicts


def levels(verdicts: Sequence[GpuHealth]) -> list[Health]:
    return [verdict.health for verdict in verdicts]


def test_limits_for_known_models_follow_their_hotspot_limit() -> None:
    mi300x = limits_for("MI300X")
    assert (mi300x.hotspot_limit_c, mi300x.hotspot_warn_c) == (110, 100)
    assert (mi300x.memory_limit_c, mi300x.memory_warn_c) == (95, 85)
    assert limits_for("AMD Instinct MI300X").hotspot_limit_c == 110
    assert limits_for("MI250X").hotspot_limit_c == 105


def test_limits_for_an_unknown_model_fall_back_to_the_lowest_known_limit() -> None:
    assert limits_for("MI999").hotspot_limit_c == 105
    assert limits_for("").hotspot_warn_c == 95


@pytest.mark.parametrize(
    "changes",
    [
        {"hotspot_warn_c": 120},
        {"memory_warn_c": 99},
        {"raise_after": 0},
        {"clear_after": 0},
        {"clear_margin_c": -1},
        {"stale_after_s": 0},
    ],
)
def test_inconsistent_limits_are_refused(changes: dict[str, float]) -> None:
    base: dict[str, float] = {"hotspot_limit_c": 110, "hotspot_warn_c": 100, "memory_limit_c": 95}
    with pytest.raises(ValueError, match=next(iter(changes))):
        HealthLimits(**{**base, **changes})  # type: ignore[arg-type]


def test_initial_is_healthy_without_a_reason() -> None:
    assert initial().health is Health.HEALTHY
    assert initial().reason == ""
    assert initial(5.0).last_sample_s == 5.0


def test_a_normal_gpu_stays_healthy() -> None:
    verdicts = run([sample()] * 10)
    assert levels(verdicts) == [Health.HEALTHY] * 10
    assert all(verdict.reason == "" for verdict in verdicts)
    assert verdicts[-1].last_sample_s == 9.0


def test_hotspot_over_the_limit_needs_raise_after_samples() -> None:
    verdicts = run([sample(), sample(hotspot_c=112), sample(hotspot_c=112)])
    assert levels(verdicts) == [Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY]
    assert verdicts[-1].reason == "hotspot 112 C >= limit 110 C"


def test_one_hot_sample_is_forgotten() -> None:
    verdicts = run([sample(hotspot_c=115), sample(), sample(hotspot_c=115), sample()])
    assert levels(verdicts) == [Health.HEALTHY] * 4


def test_warm_hotspot_is_degraded() -> None:
    verdicts = run([sample(hotspot_c=103)] * 2)
    assert verdicts[-1].health is Health.DEGRADED
    assert verdicts[-1].reason == "hotspot 103 C >= warn 100 C"


def test_memory_temperature_has_its_own_limits() -> None:
    assert run([sample(memory_c=88)] * 2)[-1].reason == "memory 88 C >= warn 85 C"
    assert run([sample(memory_c=96)] * 2)[-1].health is Health.UNHEALTHY


def test_edge_stands_in_for_a_missing_hotspot_sensor() -> None:
    verdict = run([sample(hotspot_c=None, edge_c=111)] * 2)[-1]
    assert verdict.health is Health.UNHEALTHY
    assert verdict.reason == "edge 111 C >= limit 110 C"


def test_missing_sensors_are_not_a_fault() -> None:
    readings = [GpuReading()] * 5
    assert levels(run(readings)) == [Health.HEALTHY] * 5


def test_the_worst_finding_wins_and_equal_ones_are_joined() -> None:
    both = run([sample(hotspot_c=111, memory_c=97)] * 2)[-1]
    assert both.health is Health.UNHEALTHY
    assert both.reason == "hotspot 111 C >= limit 110 C; memory 97 C >= limit 95 C"
    mixed = run([sample(hotspot_c=111, memory_c=88)] * 2)[-1]
    assert mixed.reason == "hotspot 111 C >= limit 110 C"


@pytest.mark.parametrize("hotspots_c", [(112, 103), (103, 112)])
def test_a_mixed_worse_streak_goes_only_as_far_as_all_samples_agree(
    hotspots_c: tuple[float, float],
) -> None:
    verdicts = run([sample(hotspot_c=value_c) for value_c in hotspots_c])
    assert verdicts[-1].health is Health.DEGRADED


def test_a_mixed_better_streak_goes_only_as_far_as_all_samples_agree() -> None:
    unhealthy = run([sample(uncorrectable=1)])[-1]
    # The count was cleared (a GPU reset); the samples that follow disagree on how good.
    better = [sample(uncorrectable=0, hotspot_c=hotspot_c) for hotspot_c in (60, 103, 60)]
    verdicts = run(better, start=unhealthy)
    assert levels(verdicts) == [Health.UNHEALTHY, Health.UNHEALTHY, Health.DEGRADED]
    assert verdicts[-1].reason == "hotspot 103 C >= warn 100 C"


@pytest.mark.parametrize("raise_after", [1, 2, 5])
def test_device_lost_is_unhealthy_at_once(raise_after: int) -> None:
    limits = HealthLimits(hotspot_limit_c=110, hotspot_warn_c=100, raise_after=raise_after)
    verdicts = run([sample(), None], limits)
    assert verdicts[-1].health is Health.UNHEALTHY
    assert verdicts[-1].reason == "device not answering"
    assert verdicts[-1].last_sample_s == 0.0  # losing a device is not a successful sample


def test_a_returning_device_needs_clear_after_good_samples() -> None:
    verdicts = run([None, sample(), sample(), sample()])
    assert levels(verdicts) == [Health.UNHEALTHY] * 3 + [Health.HEALTHY]


def test_uncorrectable_ecc_at_the_first_sample_is_unhealthy_at_once() -> None:
    verdict = run([sample(uncorrectable=3)], HealthLimits(110, 100, raise_after=4))[0]
    assert verdict.health is Health.UNHEALTHY
    assert verdict.reason == "3 uncorrectable ECC errors"
    assert Cause.UNCORRECTABLE_ECC in verdict.causes


def test_uncorrectable_ecc_keeps_a_gpu_unhealthy_until_its_count_is_cleared() -> None:
    """Quiet samples do not bring it back: only a reset count (GPU reset, reboot) does."""
    totals = [0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0]
    verdicts = run([sample(uncorrectable=total) for total in totals])
    assert levels(verdicts) == [
        Health.HEALTHY,
        Health.HEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,  # the count was reset: clear_after (3) clean samples to come back
        Health.UNHEALTHY,
        Health.HEALTHY,
    ]
    assert verdicts[2].reason == "1 uncorrectable ECC error (+1 since the last sample)"
    assert verdicts[4].reason == "1 uncorrectable ECC error"
    assert verdicts[6].reason == "2 uncorrectable ECC errors (+1 since the last sample)"


def test_an_unreported_count_does_not_clear_uncorrectable_ecc() -> None:
    """A failing ECC query says nothing new: the GPU stays out until a count of 0 comes."""
    totals = [2, None, None, None, None, 0, 0, 0]
    verdicts = run([sample(uncorrectable=total) for total in totals])
    assert levels(verdicts) == [Health.UNHEALTHY] * 7 + [Health.HEALTHY]
    assert verdicts[4].reason == "2 uncorrectable ECC errors"


def test_a_reset_ecc_counter_is_a_new_baseline_not_an_error() -> None:
    verdicts = run([sample(uncorrectable=0), sample(uncorrectable=0, correctable=0)])
    after_reset = classify(
        GpuHealth(last_uncorrectable_total=5, last_correctable_total=900),
        sample(uncorrectable=0, correctable=0),
        1.0,
        LIMITS,
    )
    assert verdicts[-1].health is Health.HEALTHY
    assert after_reset.health is Health.HEALTHY
    assert after_reset.last_uncorrectable_total == 0


def test_an_unreported_ecc_total_keeps_the_last_one() -> None:
    verdicts = run([sample(uncorrectable=2), sample(uncorrectable=None), sample(uncorrectable=2)])
    assert verdicts[1].last_uncorrectable_total == 2
    assert verdicts[2].reason == verdicts[0].reason  # no new increase counted


def test_a_burst_of_correctable_ecc_is_degraded_at_once() -> None:
    """A burst is an event, not a noisy reading: one interval of it is enough."""
    totals = [5000, 5010, 5160, 5170, 5180, 5190, 5200]
    verdicts = run([sample(correctable=total) for total in totals])
    assert levels(verdicts) == [
        Health.HEALTHY,  # a large total at the start is history, not a burst
        Health.HEALTHY,
        Health.DEGRADED,
        Health.DEGRADED,
        Health.DEGRADED,
        Health.HEALTHY,  # three quiet samples
        Health.HEALTHY,
    ]
    assert verdicts[2].reason == "150 correctable ECC errors since the last sample"


def test_a_hot_gpu_must_cool_by_the_margin_before_it_counts_as_better() -> None:
    hot = run([sample(hotspot_c=112)] * 2)[-1]
    assert hot.health is Health.UNHEALTHY
    just_below = run([sample(hotspot_c=108)] * 10, start=hot)
    assert levels(just_below) == [Health.UNHEALTHY] * 10
    assert just_below[-1].reason == "hotspot 108 C not yet below 105 C (limit 110 C)"
    cooler = run([sample(hotspot_c=102)] * 3, start=just_below[-1])
    assert levels(cooler) == [Health.UNHEALTHY, Health.UNHEALTHY, Health.DEGRADED]
    assert cooler[-1].reason == "hotspot 102 C >= warn 100 C"
    nearly = run([sample(hotspot_c=97)] * 5, start=cooler[-1])
    assert levels(nearly) == [Health.DEGRADED] * 5
    cool = run([sample(hotspot_c=90)] * 3, start=nearly[-1])
    assert levels(cool) == [Health.DEGRADED, Health.DEGRADED, Health.HEALTHY]
    assert cool[-1].reason == ""


def test_the_margin_never_makes_a_temperature_look_worse() -> None:
    warm = run([sample(hotspot_c=103)] * 2)[-1]
    assert warm.health is Health.DEGRADED
    # 107 C is within the margin of the limit but has not reached it.
    assert levels(run([sample(hotspot_c=107)] * 5, start=warm)) == [Health.DEGRADED] * 5


def test_stale_samples_make_a_gpu_unhealthy_at_once() -> None:
    started = initial(0.0)
    assert stale(started, 10.0, LIMITS) == started
    gone = stale(started, 12.4, LIMITS)
    assert gone.health is Health.UNHEALTHY
    assert gone.reason == "no sample for 12 s"
    back = run([sample()] * 3, start=gone)
    assert levels(back) == [Health.UNHEALTHY, Health.UNHEALTHY, Health.HEALTHY]


def test_stale_counts_from_the_last_successful_sample() -> None:
    verdicts = run([sample(), sample(), None, None])
    assert stale(verdicts[-1], 11.0, LIMITS).reason == "device not answering"
    healthy = run([sample()] * 3)[-1]
    assert stale(healthy, 12.0, LIMITS).health is Health.HEALTHY
    assert stale(healthy, 12.5, LIMITS).reason == "no sample for 10 s"


def test_stale_without_any_sample_or_start_time_cannot_judge() -> None:
    assert stale(initial(), 1e9, LIMITS) == initial()


# --- properties over random sequences --------------------------------------------------------


@dataclass(frozen=True)
class Step:
    lost: bool
    hotspot_c: float
    memory_c: float
    new_uncorrectable: int
    new_correctable: int
    ecc_reported: bool = True


steps = st.builds(
    Step,
    lost=st.sampled_from([False, False, False, False, True]),
    hotspot_c=st.floats(40, 125, allow_nan=False),
    memory_c=st.floats(40, 105, allow_nan=False),
    new_uncorrectable=st.sampled_from([0, 0, 0, 0, 1]),
    new_correctable=st.sampled_from([0, 5, 150]),
    ecc_reported=st.sampled_from([True, True, True, False]),
)
limits_strategy = st.builds(
    HealthLimits,
    hotspot_limit_c=st.just(110.0),
    hotspot_warn_c=st.just(100.0),
    raise_after=st.integers(1, 5),
    clear_after=st.integers(1, 5),
    clear_margin_c=st.floats(0, 8),
)


def to_readings(sequence: Sequence[Step]) -> list[GpuReading | None]:
    readings: list[GpuReading | None] = []
    uncorrectable = correctable = 0
    for step in sequence:
        uncorrectable += step.new_uncorrectable
        correctable += step.new_correctable
        if step.lost:
            readings.append(None)
        else:
            readings.append(
                sample(
                    step.hotspot_c,
                    step.memory_c,
                    uncorrectable if step.ecc_reported else None,
                    correctable if step.ecc_reported else None,
                    edge_c=50,
                )
            )
    return readings


@given(sequence=st.lists(steps, max_size=40), limits=limits_strategy)
def test_changes_wait_for_their_streak_except_immediate_ones(
    sequence: list[Step], limits: HealthLimits
) -> None:
    """Every change to worse waits raise_after samples and every change to better clear_after,
    counted from the last change; only events (device loss, ECC errors) skip the wait, and a
    GPU with uncorrectable errors never gets better while its count is above zero."""
    readings = to_readings(sequence)
    verdicts = run(readings, limits)
    previous = initial()
    last_change = -1
    for index, verdict in enumerate(verdicts):
        assert (verdict.health is Health.HEALTHY) == (verdict.reason == "")
        if sequence[index].lost:
            assert verdict.health is Health.UNHEALTHY
        if verdict.health is not previous.health:
            waited = index - last_change
            if SEVERITY[verdict.health] > SEVERITY[previous.health]:
                events = {Cause.DEVICE_LOST, Cause.UNCORRECTABLE_ECC, Cause.CORRECTABLE_ECC}
                assert events & verdict.causes or waited >= limits.raise_after
            else:
                assert waited >= limits.clear_after
                assert not _errors_reported(sequence[: index + 1])  # they keep it out
            last_change = index
        previous = verdict


@given(
    threshold=st.sampled_from(["limit", "warn"]),
    offset_c=st.floats(0.1, 2.5),
    raise_after=st.integers(1, 5),
    clear_after=st.integers(1, 5),
    start_above=st.booleans(),
    length=st.integers(2, 60),
)
def test_a_temperature_hovering_around_a_threshold_never_flaps(
    *,
    threshold: str,
    offset_c: float,
    raise_after: int,
    clear_after: int,
    start_above: bool,
    length: int,
) -> None:
    """No flapping: alternating just above and just below a threshold only ever moves the state
    one way (from healthy it may pass through degraded on the way to unhealthy), never back."""
    limits = HealthLimits(110, 100, raise_after=raise_after, clear_after=clear_after)
    centre_c = 110.0 if threshold == "limit" else 100.0
    signs = [1, -1] if start_above else [-1, 1]
    readings = [sample(hotspot_c=centre_c + signs[i % 2] * offset_c) for i in range(length)]
    severities = [SEVERITY[health] for health in levels(run(readings, limits))]
    assert severities == sorted(severities)
    if threshold == "warn":
        assert set(severities) <= {0, 1}


@given(prefix=st.lists(steps, max_size=20), limits=limits_strategy)
def test_device_lost_is_unhealthy_whatever_came_before(
    prefix: list[Step], limits: HealthLimits
) -> None:
    before = run(to_readings(prefix), limits)
    last = before[-1] if before else initial()
    lost = classify(last, None, 100.0, limits)
    assert lost.health is Health.UNHEALTHY
    assert Cause.DEVICE_LOST in lost.causes


@given(
    ours=st.lists(steps, max_size=30),
    theirs=st.lists(steps, max_size=30),
    limits=limits_strategy,
)
def test_the_verdict_depends_on_the_input_sequence_only(
    ours: list[Step], theirs: list[Step], limits: HealthLimits
) -> None:
    """Running the same readings again, interleaved with another GPU's, gives the same verdicts:
    no hidden state outlives a call."""
    alone = run(to_readings(ours), limits)
    again = run(to_readings(ours), limits)
    assert alone == again
    ours_health, theirs_health = initial(), initial()
    interleaved = []
    other_readings = to_readings(theirs)
    for tick, reading in enumerate(to_readings(ours)):
        if tick < len(other_readings):
            theirs_health = classify(theirs_health, other_readings[tick], float(tick), limits)
        ours_health = classify(ours_health, reading, float(tick), limits)
        interleaved.append(ours_health)
    assert interleaved == alone


def _errors_reported(steps: Sequence[Step]) -> bool:
    """Whether a reading so far showed an uncorrectable count above zero."""
    total = 0
    for step in steps:
        total += step.new_uncorrectable
        if step.ecc_reported and not step.lost and total > 0:
            return True
    return False
