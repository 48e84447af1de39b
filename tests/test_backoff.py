"""The restart schedule and its translation to systemd's RestartSec/RestartSteps/RestartMaxDelaySec."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agor_systemd.sidecar.backoff import (
    USEC,
    NativeBackoff,
    RestartPolicy,
    native_backoff,
    restart_delay_s,
    schedule,
    to_usec,
)


def policy(base_s: float = 1.0, cap_s: float = 30.0, attempts: int = 5) -> RestartPolicy:
    return RestartPolicy(base_s=base_s, cap_s=cap_s, attempts=attempts)


def seconds_to_usec(delays: list[float]) -> list[int]:
    return [int(d * USEC) for d in delays]


# --- the schedule ---------------------------------------------------------------------------


def test_default_policy_is_agors_supervisor():
    assert RestartPolicy() == RestartPolicy(base_s=1.0, cap_s=30.0, attempts=5, stability_window_s=300.0)


def test_default_schedule_doubles_from_one_second():
    assert schedule(RestartPolicy()) == [1, 2, 4, 8, 16]


def test_cap_applies_from_the_first_delay_above_it():
    assert schedule(policy(attempts=7)) == [1, 2, 4, 8, 16, 30, 30]


def test_cap_below_base_wins():
    # config.py refuses cap < base, but the pure function must still never exceed the cap
    assert schedule(policy(base_s=5, cap_s=3, attempts=3)) == [3, 3, 3]


@pytest.mark.parametrize("attempt", [1024, 1025, 10_000, 10**9])
def test_huge_attempt_numbers_saturate_at_the_cap(attempt):
    assert restart_delay_s(attempt, 1.0, 30.0) == 30.0


def test_huge_attempt_with_tiny_base_still_reaches_the_cap():
    # 0.001·2^1023 is far above any cap: the clamp of the exponent must not stop short of it
    assert restart_delay_s(10**6, 0.001, 86400.0) == 86400.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_numbers_are_one_based(attempt):
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        restart_delay_s(attempt, 1.0, 30.0)


def test_zero_attempts_is_an_empty_schedule():
    assert schedule(policy(attempts=0)) == []


def test_one_attempt_is_just_the_base():
    assert schedule(policy(base_s=2.5, attempts=1)) == [2.5]


def test_sub_second_base():
    assert schedule(policy(base_s=0.2, attempts=5)) == [0.2, 0.4, 0.8, 1.6, 3.2]


@pytest.mark.parametrize(
    "seconds, usec",
    [(1, 1_000_000), (0.2, 200_000), (0.001, 1000), (1.5, 1_500_000), (0.1 + 0.2, 300_000), (86400, 86_400_000_000)],
)
def test_to_usec_rounds_to_whole_microseconds(seconds, usec):
    assert to_usec(seconds) == usec


# --- systemd's formula (service_restart_usec_next) -------------------------------------------


DEFAULT_NATIVE = NativeBackoff(restart_usec=1_000_000, steps=4, max_delay_usec=16_000_000)


def test_native_backoff_for_the_defaults():
    assert native_backoff(RestartPolicy()) == DEFAULT_NATIVE


def test_native_formula_reproduces_systemds_example():
    # systemd-facts §1: RestartSec=1s, RestartSteps=4, RestartMaxDelaySec=16s → 1,2,4,8,16,16 s
    assert [DEFAULT_NATIVE.delay_usec(k) for k in range(1, 7)] == seconds_to_usec([1, 2, 4, 8, 16, 16])


def test_native_formula_first_restart_and_before_is_restart_sec():
    assert DEFAULT_NATIVE.delay_usec(0) == 1_000_000
    assert DEFAULT_NATIVE.delay_usec(1) == 1_000_000


def test_native_formula_beyond_steps_is_the_maximum():
    assert DEFAULT_NATIVE.delay_usec(1000) == 16_000_000


def test_native_formula_without_steps_is_constant():
    constant = NativeBackoff(restart_usec=3_000_000)
    assert [constant.delay_usec(k) for k in range(1, 5)] == [3_000_000] * 4


def test_native_formula_with_restart_sec_not_below_max_is_constant():
    # systemd: RestartSec >= RestartMaxDelaySec → every delay is RestartSec
    native = NativeBackoff(restart_usec=5_000_000, steps=3, max_delay_usec=5_000_000)
    assert [native.delay_usec(k) for k in range(1, 6)] == [5_000_000] * 5


def test_native_formula_with_zero_restart_sec_is_zero():
    # systemd's service_restart_usec_next returns RestartSec when RestartSec == 0 (no division);
    # the model must not divide by zero either.
    native = NativeBackoff(restart_usec=0, steps=4, max_delay_usec=16_000_000)
    assert [native.delay_usec(k) for k in range(1, 4)] == [0, 0, 0]


def test_native_formula_matches_the_man_page_example():
    # man systemd.service, RestartSteps=: RestartSec=10s, max 160s, 4 steps → 10, 20, 40, 80, 160, 160
    native = NativeBackoff(restart_usec=10_000_000, steps=4, max_delay_usec=160_000_000)
    assert [native.delay_usec(k) for k in range(1, 7)] == seconds_to_usec([10, 20, 40, 80, 160, 160])


def test_native_formula_non_power_of_two_ratio_is_not_doubling():
    # systemd-facts §1: Steps=5, Max=30s gives 1, 1.974, 3.898, 7.696, 15.195, 30
    native = NativeBackoff(restart_usec=1_000_000, steps=5, max_delay_usec=30_000_000)
    delays = [native.delay_usec(k) for k in range(1, 7)]
    assert delays[0] == 1_000_000 and delays[-1] == 30_000_000
    assert [round(d / 1e6, 3) for d in delays[1:5]] == [1.974, 3.898, 7.696, 15.195]


# --- native_backoff: what systemd can and cannot express ---------------------------------------


@pytest.mark.parametrize(
    "base_s, cap_s, attempts",
    [
        (1, 10, 5),  # 1, 2, 4, 8, 10: the cap truncates a doubling
        (1, 30, 6),  # 1, 2, 4, 8, 16, 30: agor's schedule one restart further
        (1, 30, 7),  # ..., 30, 30
        (0.5, 3, 4),  # 0.5, 1, 2, 3
    ],
)
def test_schedules_systemd_cannot_express_return_none(base_s, cap_s, attempts):
    assert native_backoff(policy(base_s, cap_s, attempts)) is None


@pytest.mark.parametrize("base_s, attempts", [(1, 5), (2, 3), (7, 1)])
def test_constant_schedule_has_no_steps(base_s, attempts):
    assert native_backoff(policy(base_s=base_s, cap_s=base_s, attempts=attempts)) == NativeBackoff(
        restart_usec=to_usec(base_s), steps=0, max_delay_usec=0
    )


def test_sub_second_base_is_exact_in_microseconds():
    native = native_backoff(policy(base_s=0.2, attempts=5))
    assert native == NativeBackoff(restart_usec=200_000, steps=4, max_delay_usec=3_200_000)
    assert [native.delay_usec(k) for k in range(1, 6)] == [200_000, 400_000, 800_000, 1_600_000, 3_200_000]


def test_zero_attempts_keeps_a_restart_sec():
    assert native_backoff(policy(base_s=2, attempts=0)) == NativeBackoff(restart_usec=2_000_000)


def test_one_attempt_is_constant():
    assert native_backoff(policy(base_s=2, attempts=1)) == NativeBackoff(restart_usec=2_000_000)


def test_two_attempts_is_one_step():
    assert native_backoff(policy(base_s=1, attempts=2)) == NativeBackoff(1_000_000, 1, 2_000_000)


@pytest.mark.parametrize(
    "base_s, cap_s, attempts",
    [
        (1, 30, 5),
        (0.2, 30, 5),
        (1, 1000, 3),
        (1, 1000, 9),
        (0.001, 1, 5),
        (1.5, 86400, 2),
    ],
)
def test_native_backoff_reproduces_the_schedule_exactly(base_s, cap_s, attempts):
    p = policy(base_s, cap_s, attempts)
    native = native_backoff(p)
    assert native is not None
    assert [native.delay_usec(k) for k in range(1, attempts + 1)] == [to_usec(d) for d in schedule(p)]


# Schedules systemd *can* express but native_backoff turns down (they then fall back to the
# launcher's own waiting, which works, but is not what the docstring promises).


def test_cap_landing_on_a_doubling_is_expressible():
    # 1, 2, 4, 8, 16, 16 is systemd-facts' own example: RestartSteps=4, RestartMaxDelaySec=16s.
    assert native_backoff(policy(base_s=1, cap_s=16, attempts=6)) == DEFAULT_NATIVE


@pytest.mark.parametrize("attempts", [4, 6])
def test_doubling_the_double_check_cannot_confirm_falls_back(attempts):
    # systemd computes powl() in long double and gets 1,2,4,8 (steps 3) and 1..32 (steps 5)
    # exactly (the C oracle below shows it); the model's double arithmetic gives
    # 8 ** (2/3) == 3.9999999999999996, so it stays on the safe side and uses the fallback,
    # which reproduces the schedule exactly as well.
    assert native_backoff(policy(base_s=1, cap_s=1e6, attempts=attempts)) is None


# --- an oracle: systemd's own arithmetic, compiled ----------------------------------------------

ORACLE_C = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
/* service_restart_usec_next (v254..v260.1), reading "RestartUSec Steps MaxUSec k" lines */
int main(void) {
        unsigned long long rs, mx; unsigned steps, k;
        while (scanf("%llu %u %llu %u", &rs, &steps, &mx, &k) == 4) {
                uint64_t d;
                if (k <= 1 || steps == 0 || rs == 0 || rs >= mx) d = rs;
                else if (k > steps) d = mx;
                else d = (uint64_t) (rs * powl((long double) mx / rs, (long double) (k - 1) / steps));
                printf("%llu\n", (unsigned long long) d);
        }
        return 0;
}
"""


@pytest.fixture(scope="module")
def systemd_arithmetic(tmp_path_factory):
    """systemd's long-double formula as a tiny C program; skipped without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the systemd arithmetic oracle")
    directory: Path = tmp_path_factory.mktemp("oracle")
    (directory / "next.c").write_text(ORACLE_C)
    binary = directory / "next"
    subprocess.run([cc, "-O2", "-o", str(binary), str(directory / "next.c"), "-lm"], check=True, timeout=60)

    def delays(native: NativeBackoff, count: int) -> list[int]:
        lines = "".join(
            f"{native.restart_usec} {native.steps} {native.max_delay_usec} {k}\n" for k in range(1, count + 1)
        )
        out = subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True).stdout
        return [int(x) for x in out.split()]

    return delays


def test_oracle_agrees_on_the_defaults(systemd_arithmetic):
    assert systemd_arithmetic(DEFAULT_NATIVE, 6) == seconds_to_usec([1, 2, 4, 8, 16, 16])


def test_accepted_schedules_are_what_systemd_computes(systemd_arithmetic):
    """The dangerous direction: native mode must never hand systemd a curve it computes differently."""
    checked, wrong = 0, []
    for base_s in (0.001, 0.0015, 0.1, 0.2, 0.3, 0.7, 1, 1.5, 3, 10, 60):
        for cap_s in (base_s, 16 * base_s, 30, 86400):
            for attempts in range(1, 12):
                p = policy(base_s=base_s, cap_s=cap_s, attempts=attempts)
                native = native_backoff(p)
                if native is None:
                    continue
                checked += 1
                expected = [to_usec(d) for d in schedule(p)]
                if systemd_arithmetic(native, attempts) != expected:
                    wrong.append(p)
    assert checked > 100 and wrong == []


@pytest.mark.parametrize("steps", [3, 5])
def test_systemd_computes_doubling_exactly_where_the_model_does_not(systemd_arithmetic, steps):
    """Backs test_doubling_through_the_budget_is_expressible: systemd's long double gets these right."""
    native = NativeBackoff(1_000_000, steps, 1_000_000 << steps)
    assert systemd_arithmetic(native, steps + 1) == [1_000_000 << i for i in range(steps + 1)]
