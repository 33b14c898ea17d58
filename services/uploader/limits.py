"""The spool-full policy: which waiting frames to give up when the backlog passes its limits.

Rules, in this order:
- a frame the sampler selected (promised to the labeling pipeline) is never dropped;
- a frame younger than `min_age_s` is never dropped (the edge-inferencer may not have read it,
  and the bin must still sort the item);
- nor is a frame being uploaded at that moment (`busy`);
- of the rest, frames the edge-inferencer has read go first: those captured before
  `unread_since`, the same fact the sweep keeps frames by (readers.unread_since). `drop_oldest`
  gives up the oldest of them first, `drop_newest` the newest first; the reason is the limit that
  was passed: `max_frames` or `max_bytes`;
- only when those are not enough do frames the inferencer has not read go, in the same order,
  with the reason `unread_by_inferencer`. They are older than `min_age_s`, so stale for the
  actuator: their inference would only feed the sampler. Keeping them instead would let an
  inferencer that stopped reading (its consumer left behind, a model that never comes) hold
  the spool over its limits until the disk the live bin captures to is full.
When only protected frames are left the backlog stays over its limit; the caller says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.uploader.queue import QueuedFrame
from services.uploader.settings import SpoolFullPolicy


@dataclass(frozen=True)
class SpoolLimits:
    max_frames: int
    max_bytes: int
    policy: SpoolFullPolicy = "drop_oldest"
    min_age_s: float = 0.0


UNREAD_BY_INFERENCER = "unread_by_inferencer"
"""The drop reason of a frame the edge-inferencer had not read (or the uploader could not tell)."""


@dataclass(frozen=True)
class Drop:
    frame: QueuedFrame
    reason: str


@dataclass(frozen=True)
class DropPlan:
    drops: list[Drop]
    still_over: bool
    """True when protected frames alone keep the backlog over a limit."""


def plan_drops(
    queued: Sequence[QueuedFrame],
    wanted: Collection[str],
    limits: SpoolLimits,
    now: float,
    busy: Collection[str] = (),
    unread_since: float | None = None,
) -> DropPlan:
    """`queued` in queue order (oldest first); `wanted` holds sha256s, `busy` event ids. Bytes
    count each spooled file once, however many captures of the same bytes wait on it.

    `unread_since` (epoch seconds, as readers.unread_since gives it): frames captured at or
    after it are ones the edge-inferencer has not read yet, dropped only after every other
    candidate; None when it has read them all or does not read this bin."""
    frames = len(queued)
    captures_of = Counter(f.sha256 for f in queued)
    total_bytes = sum({f.sha256: f.size for f in queued}.values())

    def over() -> str | None:
        if frames > limits.max_frames:
            return "max_frames"
        if total_bytes > limits.max_bytes:
            return "max_bytes"
        return None

    candidates = [
        f
        for f in queued
        if f.sha256 not in wanted
        and f.event_id not in busy
        and now - f.queued_at >= limits.min_age_s
    ]
    if limits.policy == "drop_newest":
        candidates.reverse()

    def unread(frame: QueuedFrame) -> bool:
        return unread_since is not None and frame.event.captured_at.timestamp() >= unread_since

    read_first = [f for f in candidates if not unread(f)] + [f for f in candidates if unread(f)]
    drops: list[Drop] = []
    for frame in read_first:
        reason = over()
        if reason is None:
            break
        drops.append(Drop(frame, UNREAD_BY_INFERENCER if unread(frame) else reason))
        frames -= 1
        captures_of[frame.sha256] -= 1
        if captures_of[frame.sha256] == 0:
            total_bytes -= frame.size
    return DropPlan(drops, still_over=over() is not None)
