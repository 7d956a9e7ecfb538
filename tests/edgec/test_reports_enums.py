"""Event kinds, device statuses and refusal steps are enums on the wire contract, read
tolerantly: a value this reader knows becomes the enum member, a newer agent's value is kept
as the string it was (and ignored by logic that compares with the enum), never refused; the
bounds every report had still hold."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgec.reports import DeviceState, DeviceStatus, Event, EventKind, InstallStep
from ota_server.ingest import ReportLimits, ReportRefused, parse_report

LIMITS = ReportLimits()


def _event(**fields) -> Event:
    report = parse_report("events", json.dumps(fields).encode(), LIMITS)
    assert isinstance(report, Event)
    return report


def _state(**fields) -> DeviceState:
    report = parse_report("state", json.dumps(fields).encode(), LIMITS)
    assert isinstance(report, DeviceState)
    return report


@pytest.mark.parametrize("kind", list(EventKind))
def test_a_known_event_kind_reads_as_its_enum_member(kind):
    event = _event(event=kind.value, release="digits:1.0.0")
    assert event.event is kind


def test_a_newer_agents_event_kind_and_step_are_kept_as_strings_not_refused():
    event = _event(event="quarantined", release="digits:2.0.0", step="attest", detail="tpm", nonce="ab12")
    assert (event.event, event.step) == ("quarantined", "attest")
    assert type(event.event) is str
    assert type(event.step) is str
    assert event.event not in set(EventKind)  # logic comparing with the enum passes it by
    assert event.model_extra == {"nonce": "ab12"}
    assert event.model_dump(mode="json", exclude_none=True) == {
        "event": "quarantined",
        "release": "digits:2.0.0",
        "detail": "tpm",
        "step": "attest",
        "nonce": "ab12",
    }


def test_a_newer_agents_device_status_is_kept_as_a_string_not_refused():
    state = _state(status="hibernating", installed="digits:1.0.0")
    assert state.status == "hibernating"
    assert type(state.status) is str
    assert _state(status="serving").status is DeviceStatus.SERVING
    assert _state(status="").status == ""  # read before the enums were: still read


def test_a_refusal_step_reads_as_its_enum_member():
    event = _event(event="refused", release="digits:3.0.0", step="self-test", detail="outputs")
    assert (event.event, event.step) == (EventKind.REFUSED, InstallStep.SELF_TEST)
    assert event.step is InstallStep.SELF_TEST
    assert f"refused at {event.step}" == "refused at self-test"  # how the server words it


def test_an_event_kind_that_is_not_a_name_is_still_refused():
    with pytest.raises(ReportRefused, match="event: String should match pattern"):
        _event(event="rm -rf /")
    with pytest.raises(ReportRefused, match="event: String should have at least 1 character"):
        _event(event="")


def test_an_oversized_unknown_kind_or_status_is_still_refused():
    with pytest.raises(ReportRefused, match="event: String should have at most 64 characters"):
        _event(event="k" * 65)
    with pytest.raises(ReportRefused, match="status: String should have at most 64 characters"):
        _state(status="s" * 65)
    with pytest.raises(ValidationError):
        Event(event=EventKind.REFUSED, step="s" * 65)


def test_the_enums_dump_to_the_strings_on_the_wire():
    event = Event(event=EventKind.LOAD_FAILED, release="digits:1.0.0", step=InstallStep.LOAD)
    assert json.loads(event.model_dump_json(exclude_none=True)) == {
        "event": "load-failed",
        "release": "digits:1.0.0",
        "step": "load",
    }
    state = DeviceState(status=DeviceStatus.INSTALLING, installed=None, detail="digits:2.0.0")
    assert json.loads(state.model_dump_json(exclude_none=True)) == {
        "status": "installing",
        "detail": "digits:2.0.0",
    }
