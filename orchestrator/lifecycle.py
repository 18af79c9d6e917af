"""The run state machine shared by every launcher.

    queued -> submitted -> running -> (preempted -> requeued -> running)* -> succeeded | failed | cancelled

Terminal states never change. Only a job that reports a completed result can make a run succeed.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    PREEMPTED = "preempted"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        return not self.terminal


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.SUBMITTED, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.SUBMITTED: frozenset({RunStatus.RUNNING, RunStatus.PREEMPTED, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset({RunStatus.PREEMPTED, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.PREEMPTED: frozenset({RunStatus.REQUEUED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.REQUEUED: frozenset({RunStatus.RUNNING, RunStatus.PREEMPTED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


class TransitionError(ValueError):
    """A state change the lifecycle does not allow (HTTP 409)."""

    def __init__(self, current: RunStatus, target: RunStatus) -> None:
        allowed = ", ".join(sorted(ALLOWED[current])) or "none: it is final"
        super().__init__(f"cannot go from {current} to {target} (allowed from {current}: {allowed})")
        self.current, self.target = current, target


def check_transition(current: RunStatus, target: RunStatus) -> None:
    if target not in ALLOWED[current]:
        raise TransitionError(current, target)


def path_to(current: RunStatus, target: RunStatus) -> list[RunStatus]:
    """The shortest chain of allowed transitions from current to target (empty if already there).

    A reconciler that polls may miss intermediate states (a short job goes from submitted to done
    between two polls); it replays them in order so the event log stays a valid walk of the machine.
    """
    if current == target:
        return []
    frontier: list[list[RunStatus]] = [[current]]
    seen = {current}
    while frontier:
        chain = frontier.pop(0)
        for nxt in sorted(ALLOWED[chain[-1]]):
            if nxt in seen:
                continue
            if nxt == target:
                return [*chain[1:], nxt]
            seen.add(nxt)
            frontier.append([*chain, nxt])
    raise TransitionError(current, target)
