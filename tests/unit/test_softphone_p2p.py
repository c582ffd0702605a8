"""Peer-to-peer tests of the test-rig softphone: real SIP and RTP over
127.0.0.1 between lines of one Softphone (no Asterisk involved), plus the
command line run as subprocesses.

Every wait is bounded; no sleep is used as synchronisation.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("baresip")

from consent_gate_rig import audio  # noqa: E402
from consent_gate_rig.softphone import (  # noqa: E402
    CallNotAnswered,
    Line,
    PhoneCall,
    Softphone,
    SoftphoneError,
    encode_sip_user,
    parse_name_addr,
)

REPO = Path(__file__).resolve().parents[2]
T = 5.0  # generous bound for every event wait on loopback

_counter = 0


def _name(prefix: str) -> str:
    global _counter
    _counter += 1
    return f"{prefix}{_counter}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def phone() -> AsyncIterator[Softphone]:
    # baresip allows one runtime per process: reuse one a session fixture
    # elsewhere may already have opened.
    existing = Softphone.current()
    if existing is not None:
        yield existing
        return
    async with Softphone(listen="127.0.0.1:0") as p:
        yield p


async def _connect(
    phone: Softphone, **call_kwargs: object
) -> tuple[Line, Line, PhoneCall, PhoneCall]:
    alice = await phone.line(_name("alice"))
    bob = await phone.line(_name("bob"))
    call = await alice.call(bob.uri, **call_kwargs)  # type: ignore[arg-type]
    leg = await bob.wait_incoming(T)
    await leg.answer(T)
    await call.wait_answered(T)
    return alice, bob, call, leg


async def _end(*calls: PhoneCall) -> None:
    for c in calls:
        await c.hangup()
    for c in calls:
        assert await c.wait_hangup(T)


# -- calls, DTMF, audio --------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_call_dtmf_audio_both_ways_and_hangup(phone: Softphone) -> None:
    alice, bob, call, leg = await _connect(phone)
    assert call.answered and leg.answered
    assert call.direction == "outgoing" and leg.direction == "incoming"
    assert leg.caller_id[1] == alice.user

    await call.send_dtmf("1*#", gap=0.1)
    assert await asyncio.wait_for(leg.wait_dtmf(T, count=3), T + 1) == "1*#"
    assert leg.received_dtmf() == "1*#"
    assert [k for _, k in leg.dtmf_log] == ["1", "*", "#"]

    # Caller "speaks" 440 Hz while the agent answers with 1000 Hz.
    t_call, t_leg = call.elapsed(), leg.elapsed()
    sent = await asyncio.wait_for(
        asyncio.gather(call.play_tone(440, 1.0), leg.play_tone(1000, 1.0)), T
    )
    assert list(sent) == [True, True]
    # The capture lags real time by one packet or so; let it catch up, bounded.
    await _until(lambda: leg.elapsed() - t_leg > 1.3 and call.elapsed() - t_call > 1.3)

    heard_by_agent = leg.heard_segment(t_leg, None)
    heard_by_caller = call.heard_segment(t_call, None)
    rate = leg.heard_rate
    assert rate == 8000
    assert audio.rms_dbfs(heard_by_agent) > -30
    assert audio.goertzel_dbfs(heard_by_agent, rate, 440) > -25
    assert audio.goertzel_dbfs(heard_by_agent, rate, 1000) < -50  # no crosstalk
    assert audio.goertzel_dbfs(heard_by_caller, rate, 1000) > -25
    assert audio.goertzel_dbfs(heard_by_caller, rate, 440) < -50

    await call.hangup()
    assert await leg.wait_hangup(T)
    assert leg.remote_hung_up and not call.remote_hung_up
    assert call.ended and call.ended_at is not None and leg.ended_at is not None
    assert await call.wait_hangup(T)


async def _until(predicate, timeout: float = T) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.asyncio(loop_scope="session")
async def test_sip_info_dtmf(phone: Softphone) -> None:
    _, _, call, leg = await _connect(phone, dtmf_method="info")
    assert call.dtmf_method == "info"
    await call.send_dtmf("9", method="info")
    await call.send_dtmf("0")
    assert await leg.wait_dtmf(T, count=2) == "90"
    await _end(call)
    assert await leg.wait_hangup(T)


@pytest.mark.asyncio(loop_scope="session")
async def test_agent_side_dtmf_and_hangup(phone: Softphone) -> None:
    _, _, call, leg = await _connect(phone)
    await leg.send_dtmf("5")
    assert await call.wait_dtmf(T) == "5"
    await leg.hangup()
    assert await call.wait_hangup(T)
    assert call.remote_hung_up and not leg.remote_hung_up


@pytest.mark.asyncio(loop_scope="session")
async def test_dtmf_method_is_fixed_per_call(phone: Softphone) -> None:
    _, _, call, leg = await _connect(phone)
    with pytest.raises(SoftphoneError, match="dtmf_method='info'"):
        await call.send_dtmf("1", method="info")
    with pytest.raises(ValueError, match="DTMF"):
        await call.send_dtmf("1x")
    with pytest.raises(TimeoutError):
        await leg.wait_dtmf(0.3)
    await _end(call, leg)


@pytest.mark.asyncio(loop_scope="session")
async def test_heard_timeline_is_relative_to_answer(phone: Softphone) -> None:
    _, _, call, leg = await _connect(phone)
    # Nothing for ~1 s, then 0.6 s of tone from the agent: the caller's
    # capture must place the tone ~1 s after answer (silence is filled in).
    await leg.play_silence(1.0)
    await leg.play_tone(600, 0.6)
    await _until(lambda: call.elapsed() > 2.0)
    spans = audio.speech_spans(call.heard_samples(), call.heard_rate)
    assert len(spans) == 1, spans
    start, end = spans[0]
    assert 0.8 < start < 1.5, spans
    assert 0.45 < end - start < 0.8, spans
    assert len(call.heard()) / 2 / call.heard_rate == pytest.approx(call.elapsed(), abs=0.3)
    await _end(call)
    assert await leg.wait_hangup(T)


@pytest.mark.asyncio(loop_scope="session")
async def test_play_wav_and_save_heard(phone: Softphone, tmp_path: Path) -> None:
    speech = audio.write_wav(tmp_path / "speech16k.wav", audio.tone(500, 0.8, 16000), 16000)
    _, _, call, leg = await _connect(phone)
    t0 = leg.elapsed()
    assert await call.play_wav(speech)  # 16 kHz file, resampled to the call's 8 kHz
    await _until(lambda: leg.elapsed() - t0 > 1.1)
    await _end(call)
    assert await leg.wait_hangup(T)
    out = leg.save_heard(tmp_path / "heard.wav")
    rate, samples = audio.read_wav(out)
    assert rate == 8000
    assert audio.goertzel_dbfs(audio.segment(samples, rate, t0, None), rate, 500) > -25
    assert audio.duration(out) == pytest.approx(leg.elapsed(), abs=0.3)


# -- caller identity --------------------------------------------------------------------

HOSTILE_NAMES = [
    "$(rm -rf /); `id` | cat /etc/passwd",
    "'; DROP TABLE consent; --",
    "../../../etc/passwd\\..",
    'He said "yes"',
    "Jürgen Ødegård 日本語 😀",
    "N" * 300,
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
async def test_hostile_caller_name_arrives_verbatim(phone: Softphone, name: str) -> None:
    alice = await phone.line(_name("alice"))
    bob = await phone.line(_name("bob"))
    call = await alice.call(bob.uri, caller_name=name)
    leg = await bob.wait_incoming(T)
    assert leg.caller_id == (name, alice.user)
    await leg.reject()
    with pytest.raises(CallNotAnswered) as info:
        await call.wait_answered(T)
    assert info.value.status == 486


HOSTILE_USERS = ["$(id)", "a b;c?d", "Jürgen", "'--", "+4512345678", "x" * 120]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("user", HOSTILE_USERS, ids=range(len(HOSTILE_USERS)))
async def test_hostile_from_user_is_percent_encoded(phone: Softphone, user: str) -> None:
    alice = await phone.line(_name("alice"), display_name="Line Default")
    bob = await phone.line(_name("bob"))
    call = await alice.call(bob.uri, from_user=user)
    leg = await bob.wait_incoming(T)
    assert leg.caller_id == ("Line Default", encode_sip_user(user))
    await _end(call, leg)


@pytest.mark.asyncio(loop_scope="session")
async def test_overlong_caller_name_is_sent_but_exposed_value_is_capped(phone: Softphone) -> None:
    alice = await phone.line(_name("alice"))
    bob = await phone.line(_name("bob"))
    call = await alice.call(bob.uri, caller_name="L" * 1000)
    leg = await bob.wait_incoming(T)
    assert leg.headers_truncated
    assert leg.caller_id == (None, alice.user)  # name unknown, not a wrong name
    await _end(call, leg)


@pytest.mark.asyncio(loop_scope="session")
async def test_header_injection_is_refused(phone: Softphone) -> None:
    alice = await phone.line(_name("alice"))
    with pytest.raises(ValueError, match="control character"):
        await alice.call("sip:x@127.0.0.1:9", caller_name="Eve\r\nX-Injected: 1")
    with pytest.raises(ValueError):
        await alice.call("sip:x@127.0.0.1:9", headers={"X-Bad": "a\r\nVia: evil"})


def test_name_addr_parsing() -> None:
    assert parse_name_addr('"A \\"B\\" \\\\C" <sip:u@h>;tag=1') == ('A "B" \\C', "sip:u@h")
    assert parse_name_addr("Bob <sip:b@h>") == ("Bob", "sip:b@h")
    assert parse_name_addr("<sip:b@h>;tag=x") == (None, "sip:b@h")
    assert parse_name_addr("sip:b@h;tag=x") == (None, "sip:b@h")
    assert parse_name_addr(None) == (None, None)
    assert parse_name_addr('"cut short by the 512-character cap') == (None, None)
    assert encode_sip_user("a b;%") == "a%20b%3B%25"
    assert encode_sip_user("Jü") == "J%C3%BC"


# -- failures ---------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_unanswered_call_times_out_and_cancels(phone: Softphone) -> None:
    alice = await phone.line(_name("alice"))
    bob = await phone.line(_name("bob"))
    call = await alice.call(bob.uri)
    leg = await bob.wait_incoming(T)
    with pytest.raises(CallNotAnswered, match="not answered within"):
        await call.wait_answered(0.5)
    assert await leg.wait_hangup(T)  # the CANCEL reached the agent
    assert leg.remote_hung_up and not leg.answered


@pytest.mark.asyncio(loop_scope="session")
async def test_unknown_user_is_404(phone: Softphone) -> None:
    alice = await phone.line(_name("alice"))
    call = await alice.call(f"sip:nobody-here@{phone.address}")
    with pytest.raises(CallNotAnswered) as info:
        await call.wait_answered(T)
    assert info.value.status == 404
    assert call.remote_hung_up


@pytest.mark.asyncio(loop_scope="session")
async def test_no_incoming_call(phone: Softphone) -> None:
    bob = await phone.line(_name("bob"))
    with pytest.raises(TimeoutError):
        await bob.wait_incoming(0.2)


# -- command line -----------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "consent_gate_rig.softphone", *args]


async def _run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *_cli(*args),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_help_and_usage_errors(tmp_path: Path) -> None:
    code, out, _ = await _run_cli("--help")
    assert code == 0 and "--wait-answer" in out and "exit codes" in out
    code, _, err = await _run_cli("--user", "a")
    assert code == 2 and "--call" in err
    code, _, err = await _run_cli("--user", "a", "--call", "sip:x@h", "--keys", "1x")
    assert code == 2 and "--keys" in err and "'1x'" in err
    missing = tmp_path / "nope.wav"
    code, _, err = await _run_cli("--user", "a", "--call", "sip:x@h", "--speak", str(missing))
    assert code == 2 and "--speak" in err and "nope.wav" in err
    code, _, err = await _run_cli("--user", "a", "--call", "100")
    assert code == 2 and "--registrar" in err
    code, _, err = await _run_cli("--user", "a", "--registrar", "h:99999", "--call", "100")
    assert code == 2 and "--registrar" in err and "99999" in err


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_exit_codes_for_no_answer_and_no_call(phone: Softphone) -> None:
    # 404 from our in-process phone (its loop keeps running while we await).
    code, _, err = await _run_cli(
        "--user", "alice", "--call", f"sip:nobody@{phone.address}", "--wait-answer", "5"
    )
    assert code == 3, err
    assert "404" in err
    code, _, err = await _run_cli(
        "--user", "bob", "--listen", "127.0.0.1:0", "--answer", "--wait-incoming", "0.3"
    )
    assert code == 5 and "no incoming call" in err


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_caller_and_answerer_talk(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a_wav = audio.write_wav(tmp_path / "a.wav", audio.tone(440, 1.0), 8000)
    b_wav = audio.write_wav(tmp_path / "b.wav", audio.tone(1000, 1.0), 8000)
    answerer = await asyncio.create_subprocess_exec(
        *_cli(
            "--listen",
            f"127.0.0.1:{port}",
            "--user",
            "bob",
            "--answer",
            "--wait-incoming",
            "20",
            "--speak",
            str(b_wav),
            "--save-heard",
            str(tmp_path / "bob.wav"),
            "--duration",
            "15",
            "--json",
        ),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert answerer.stderr is not None
    # Wait until the answerer says it is listening (bounded).
    while True:
        line = await asyncio.wait_for(answerer.stderr.readline(), 15)
        assert line, "answerer exited early"
        if b"waiting up to" in line:
            break
    code, out, err = await _run_cli(
        "--user",
        "alice",
        "--caller-name",
        "Alice $(id)",
        "--call",
        f"sip:bob@127.0.0.1:{port}",
        "--wait-answer",
        "10",
        "--keys",
        "1",
        "--keys-delay",
        "0.2",
        "--speak",
        str(a_wav),
        "--save-heard",
        str(tmp_path / "alice.wav"),
        "--duration",
        "3",
        "--json",
    )
    assert code == 0, err
    caller = json.loads(out)
    b_out, b_err = await asyncio.wait_for(answerer.communicate(), 20)
    assert answerer.returncode == 0, b_err.decode()
    agent = json.loads(b_out)

    assert agent["dtmf_received"] == "1"
    assert agent["ended_by"] == "remote" and caller["ended_by"] == "local"
    assert agent["caller"]["name"] == "Alice $(id)"
    assert caller["speech_complete"] is True
    rate, heard_b = audio.read_wav(tmp_path / "bob.wav")
    assert audio.goertzel_dbfs(heard_b, rate, 440) > -35
    rate, heard_a = audio.read_wav(tmp_path / "alice.wav")
    assert audio.goertzel_dbfs(heard_a, rate, 1000) > -35
