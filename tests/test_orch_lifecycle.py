"""The run state machine."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.lifecycle import ALLOWED, TERMINAL, RunStatus, TransitionError, check_transition, path_to


def test_terminal_states_never_change() -> None:
    for status in TERMINAL:
        assert ALLOWED[status] == frozenset()
        for target in RunStatus:
            with pytest.raises(TransitionError, match="it is final"):
                check_transition(status, target)


def test_the_documented_happy_and_preemption_paths_are_allowed() -> None:
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
        check_transition(RunStatus(a), RunStatus(b))


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
def test_shortcuts_are_refused(current: str, target: str) -> None:
    with pytest.raises(TransitionError):
        check_transition(RunStatus(current), RunStatus(target))


def test_success_is_only_reachable_through_running() -> None:
    assert path_to(RunStatus.SUBMITTED, RunStatus.SUCCEEDED) == [RunStatus.RUNNING, RunStatus.SUCCEEDED]
    assert path_to(RunStatus.RUNNING, RunStatus.REQUEUED) == [RunStatus.PREEMPTED, RunStatus.REQUEUED]
    assert path_to(RunStatus.QUEUED, RunStatus.QUEUED) == []
    with pytest.raises(TransitionError):
        path_to(RunStatus.CANCELLED, RunStatus.RUNNING)
