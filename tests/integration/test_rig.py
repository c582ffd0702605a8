"""The rig proves itself: a real SIP call through the real Asterisk, a digit, MixMonitor.

Extension 100 of the sandbox answers, beeps, reads one digit and starts MixMonitor on "1".
This is the template for every feature test: real phone, real PBX, negative assertion too.
"""

from __future__ import annotations

import pytest

from consent_gate_rig import audio
from consent_gate_rig.calls import Phones, wait_until
from consent_gate_rig.harness import AsteriskLog
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration


def rig_recordings(asterisk: AsteriskSandbox, tag: str) -> list:
    return sorted(asterisk.recordings_dir.glob(f"rig-*-{tag}.wav"))


async def test_asterisk_sandbox_is_clean(asterisk: AsteriskSandbox) -> None:
    version = asterisk.cli("core show version")
    assert version.startswith("Asterisk 22."), version
    assert "consent-gate" in asterisk.cli("dialplan show consent-gate")
    log = asterisk.full_log.read_text(errors="replace")
    startup = log.split("Asterisk Ready")[0] if "Asterisk Ready" in log else log
    assert " WARNING[" not in startup and " ERROR[" not in startup, "Asterisk logged problems at start"
    assert oct(asterisk.recordings_dir.stat().st_mode & 0o777) == "0o700"


async def test_digit_1_records_the_callers_speech(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, speech_wav, test_tag: str
) -> None:
    call = await phones.caller.call(phones.uri("100"), headers={"X-Test-Call": test_tag})
    await call.wait_answered(10)
    await asterisk_log.wait_for(r"Read\(", 10)  # the beep has played, Read() listens
    await call.send_dtmf("1")
    await asterisk_log.wait_for(rf"rig-test: test={test_tag} digit=1", 10)
    await call.play_wav(speech_wav)
    assert await call.wait_hangup(15), "Asterisk should end the call after its Wait(6)"

    await wait_until(lambda: rig_recordings(asterisk, test_tag), 10, "the rig recording")
    [recording] = rig_recordings(asterisk, test_tag)
    assert recording.stat().st_mode & 0o777 == 0o600, "recordings must not be world-readable"
    rate, samples = audio.read_wav(recording)
    assert rate == 8000
    assert audio.duration(recording) > 3.0
    # The caller spoke right after the digit: speech energy well above line silence.
    assert audio.rms_dbfs(audio.segment(samples, rate, 0.3, 3.0)) > -35
    speech = audio.speech_spans(samples, rate, threshold_dbfs=-40, min_len=0.3)
    assert speech, "no speech found in the recording"


async def test_digit_2_leaves_no_recording(
    asterisk: AsteriskSandbox, asterisk_log: AsteriskLog, phones: Phones, speech_wav, test_tag: str
) -> None:
    call = await phones.caller.call(phones.uri("100"), headers={"X-Test-Call": test_tag})
    await call.wait_answered(10)
    await asterisk_log.wait_for(r"Read\(", 10)
    await call.send_dtmf("2")
    await asterisk_log.wait_for(rf"rig-test: test={test_tag} digit=2", 10)
    await call.play_wav(speech_wav)
    assert await call.wait_hangup(15)
    assert rig_recordings(asterisk, test_tag) == []
    assert "MixMonitor" not in asterisk_log.text()
