"""The restart schedule, and how (or whether) systemd can express it natively.

Pure functions: the launcher, the unit generator and the health reader all derive
their numbers from here, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from agor_systemd.config import RestartPolicy

USEC = 1_000_000


def restart_delay_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before restart number `attempt` (1-based): base·2^(attempt−1), capped.

    The exponent is clamped so huge attempt numbers saturate at the cap instead of
    overflowing a float.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return min(base_s * 2.0 ** min(attempt - 1, 1023), cap_s)


def schedule(policy: RestartPolicy) -> list[float]:
    """The delays before restarts 1..attempts, e.g. [1, 2, 4, 8, 16] for the defaults."""
    return [restart_delay_s(k, policy.base_s, policy.cap_s) for k in range(1, policy.attempts + 1)]


def to_usec(seconds: float) -> int:
    return round(seconds * USEC)


@dataclass(frozen=True)
class NativeBackoff:
    """systemd ≥ 254 settings that reproduce a schedule exactly.

    systemd computes delay(k) = RestartSec·(RestartMaxDelaySec/RestartSec)^((k−1)/RestartSteps)
    for k ≤ RestartSteps and RestartMaxDelaySec after that (src/core/service.c,
    service_restart_usec_next, unchanged v254…v260).
    """

    restart_usec: int
    steps: int = 0
    max_delay_usec: int = 0

    def delay_usec(self, attempt: int) -> int:
        """What systemd will wait before restart `attempt` (same formula, in µs)."""
        if attempt <= 1 or self.steps == 0 or self.restart_usec == 0 or self.restart_usec >= self.max_delay_usec:
            return self.restart_usec
        if attempt > self.steps:
            return self.max_delay_usec
        ratio = self.max_delay_usec / self.restart_usec
        return int(self.restart_usec * ratio ** ((attempt - 1) / self.steps))


def native_backoff(policy: RestartPolicy) -> NativeBackoff | None:
    """RestartSec/RestartSteps/RestartMaxDelaySec for `policy`, or None if the formula can't match.

    systemd's curve is geometric and reaches its maximum exactly at step RestartSteps+1, then
    stays there. A schedule that doubles and then plateaus at its last value (1, 2, 4, 8, 16 or
    1, 2, 4, 8, 16, 16) fits; a cap that truncates a doubling (1, 2, 4, 8, 10) does not. systemd
    computes in long double and truncates to µs; this check uses double, which for some step
    counts lands 1 µs low where systemd is exact — those schedules then use the fallback, which
    is exact too. The reverse (accepting what systemd computes differently) does not happen.
    """
    delays = [to_usec(d) for d in schedule(policy)]
    if not delays:
        return NativeBackoff(restart_usec=to_usec(min(policy.base_s, policy.cap_s)))
    if all(d == delays[0] for d in delays):
        return NativeBackoff(restart_usec=delays[0])
    native = NativeBackoff(restart_usec=delays[0], steps=delays.index(delays[-1]), max_delay_usec=delays[-1])
    if all(native.delay_usec(k) == d for k, d in enumerate(delays, start=1)):
        return native
    return None
