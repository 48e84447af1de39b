"""An agent's state and agor's attention score, from its activity times (pure; times in unix seconds).

* **stale**: no heartbeat for more than `stale_after_s` (agor's dead-letter rule: 300 s, or none
  ever). Messages to a stale agent become dead letters. The operator (tier 0) is never stale.
* **stalled**: no activity — heartbeat, a message sent, a message read — for `stall_after_s`
  (agor's stallThresholdMin, default 15 min); counted from its registration when it never did
  anything. Attention 100, "Stalled — N min since last activity" (agor's scorer, first match).
* **healthy**: neither.

agor's `status` column (active/sleeping/stopped) is informational and decides nothing here.
Import-light: `btmsg send` decides staleness with it.
"""

from __future__ import annotations

HEALTHY, STALE, STALLED = "healthy", "stale", "stalled"
STATES = (HEALTHY, STALE, STALLED)
OPERATOR_TIER = 0
STALLED_SCORE = 100  # agor's attention-scorer: the highest score, for "activity stalled"
ATTENTION_ITEMS = 5  # agor's attention queue shows the top five


class Thresholds:
    """The thresholds every path applies (stored in btmsg.db by the sweep, from units.toml [btmsg])."""

    __slots__ = ("max_deliver", "max_message_bytes", "stale_after_s", "stall_after_s")

    def __init__(
        self,
        stale_after_s: float = 300.0,
        stall_after_s: float = 900.0,
        max_deliver: int = 5,
        max_message_bytes: int = 256 * 1024,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.stall_after_s = stall_after_s
        self.max_deliver = max_deliver
        self.max_message_bytes = max_message_bytes

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thresholds) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Thresholds({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


def is_stale(now: float, tier: int, last_heartbeat: float | None, thresholds: Thresholds) -> bool:
    """agor's rule: COALESCE(heartbeat, 0) < now - 300, for every recipient but the operator."""
    if tier == OPERATOR_TIER:
        return False
    return last_heartbeat is None or now - last_heartbeat > thresholds.stale_after_s


def agent_state(
    now: float, tier: int, last_heartbeat: float | None, active_since: float | None, thresholds: Thresholds
) -> str:
    """`active_since`: the newest of heartbeat, message sent, message read (or registration)."""
    if tier == OPERATOR_TIER:
        return HEALTHY
    if active_since is not None and now - active_since >= thresholds.stall_after_s:
        return STALLED
    if is_stale(now, tier, last_heartbeat, thresholds):
        return STALE
    return HEALTHY


def attention(state: str, now: float, active_since: float | None) -> tuple[int, str | None]:
    """(score, reason) as agor's attention scorer gives them for what btmsg.db knows."""
    if state == STALLED and active_since is not None:
        return STALLED_SCORE, f"Stalled — {int((now - active_since) // 60)} min since last activity"
    return 0, None
