"""Decides whether a GPU is healthy, degraded or unhealthy from its samples, with hysteresis.

Pure: the previous verdict, this tick's reading and the time come in, the next verdict goes
out. Hysteresis keeps one noisy sample from taking a GPU out of service or putting it back:
getting worse needs `raise_after` bad samples in a row, getting better needs `clear_after`
good ones, and a temperature must fall `clear_margin_c` below the threshold it crossed
before it counts as good again. Events act at once, since they are not noise: a lost device,
an uncorrectable ECC error, a burst of correctable ones. A GPU with uncorrectable errors
stays unhealthy while the driver's count is above zero (until a GPU reset or a reboot
clears it): its memory can no longer be trusted with anyone's job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from kaiwo_gpu.agent.backend import GpuReading
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.models import Health

# Conservative defaults, not vendor figures for every part: the hotspot (junction) limit comes
# from the model's published figure in GPU_MODELS and we warn 10 C below it; AMD throttles HBM
# at about 95-100 C, so 95 C is its limit here and 85 C its warning.
HOTSPOT_WARN_BELOW_LIMIT_C = 10.0
HBM_LIMIT_C = 95.0
HBM_WARN_C = 85.0
DEFAULT_STALE_AFTER_S = 10.0
# For a model we do not know, the lowest hotspot limit of the models we do know.
FALLBACK_HOTSPOT_LIMIT_C = float(min(model.hotspot_limit_c for model in GPU_MODELS.values()))

_SEVERITY = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.UNHEALTHY: 2}


class Cause(StrEnum):
    """Why a verdict is what it is; decides which hysteresis rule applies to leaving it."""

    DEVICE_LOST = "device-lost"
    UNCORRECTABLE_ECC = "uncorrectable-ecc"
    TEMPERATURE = "temperature"
    CORRECTABLE_ECC = "correctable-ecc"
    STALE = "stale"


_IMMEDIATE = frozenset({Cause.DEVICE_LOST, Cause.UNCORRECTABLE_ECC, Cause.CORRECTABLE_ECC})


@dataclass(frozen=True, slots=True)
class HealthLimits:
    hotspot_limit_c: float
    hotspot_warn_c: float
    memory_limit_c: float = HBM_LIMIT_C
    memory_warn_c: float = HBM_WARN_C
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    raise_after: int = 2
    clear_after: int = 3
    clear_margin_c: float = 5.0
    correctable_ecc_warn: int = 100

    def __post_init__(self) -> None:
        if self.hotspot_warn_c > self.hotspot_limit_c:
            raise ValueError(
                f"hotspot_warn_c {self.hotspot_warn_c} is above hotspot_limit_c "
                f"{self.hotspot_limit_c}"
            )
        if self.memory_warn_c > self.memory_limit_c:
            raise ValueError(
                f"memory_warn_c {self.memory_warn_c} is above memory_limit_c {self.memory_limit_c}"
            )
        if self.raise_after < 1 or self.clear_after < 1:
            raise ValueError(
                f"raise_after ({self.raise_after}) and clear_after ({self.clear_after}) "
                "must be >= 1"
            )
        if self.clear_margin_c < 0 or self.stale_after_s <= 0 or self.correctable_ecc_warn < 1:
            raise ValueError(
                "clear_margin_c must be >= 0, stale_after_s > 0 and correctable_ecc_warn >= 1"
            )


def limits_for(model: str) -> HealthLimits:
    """Limits for a market name ("MI300X", "AMD Instinct MI300X"); unknown models get the lowest
    known hotspot limit."""
    profile = GPU_MODELS.get(model)
    if profile is None:
        upper = model.upper()
        contained = [name for name in GPU_MODELS if name.upper() in upper]
        profile = GPU_MODELS[max(contained, key=len)] if contained else None
    limit_c = FALLBACK_HOTSPOT_LIMIT_C if profile is None else float(profile.hotspot_limit_c)
    return HealthLimits(
        hotspot_limit_c=limit_c, hotspot_warn_c=limit_c - HOTSPOT_WARN_BELOW_LIMIT_C
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    health: Health
    reason: str
    causes: frozenset[Cause]


_HEALTHY = Verdict(Health.HEALTHY, "", frozenset())


@dataclass(frozen=True, slots=True)
class GpuHealth:
    """The verdict plus what hysteresis remembers between samples."""

    health: Health = Health.HEALTHY
    reason: str = ""  # "" when healthy
    causes: frozenset[Cause] = frozenset()
    pending: Verdict | None = None  # where a streak of better or worse samples would lead
    pending_count: int = 0
    last_uncorrectable_total: int | None = None
    last_correctable_total: int | None = None
    last_sample_s: float | None = None  # of the last successful reading


def initial(started_s: float | None = None) -> GpuHealth:
    """Healthy; pass the start time so a backend that hangs on its first read goes stale."""
    return GpuHealth(last_sample_s=started_s)


def classify(
    previous: GpuHealth, reading: GpuReading | None, now_s: float, limits: HealthLimits
) -> GpuHealth:
    """The next verdict; `reading` None means the device was lost this tick."""
    if reading is None:
        lost = Verdict(Health.UNHEALTHY, "device not answering", frozenset({Cause.DEVICE_LOST}))
        return _advance(previous, lost, limits)
    findings: list[Verdict] = []
    uncorrectable = reading.ecc_uncorrectable_total
    base = previous.last_uncorrectable_total
    # An unreported count is the last one seen: a failing ECC query must not clear it.
    known = uncorrectable if uncorrectable is not None else base
    if known is not None:
        # A total below the last one means the driver reset its counters: a new baseline.
        increase = known if base is None else max(0, known - base)
        if known > 0:
            findings.append(
                Verdict(
                    Health.UNHEALTHY,
                    _uncorrectable_reason(known, increase, first=base is None),
                    frozenset({Cause.UNCORRECTABLE_ECC}),
                )
            )
    correctable = reading.ecc_correctable_total
    if correctable is not None and previous.last_correctable_total is not None:
        increase = correctable - previous.last_correctable_total
        if increase >= limits.correctable_ecc_warn:
            findings.append(
                Verdict(
                    Health.DEGRADED,
                    f"{increase} correctable ECC errors since the last sample",
                    frozenset({Cause.CORRECTABLE_ECC}),
                )
            )
    findings.extend(_temperature_findings(previous, reading, limits))
    advanced = _advance(previous, _worst(findings), limits)
    return replace(
        advanced,
        last_uncorrectable_total=(
            previous.last_uncorrectable_total if uncorrectable is None else uncorrectable
        ),
        last_correctable_total=(
            previous.last_correctable_total if correctable is None else correctable
        ),
        last_sample_s=now_s,
    )


def stale(previous: GpuHealth, now_s: float, limits: HealthLimits) -> GpuHealth:
    """Unhealthy at once when no reading succeeded for over `stale_after_s` (a hung backend)."""
    if previous.last_sample_s is None:
        return previous
    age_s = now_s - previous.last_sample_s
    if age_s <= limits.stale_after_s:
        return previous
    if previous.health is Health.UNHEALTHY and Cause.DEVICE_LOST in previous.causes:
        return previous  # "device not answering" already says why there is no sample
    return replace(
        previous,
        health=Health.UNHEALTHY,
        reason=f"no sample for {age_s:.0f} s",
        causes=frozenset({Cause.STALE}),
        pending=None,
        pending_count=0,
    )


def _advance(previous: GpuHealth, candidate: Verdict, limits: HealthLimits) -> GpuHealth:
    """Move toward `candidate` only after enough consecutive samples point the same way."""
    current = _SEVERITY[previous.health]
    wanted = _SEVERITY[candidate.health]
    if wanted == current or (wanted > current and candidate.causes & _IMMEDIATE):
        return _settle(previous, candidate)
    worse = wanted > current
    pending = previous.pending
    if pending is not None and (_SEVERITY[pending.health] > current) == worse:
        count = previous.pending_count + 1
        # Go only as far as the whole streak agrees: the mildest of worse samples, the
        # gravest of better ones. On a tie the newer verdict carries fresher numbers.
        pending_severity = _SEVERITY[pending.health]
        keep_old = pending_severity < wanted if worse else pending_severity > wanted
        target = pending if keep_old else candidate
    else:
        count = 1
        target = candidate
    if count >= (limits.raise_after if worse else limits.clear_after):
        return _settle(previous, target)
    return replace(previous, pending=target, pending_count=count)


def _settle(previous: GpuHealth, verdict: Verdict) -> GpuHealth:
    return replace(
        previous,
        health=verdict.health,
        reason=verdict.reason,
        causes=verdict.causes,
        pending=None,
        pending_count=0,
    )


def _worst(findings: list[Verdict]) -> Verdict:
    if not findings:
        return _HEALTHY
    severity = max(_SEVERITY[finding.health] for finding in findings)
    gravest = [finding for finding in findings if _SEVERITY[finding.health] == severity]
    return Verdict(
        gravest[0].health,
        "; ".join(finding.reason for finding in gravest),
        frozenset[Cause]().union(*(finding.causes for finding in gravest)),
    )


def _temperature_findings(
    previous: GpuHealth, reading: GpuReading, limits: HealthLimits
) -> list[Verdict]:
    # Without a hotspot sensor, judge the edge against the hotspot limits: edge runs cooler,
    # so an edge over them is certainly too hot.
    if reading.hotspot_temperature_c is not None:
        hotspot: tuple[str, float] | None = ("hotspot", reading.hotspot_temperature_c)
    elif reading.edge_temperature_c is not None:
        hotspot = ("edge", reading.edge_temperature_c)
    else:
        hotspot = None
    sensors: list[tuple[str, float, float, float]] = []
    if hotspot is not None:
        sensors.append((*hotspot, limits.hotspot_limit_c, limits.hotspot_warn_c))
    if reading.memory_temperature_c is not None:
        sensors.append(
            ("memory", reading.memory_temperature_c, limits.memory_limit_c, limits.memory_warn_c)
        )
    # While the current state is due to temperature, it holds until a sensor is clear_margin_c
    # below the threshold, but never makes a temperature look worse than the current state.
    held_cap = _SEVERITY[previous.health] if Cause.TEMPERATURE in previous.causes else 0
    findings: list[Verdict] = []
    for name, value_c, limit_c, warn_c in sensors:
        plain = _temperature_severity(value_c, limit_c, warn_c, margin_c=0.0)
        held = min(held_cap, _temperature_severity(value_c, limit_c, warn_c, limits.clear_margin_c))
        if max(plain, held) == 0:
            continue
        threshold_c, word = (limit_c, "limit") if max(plain, held) == 2 else (warn_c, "warn")
        if plain >= held:
            reason = f"{name} {value_c:g} C >= {word} {threshold_c:g} C"
        else:
            reason = (
                f"{name} {value_c:g} C not yet below {threshold_c - limits.clear_margin_c:g} C "
                f"({word} {threshold_c:g} C)"
            )
        health = Health.UNHEALTHY if max(plain, held) == 2 else Health.DEGRADED
        findings.append(Verdict(health, reason, frozenset({Cause.TEMPERATURE})))
    return findings


def _temperature_severity(value_c: float, limit_c: float, warn_c: float, margin_c: float) -> int:
    if value_c >= limit_c - margin_c:
        return 2
    if value_c >= warn_c - margin_c:
        return 1
    return 0


def _uncorrectable_reason(total: int, increase: int, *, first: bool) -> str:
    noun = "error" if total == 1 else "errors"
    if first or not increase:
        return f"{total} uncorrectable ECC {noun}"
    return f"{total} uncorrectable ECC {noun} (+{increase} since the last sample)"
