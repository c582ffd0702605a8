"""Every name the dialplan (``dialplan/consent-gate.conf``) and the code share, in one place.

Both adapters (ARI service, AGI script) hand the dialog's result back in one channel variable,
:data:`RESULT_VARIABLE`, that ``[consent-gate-apply]`` unpacks with ``CUT()`` in
:data:`RESULT_FIELDS` order.  Values read back from a channel are caller-reachable data (an
earlier hop, a SIP header mapped into a variable, a forged AGI reply): the ``valid_*``
functions here are the only way the code turns them into ids, statuses or times.
"""

from __future__ import annotations

import re
from datetime import datetime

# -- the result, handed back in one variable ----------------------------------------------------
RESULT_VARIABLE = "CONSENT_RESULT"
RESULT_SEPARATOR = ":"
# What [consent-gate-apply] unpacks it into (and what the admin's dialplan may read afterwards).
ID_VARIABLE = "CONSENT_ID"  # the decision's id, the caller's reference for a data-subject request
RECORDING_ID_VARIABLE = "CONSENT_RECORDING_ID"  # names the files; empty when nothing records
RECORD_LEGS_VARIABLE = "CONSENT_RECORD_LEGS"  # "1": keep the caller and agent legs apart too
CONFIRMATION_VARIABLE = "CONSENT_CONFIRMATION"  # the sound [consent-gate-apply] plays
CALLER_RECORDS_VARIABLE = "CONSENT_CALLER_RECORDS"  # "1": the caller said they record the call
PURPOSE_VARIABLE = "CONSENT_PURPOSE"  # the primary purpose (mid-call events are logged under it)
PURPOSES_VARIABLE = "CONSENT_PURPOSES"  # every purpose the recording is kept for, comma-separated
STATUS_VARIABLE = "CONSENT_STATUS"  # granted, declined, no-input, notified or unavailable
# Field N of the dialplan's CUT() is RESULT_FIELDS[N-1].
RESULT_FIELDS = (
    ID_VARIABLE,
    RECORDING_ID_VARIABLE,
    RECORD_LEGS_VARIABLE,
    CONFIRMATION_VARIABLE,
    CALLER_RECORDS_VARIABLE,
    PURPOSE_VARIABLE,
    PURPOSES_VARIABLE,
    STATUS_VARIABLE,
)
# Statuses [consent-gate-apply] accepts; anything else stays "unavailable".
CHANNEL_STATUSES = frozenset({"granted", "declined", "no-input", "notified", "unavailable"})
RECORDING_STATUSES = frozenset({"granted", "notified"})

# -- mid-call state kept on the caller's channel -----------------------------------------------
# "1" once the caller withdrew: [consent-gate-apply] checks it right before and right after
# MixMonitor, so a *0 that arrives before the recording starts blocks it.
WITHDRAWN_VARIABLE = "CONSENT_WITHDRAWN"
# MixMonitor's i() option stores its id here: StopMixMonitor / MixMonitorMute act on exactly
# this call's recorder, never on another MixMonitor on the same channel.
MIXMONITOR_ID_VARIABLE = "CONSENT_MIXMONITOR_ID"
PAUSED_AT_VARIABLE = "CONSENT_PAUSED_AT"
# Read by [consent-gate-agent-notice] (Dial U() pre-bridge routine, AGI mode) on the agent's
# channel: the dialplan sets it as __CONSENT_AGENT_NOTICE, so it is inherited.
AGENT_NOTICE_VARIABLE = "CONSENT_AGENT_NOTICE"

# [consent-gate-reset] empties every one of these before the gate asks (whatever a caller or an
# earlier hop set is replaced), and sets the status to "unavailable".
RESET_VARIABLES = (
    RESULT_VARIABLE, *RESULT_FIELDS, AGENT_NOTICE_VARIABLE, WITHDRAWN_VARIABLE, PAUSED_AT_VARIABLE,
    MIXMONITOR_ID_VARIABLE,
)

# -- where a call the service will not finish goes ----------------------------------------------
# [consent-gate-released] clears the result, so nothing handed back before can start a
# recording, then applies and returns like the gate.
RELEASE_CONTEXT = "consent-gate-released"
RELEASE_LABEL = "release"

# -- recordings: the id and the files MixMonitor writes for it -----------------------------------
# A recording id is 32 lowercase hex characters (uuid4().hex): the only thing a recording's file
# name is built from.  [consent-gate-apply] writes <id>.wav, and for purposes with training
# copies the legs <id>-caller.wav and <id>-agent.wav (MixMonitor r()/t()).
RECORDING_ID_PATTERN = "[0-9a-f]{32}"
RECORDING_FILE_SUFFIXES = (".wav", "-caller.wav", "-agent.wav")
_RECORDING_ID = re.compile(RECORDING_ID_PATTERN)
_RECORDING_FILE = re.compile(
    f"({RECORDING_ID_PATTERN})(?:" + "|".join(re.escape(suffix) for suffix in RECORDING_FILE_SUFFIXES) + ")")
_PURPOSE = re.compile(r"[a-z0-9-]{1,40}")
# What Asterisk's MixMonitor stores via i(): a datastore uid; refuse anything that could carry
# an AMI line break or a second field.
_MIXMONITOR_ID = re.compile(r"[0-9A-Za-z_.:-]{1,80}")


# C0 and C1 control characters (and DEL): never part of a caller ID or an AGI value.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def valid_caller_text(value: object, limit: int = 80) -> str | None:
    """Caller ID text as a channel reports it, or None when it holds a control character (a line
    break would let a caller rewrite an AGI environment or a log line) or is absurdly long."""
    return value if isinstance(value, str) and len(value) <= limit and not CONTROL_CHARACTERS.search(value) else None


def valid_recording_id(value: object) -> str | None:
    """A recording id (32 lowercase hex) or None: the only thing a file name is built from."""
    return value if isinstance(value, str) and _RECORDING_ID.fullmatch(value) else None


def check_recording_id(value: object) -> str:
    """:func:`valid_recording_id` for code that must not go on without one (raises ValueError)."""
    recording_id = valid_recording_id(value)
    if recording_id is None:
        raise ValueError("not a recording id (32 lowercase hex characters)")
    return recording_id


def recording_file_names(recording_id: str) -> tuple[str, ...]:
    """The names MixMonitor may write for one recording (mix first, then the legs)."""
    check_recording_id(recording_id)
    return tuple(recording_id + suffix for suffix in RECORDING_FILE_SUFFIXES)


def recording_id_of_file(name: str) -> str | None:
    """The recording id a file in the recordings directory belongs to, or None for any other file."""
    match = _RECORDING_FILE.fullmatch(name)
    return match[1] if match else None


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def valid_consent_id(value: object) -> str | None:
    """A ledger consent id: a UUID in the canonical form the adapters write, else None."""
    return value if isinstance(value, str) and _UUID.fullmatch(value) else None


def valid_status(value: object) -> str | None:
    return value if isinstance(value, str) and value in CHANNEL_STATUSES else None


def valid_purpose_name(value: object) -> str | None:
    return value if isinstance(value, str) and _PURPOSE.fullmatch(value) else None


def valid_mixmonitor_id(value: object) -> str | None:
    return value if isinstance(value, str) and _MIXMONITOR_ID.fullmatch(value) else None


def valid_time(value: object) -> datetime | None:
    """An ISO 8601 time with a timezone (as the adapters write it), else None."""
    if not isinstance(value, str) or not 19 <= len(value) <= 40:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def unpack_result(packed: object) -> dict[str, str] | None:
    """The fields of a ``CONSENT_RESULT`` value read back from a channel, each validated; None
    if anything in it is malformed (the caller is then treated as not recorded)."""
    if not isinstance(packed, str) or len(packed) > 600:
        return None
    parts = packed.split(RESULT_SEPARATOR)
    if len(parts) != len(RESULT_FIELDS):
        return None
    fields = dict(zip(RESULT_FIELDS, parts, strict=True))
    if valid_consent_id(fields["CONSENT_ID"]) is None or valid_status(fields["CONSENT_STATUS"]) is None:
        return None
    if fields["CONSENT_RECORDING_ID"] and valid_recording_id(fields["CONSENT_RECORDING_ID"]) is None:
        return None
    if not valid_purpose_name(fields["CONSENT_PURPOSE"]):
        return None
    if any(valid_purpose_name(name) is None for name in fields["CONSENT_PURPOSES"].split(",") if name):
        return None
    if fields["CONSENT_CALLER_RECORDS"] not in ("", "1") or fields["CONSENT_RECORD_LEGS"] not in ("", "1"):
        return None
    return fields
