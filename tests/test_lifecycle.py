"""The lifecycle rules (pure): job and batch status from counts, and the webhook event each
status sends."""

from __future__ import annotations

import pytest

from worker.lifecycle import (
    FINAL,
    TRANSITIONS,
    batch_status,
    job_counts,
    job_event,
    job_status,
    request_event,
)


def test_a_final_status_is_never_left_and_only_running_repeats():
    assert all(not TRANSITIONS[s] for s in FINAL)
    assert TRANSITIONS["queued"] == TRANSITIONS["running"] == {"running", *FINAL}


@pytest.mark.parametrize(("stored", "running", "state", "status", "queued"), [
    ({"total": 3}, 0, "queued", "queued", 3),
    ({"total": 3}, 1, "queued", "running", 2),
    ({"total": 3, "succeeded": 1}, 5, "queued", "running", 0),  # the running set overcounts
    ({"total": 2, "succeeded": 1, "cancelled": 1}, 0, "queued", "completed", 0),
    ({"total": 2, "cancelled": 1, "expired": 1}, 0, "queued", "cancelled", 0),
    ({"total": 1, "failed": 2}, 0, "queued", "completed", 0),  # never "running" past its total
    ({"total": 2, "succeeded": 2}, 0, "validating", "validating", 0),
    ({"total": 2}, 0, "failed", "failed", 2),  # reaped
])
def test_job_status_from_counts(stored, running, state, status, queued):
    counts = job_counts(stored, running)
    assert job_status(counts, state) == status and counts["queued"] == queued


def test_batch_status_and_its_event_agree():
    assert batch_status("cancelled", "completed", 3) == "cancelled"
    assert batch_status(None, "failed", 3) == "failed"
    assert batch_status(None, "completed", 1) == "expired"
    assert batch_status(None, "cancelled", 0) == "completed"
    for status in ("cancelled", "expired", "failed", "completed"):
        assert job_event(status) == f"batch.{status}"


def test_request_events():
    assert request_event("succeeded") == "generation.completed"
    assert {request_event(s) for s in FINAL if s != "succeeded"} == {"generation.failed"}
