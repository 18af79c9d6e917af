"""The job state machines: runs and evaluations share every rule but one (an evaluation retries a failed
attempt straight from running to requeued)."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.lifecycle import EVALUATION, RUN, TERMINAL, Lifecycle, Status, TransitionError

MACHINES = pytest.mark.parametrize("machine", [RUN, EVALUATION], ids=["run", "evaluation"])


@MACHINES
def test_terminal_states_never_change(machine: Lifecycle) -> None:
    for status in TERMINAL:
        assert machine.allowed[status] == frozenset()
        for target in Status:
            with pytest.raises(TransitionError, match="it is final"):
                machine.check(status, target)


@MACHINES
def test_the_documented_happy_and_preemption_paths_are_allowed(machine: Lifecycle) -> None:
    chain = [
        "queued",
        "submitted",
        "running",
        "preempted",
        "requeued",
        "running",
        "preempted",
        "requeued",
        "running",
        "succeeded",
    ]
    for a, b in itertools.pairwise(chain):
        machine.check(Status(a), Status(b))


@MACHINES
@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("queued", "running"),
        ("queued", "succeeded"),
        ("submitted", "succeeded"),
        ("preempted", "running"),
        ("requeued", "succeeded"),
        ("running", "queued"),
    ],
)
def test_shortcuts_are_refused(machine: Lifecycle, current: str, target: str) -> None:
    with pytest.raises(TransitionError):
        machine.check(Status(current), Status(target))


@MACHINES
def test_success_is_only_reachable_through_running(machine: Lifecycle) -> None:
    assert machine.path_to(Status.SUBMITTED, Status.SUCCEEDED) == [Status.RUNNING, Status.SUCCEEDED]
    assert machine.path_to(Status.QUEUED, Status.QUEUED) == []
    with pytest.raises(TransitionError):
        machine.path_to(Status.CANCELLED, Status.RUNNING)


def test_a_run_reaches_requeued_only_through_preempted() -> None:
    assert RUN.path_to(Status.RUNNING, Status.REQUEUED) == [Status.PREEMPTED, Status.REQUEUED]
    with pytest.raises(TransitionError):
        RUN.check(Status.RUNNING, Status.REQUEUED)


def test_an_evaluation_retries_a_failed_attempt_without_passing_through_preempted() -> None:
    assert EVALUATION.path_to(Status.RUNNING, Status.REQUEUED) == [Status.REQUEUED]
    EVALUATION.check(Status.SUBMITTED, Status.REQUEUED)
    assert set(EVALUATION.allowed) == set(RUN.allowed) == set(Status)
    extra = {s: EVALUATION.allowed[s] - RUN.allowed[s] for s in Status if EVALUATION.allowed[s] - RUN.allowed[s]}
    assert extra == {Status.SUBMITTED: {Status.REQUEUED}, Status.RUNNING: {Status.REQUEUED}}
