"""The state machine of every job the orchestrator drives (pretraining runs and evaluations).

    queued -> submitted -> running -> (preempted -> requeued -> running)* -> succeeded | failed | cancelled
                                                                         | stopped

Terminal states never change. Only a job whose result file says it completed can succeed; `stopped` is a job
its scheduler ended early on purpose (a search's ASHA): its checkpoints and metrics stand, it is not resumed.
Evaluations add one edge: a failed attempt with attempts left goes straight to `requeued` (a retry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    PREEMPTED = "preempted"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # ended early on purpose by its scheduler (a search's early stopping)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        return not self.terminal


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.STOPPED})
#: States in which a job waits for, or runs on, a scheduler.
WAITING = frozenset({Status.SUBMITTED, Status.REQUEUED, Status.RUNNING, Status.PREEMPTED})


class TransitionError(ValueError):
    """A state change the lifecycle does not allow (HTTP 409)."""

    def __init__(self, current: Status, target: Status, allowed: frozenset[Status]) -> None:
        names = ", ".join(sorted(allowed)) or "none: it is final"
        super().__init__(f"cannot go from {current} to {target} (allowed from {current}: {names})")
        self.current, self.target = current, target


@dataclass(frozen=True)
class Lifecycle:
    """The allowed transitions of one kind of job."""

    name: str
    allowed: Mapping[Status, frozenset[Status]]

    def check(self, current: Status, target: Status) -> None:
        if target not in self.allowed[current]:
            raise TransitionError(current, target, self.allowed[current])

    def path_to(self, current: Status, target: Status) -> list[Status]:
        """The shortest chain of allowed transitions from current to target (empty if already there).

        A reconciler that polls may miss intermediate states (a short job goes from submitted to done
        between two polls); it replays them in order so the event log stays a valid walk of the machine.
        """
        if current == target:
            return []
        frontier: list[list[Status]] = [[current]]
        seen = {current}
        while frontier:
            chain = frontier.pop(0)
            for nxt in sorted(self.allowed[chain[-1]]):
                if nxt in seen:
                    continue
                if nxt == target:
                    return [*chain[1:], nxt]
                seen.add(nxt)
                frontier.append([*chain, nxt])
        raise TransitionError(current, target, self.allowed[current])


_FINAL: frozenset[Status] = frozenset()
RUN = Lifecycle(
    "run",
    {
        Status.QUEUED: frozenset({Status.SUBMITTED, Status.CANCELLED, Status.FAILED}),
        Status.SUBMITTED: frozenset({Status.RUNNING, Status.PREEMPTED, Status.CANCELLED, Status.FAILED}),
        Status.RUNNING: frozenset(
            {Status.PREEMPTED, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.STOPPED}
        ),
        Status.PREEMPTED: frozenset({Status.REQUEUED, Status.FAILED, Status.CANCELLED}),
        Status.REQUEUED: frozenset({Status.RUNNING, Status.PREEMPTED, Status.FAILED, Status.CANCELLED}),
        Status.SUCCEEDED: _FINAL,
        Status.FAILED: _FINAL,
        Status.CANCELLED: _FINAL,
        Status.STOPPED: _FINAL,
    },
)
EVALUATION = Lifecycle(
    "evaluation",
    {
        **RUN.allowed,
        Status.SUBMITTED: RUN.allowed[Status.SUBMITTED] | {Status.REQUEUED},
        Status.RUNNING: RUN.allowed[Status.RUNNING] | {Status.REQUEUED},
    },
)
