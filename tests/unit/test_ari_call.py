"""The ARI service's per-call lifecycle (consent_gate.ari.app / call / midcall) on a fake ARI and AMI.

Events go straight into ``ConsentGateApp.dispatch`` (the websocket is the transport tests'
business); REST requests go over HTTP to ``FakeAri``, AMI actions over TCP to ``FakeAmi``.
The ledger is a fake that keeps every event and can hold a write back (a slow database).
Each test names the issue-16 case it proves; every wait is bounded, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consent_gate.ari.ami import AmiClient, AmiConfig
from consent_gate.ari.app import ConsentGateApp
from consent_gate.ari.call import CallState
from consent_gate.ari.transport import AriClient, AriConfig
from consent_gate.config import Settings, load_settings
from consent_gate.contract import MIXMONITOR_ID_VARIABLE, RESULT_VARIABLE, WITHDRAWN_VARIABLE
from consent_gate.core.dialog import GateContext
from consent_gate.core.events import ConsentEvent, EventKind
from consent_gate.ledger.store import Durability
from consent_gate.prompts.catalog import PromptCatalog, packaged_sounds_dir
from consent_gate_rig.fakes import PASSWORD, USER, FakeAmi, FakeAri
from consent_gate_rig.harness import SANDBOX_PURPOSES as PURPOSES

REPO = Path(__file__).resolve().parents[2]
SOUNDS = packaged_sounds_dir()
CATALOG = PromptCatalog.load(SOUNDS)
T = 5.0  # bound for every wait; never slept
CALLER = {"id": "c1", "name": "PJSIP/caller-00000001", "caller": {"number": "+4512345678"}, "language": "en",
          "dialplan": {"app_name": "Stasis"}}


class SlowLedger:
    """Keeps every event; :meth:`hold_next` makes the next write wait until :meth:`release`
    (a slow database); ``fail_next`` makes the next write of that kind raise an unexpected
    error (a bug)."""

    def __init__(self) -> None:
        self.events: list[ConsentEvent] = []
        self.degraded = False
        self.fail_next: EventKind | None = None
        self._held: asyncio.Event | None = None
        self.holding = asyncio.Event()

    def hold_next(self) -> None:
        self._held = asyncio.Event()
        self.holding.clear()

    def release(self) -> None:
        assert self._held is not None
        self._held.set()

    async def append(self, event: ConsentEvent, *, use_journal: bool = True) -> Durability:
        if self.fail_next is event.event:
            self.fail_next = None
            raise RuntimeError("unexpected failure in the ledger")
        if self._held is not None and not self._held.is_set():
            self.holding.set()
            await self._held.wait()
        self.events.append(event)
        return Durability.DATABASE


@dataclass
class Rig:
    ari: FakeAri
    ami: FakeAmi
    app: ConsentGateApp
    ledger: SlowLedger
    settings: Settings
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def send(self, event_type: str, channel: str = "c1", **fields: Any) -> None:
        await self.app.dispatch({"type": event_type, "channel": {"id": channel}, **fields})

    async def keys(self, digits: str, channel: str = "c1") -> None:
        for digit in digits:
            await self.send("ChannelDtmfReceived", channel, digit=digit)

    async def start_call(self, purposes: str = "training", channel: dict[str, Any] | None = None) -> None:
        snapshot = dict(channel or CALLER)
        self.ari.channels[snapshot["id"]] = snapshot
        await self.app.dispatch({"type": "StasisStart", "channel": snapshot, "args": [purposes]})

    def plays(self) -> list[dict[str, Any]]:
        return [r for r in self.ari.calls("POST", "/play/")]

    def var(self, name: str, channel: str = "c1") -> str | None:
        return self.ari.variables.get((channel, name))

    def recording_files(self, recording_id: str) -> list[Path]:
        return sorted(self.settings.recordings_dir.glob(f"{recording_id}*"))

    def mixmonitor_started(self, recording_id: str, channel: str = "c1") -> None:
        """What the dialplan's [consent-gate-apply] does after a grant: files and the recorder id."""
        for suffix in (".wav", "-caller.wav", "-agent.wav"):
            (self.settings.recordings_dir / f"{recording_id}{suffix}").write_bytes(b"RIFF")
        self.ari.variables[(channel, MIXMONITOR_ID_VARIABLE)] = "0x7f00mixmon1"
        # MIXMONITOR(id,filename) answers while that recorder runs.
        self.ari.variables[(channel, "MIXMONITOR(0x7f00mixmon1,filename)")] = f"/rec/{recording_id}.wav"

    def left_stasis(self, channel: str = "c1") -> None:
        self.ari.channels[channel]["dialplan"] = {"app_name": "Dial"}

    async def granted_call(self, channel: dict[str, Any] | None = None) -> str:
        """A call through the question to a stored grant, back in the dialplan, recording."""
        snapshot = channel or CALLER
        asked = len(self.plays())
        await self.start_call(channel=snapshot)
        await eventually(lambda: len(self.plays()) > asked, "the question")
        await self.keys("1", snapshot["id"])
        await eventually(lambda: self.var(RESULT_VARIABLE, snapshot["id"]) is not None)
        await eventually(lambda: self.call_state(snapshot["id"]) is CallState.WATCHING)
        recording_id = self.var(RESULT_VARIABLE, snapshot["id"]).split(":")[1]  # type: ignore[union-attr]
        self.left_stasis(snapshot["id"])
        self.mixmonitor_started(recording_id, snapshot["id"])
        return recording_id

    def call_state(self, channel: str = "c1") -> CallState | None:
        states = [c.state for c in self.app.calls if c.channel_id == channel]
        return states[-1] if states else None


async def eventually(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Poll a condition, bounded by T (a condition wait, not a fixed sleep)."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), T)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def make_settings(tmp_path: Path, **changes: Any) -> Settings:
    recordings = tmp_path / "recordings"
    recordings.mkdir(mode=0o700)
    config = tmp_path / "consent-gate.toml"
    config.write_text(PURPOSES)
    base = load_settings(config, env={
        "CONSENT_GATE_HMAC_KEY": "k" * 32,
        "CONSENT_GATE_ARI_PASSWORD": "pw",
        "CONSENT_GATE_PROMPTS_DIR": str(SOUNDS),
        "CONSENT_GATE_ASTERISK_SOUNDS_DIR": "/var/lib/asterisk/sounds/consent-gate/",
        "CONSENT_GATE_RECORDINGS_DIR": str(recordings),
        "CONSENT_GATE_RECORDINGS_OWNER": str(os.geteuid()),
    })
    return dataclasses.replace(base, **changes)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    marker = request.node.get_closest_marker("ami_down")
    ari, ami_server = FakeAri(), FakeAmi()
    await ari.start()
    await ami_server.start()
    ari.responses[("GET", "/ari/bridges")] = (200, [{"id": "b1", "channels": ["c1", "a1"]}])
    settings = make_settings(tmp_path)
    ledger = SlowLedger()

    def setvar(action: dict[str, str]) -> None:
        # AMI Setvar works on any channel (ARI only on channels in Stasis).
        if action.get("Action") == "Setvar":
            for channel_id, snapshot in ari.channels.items():
                if snapshot.get("name") == action.get("Channel"):
                    ari.variables[(channel_id, action["Variable"])] = action["Value"]

    ami_server.on_action = setvar
    ami_port = closed_port() if marker else ami_server.port
    ami = AmiClient(AmiConfig("127.0.0.1", ami_port, "cg", "secret", timeout=1.0))
    async with AriClient(AriConfig(base_url=f"http://127.0.0.1:{ari.port}", username=USER, password=PASSWORD,
                                   app="consent-gate", request_timeout=2.0)) as client:
        app = ConsentGateApp(client, GateContext(settings, CATALOG, ledger), ami=ami)  # type: ignore[arg-type]
        rig = Rig(ari, ami_server, app, ledger, settings)
        try:
            yield rig
        finally:
            await app.shutdown()
            await ami.close()
    await ari.stop()
    await ami_server.stop()


def withdrawn_events(rig: Rig) -> list[ConsentEvent]:
    return [e for e in rig.ledger.events if e.event is EventKind.WITHDRAWN]


# -- case 1: a withdrawal is never lost because the recorder could not be stopped ------------------

async def test_withdrawal_with_a_refusing_ami_deletes_blocks_logs_and_retries(rig: Rig) -> None:
    rig.ami.replies["StopMixMonitor"] = "Error"
    recording_id = await rig.granted_call()
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawn event")
    assert rig.recording_files(recording_id) == [], "withdrawn means gone, recorder running or not"
    assert rig.var(WITHDRAWN_VARIABLE) == "1", "the dialplan must never (re)start this recorder"
    [event] = withdrawn_events(rig)
    assert event.detail["recorder_stopped"] is False
    assert event.detail["deleted_files"] == 3
    # The recorder is retried until it stops: once AMI accepts, it is stopped -- by its own id.
    rig.ami.replies["StopMixMonitor"] = "Success"
    attempts = len(rig.ami.named("StopMixMonitor"))
    await eventually(lambda: len(rig.ami.named("StopMixMonitor")) > attempts, "a retried StopMixMonitor")
    assert {a["MixMonitorID"] for a in rig.ami.named("StopMixMonitor")} == {"0x7f00mixmon1"}
    [call] = rig.app.calls
    await eventually(lambda: call.watch is not None and call.watch.state.recorder_stopped, "recorder stopped")
    assert len(withdrawn_events(rig)) == 1, "one decision, one event"


@pytest.mark.ami_down
async def test_withdrawal_with_ami_down_still_deletes_blocks_and_logs(rig: Rig) -> None:
    recording_id = await rig.granted_call()
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawn event")
    assert rig.recording_files(recording_id) == []
    # Out of Stasis only AMI can mark the channel: noted, and the files are gone all the same.
    assert rig.var(WITHDRAWN_VARIABLE) is None
    assert withdrawn_events(rig)[0].detail["recorder_stopped"] is False
    assert withdrawn_events(rig)[0].detail["blocked"] is False
    # A second *0 is not ignored: it tries again, and logs no second decision.
    stop_tries = len([r for r in rig.ari.calls("GET", "/variable") if MIXMONITOR_ID_VARIABLE in str(r["query"])])
    await rig.keys("*0")
    await eventually(lambda: len([r for r in rig.ari.calls("GET", "/variable")
                                  if MIXMONITOR_ID_VARIABLE in str(r["query"])]) > stop_tries, "a retry")
    assert len(withdrawn_events(rig)) == 1


async def test_a_pause_that_could_not_mute_is_not_logged(rig: Rig) -> None:
    rig.ami.replies["MixMonitorMute"] = "Error"
    await rig.granted_call()
    await rig.send("ChannelVarset", variable="BRIDGEPEER", value="PJSIP/agent-00000002")
    [call] = rig.app.calls
    await eventually(lambda: call.watch is not None and "a1" in call.watch.agents, "the agent in the bridge")
    await rig.keys("*5", channel="a1")
    await eventually(lambda: len(rig.ami.named("MixMonitorMute")) == 1, "the mute attempt")
    await rig.keys("*0")  # a later event is handled: the pause attempt is over
    await eventually(lambda: withdrawn_events(rig) != [])
    assert EventKind.PAUSED not in [e.event for e in rig.ledger.events]
    assert call.watch is not None and call.watch.state.paused_at is None


# -- case 2: "1" then "*0" at once: the withdrawal blocks the recorder before it starts ------------

async def test_star0_keyed_while_the_grant_is_stored_blocks_the_recorder(rig: Rig) -> None:
    await rig.start_call()
    await eventually(lambda: len(rig.plays()) == 1)
    rig.ledger.hold_next()
    await rig.keys("1")
    await asyncio.wait_for(rig.ledger.holding.wait(), T)  # the grant is being written (slow database)
    await rig.keys("*0")  # from a fast SIP phone: before the dialplan could run MixMonitor
    rig.ledger.release()
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawn event")
    # The withdrawal is logged by the watch, the hand-back goes on in the call's task: either
    # may come first, so wait for the continue too (its order against the variables is the point).
    await eventually(lambda: any(r["raw_path"].endswith("/continue") for r in rig.ari.requests), "the continue")
    order = [(r["raw_path"].rsplit("/", 1)[-1], r["query"].get("variable")) for r in rig.ari.requests
             if r["method"] == "POST" and r["raw_path"].endswith(("/variable", "/continue"))]
    # Marked withdrawn while still in Stasis, before the result goes back and the dialplan runs.
    assert order[:3] == [("variable", WITHDRAWN_VARIABLE), ("variable", RESULT_VARIABLE), ("continue", None)]
    assert rig.var(WITHDRAWN_VARIABLE) == "1"
    # MixMonitor never ran (no recorder id): nothing to stop over AMI, and nothing is left running.
    assert rig.ami.named("StopMixMonitor") == []
    assert withdrawn_events(rig)[0].detail["recorder_stopped"] is True


# -- case 3: a key counts only for the question whose prompt has started ---------------------------

async def test_a_fast_second_key_does_not_answer_the_next_question(rig: Rig) -> None:
    await rig.start_call("documentation+training")
    await eventually(lambda: len(rig.plays()) == 1)
    rig.ledger.hold_next()
    await rig.keys("1")
    await asyncio.wait_for(rig.ledger.holding.wait(), T)
    await rig.keys("1")  # pressed while "documentation" is stored: before "training" was asked
    rig.ledger.release()
    await eventually(lambda: len(rig.plays()) == 2, "the second question")
    assert "question-training" in rig.plays()[1]["query"]["media"]
    await rig.send("PlaybackFinished", playback={"id": rig.plays()[1]["raw_path"].rsplit("/", 1)[-1]})
    [call] = rig.app.calls
    assert call.state is CallState.ASKING
    assert [str(e.event) for e in rig.ledger.events] == ["granted"], "the early key answered nothing"
    await rig.keys("2")
    await eventually(lambda: len(rig.ledger.events) == 2)
    assert [(e.purpose, str(e.event)) for e in rig.ledger.events] == [
        ("documentation", "granted"), ("training", "declined")]


# -- the watch goes on after an unexpected error -----------------------------------------------------

async def test_an_unexpected_error_in_one_code_does_not_end_the_callers_rights(rig: Rig) -> None:
    recording_id = await rig.granted_call()
    rig.ledger.fail_next = EventKind.CALLER_RECORDS
    await rig.keys("*3")  # its ledger write fails with an error nobody expected
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawal after the failed code")
    assert rig.recording_files(recording_id) == []


# -- routing by index, removal by identity -------------------------------------------------------------

async def test_a_second_gate_on_the_same_channel_keeps_both_recordings_withdrawable(rig: Rig) -> None:
    first = await rig.granted_call()
    # The admin's dialplan runs the gate again on the same channel (e.g. another purpose later).
    rig.ari.channels["c1"]["dialplan"] = {"app_name": "Stasis"}
    del rig.ari.variables[("c1", RESULT_VARIABLE)]
    second = await rig.granted_call()
    assert first != second
    await rig.keys("*0")
    await eventually(lambda: len(withdrawn_events(rig)) == 2, "both recordings withdrawn")
    assert rig.recording_files(first) == rig.recording_files(second) == []
    assert {e.recording_id for e in withdrawn_events(rig)} == {first, second}


async def test_the_end_of_one_call_does_not_unroute_another(rig: Rig) -> None:
    await rig.granted_call()
    other = dict(CALLER, id="c2", name="PJSIP/caller-00000003")
    await rig.granted_call(channel=other)
    await rig.send("ChannelDestroyed", channel="c1")
    await eventually(lambda: rig.call_state("c1") is None, "the first call ended")
    await rig.keys("*0", channel="c2")
    await eventually(lambda: withdrawn_events(rig) != [])
    assert [e.call_id for e in withdrawn_events(rig)] == ["c2"]


# -- case 10: after a restart, a call in progress keeps withdrawal and pause ---------------------------

async def test_a_restarted_service_adopts_a_handed_back_call(rig: Rig) -> None:
    recording_id = uuid.uuid4().hex
    consent_id = str(uuid.uuid4())
    rig.ari.channels["c1"] = dict(CALLER, dialplan={"app_name": "Dial"})
    rig.ari.variables[("c1", RESULT_VARIABLE)] = f"{consent_id}:{recording_id}::::training:training:granted"
    rig.ari.responses[("GET", "/ari/applications/consent-gate")] = (200, {"channel_ids": ["c1"]})
    rig.mixmonitor_started(recording_id)
    await rig.app.dispatch({"type": "TransportConnected"})
    await eventually(lambda: rig.call_state("c1") is CallState.WATCHING, "the adopted call")
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawal of the adopted call")
    [event] = withdrawn_events(rig)
    assert (str(event.consent_id), event.recording_id) == (consent_id, recording_id)
    assert rig.recording_files(recording_id) == []


@pytest.mark.parametrize("packed", ["", "garbage", "not-a-uuid:" + "a" * 32 + "::::training:training:granted",
                                    f"{uuid.uuid4()}:../../etc/passwd::::training:training:granted"])
async def test_a_malformed_result_on_a_channel_is_not_adopted(rig: Rig, packed: str) -> None:
    rig.ari.channels["c1"] = dict(CALLER, dialplan={"app_name": "Dial"})
    rig.ari.variables[("c1", RESULT_VARIABLE)] = packed
    rig.ari.responses[("GET", "/ari/applications/consent-gate")] = (200, {"channel_ids": ["c1"]})
    await rig.app.dispatch({"type": "TransportConnected"})
    await eventually(lambda: rig.ari.calls("DELETE", "/subscription") != [], "the old subscription dropped")
    assert rig.call_state("c1") is None


# -- a recording the law requires: *0 withdraws the consent purposes, not the recording -----------

async def notified_call(rig: Rig, purposes: str) -> str:
    asked = len(rig.plays())
    await rig.start_call(purposes)
    for _ in purposes.split("+"):
        await eventually(lambda: len(rig.plays()) > asked, "the next prompt")
        asked = len(rig.plays())
        playback = rig.plays()[-1]
        if "notice-legal-obligation" in playback["query"]["media"]:
            await rig.send("PlaybackFinished", playback={"id": playback["raw_path"].rsplit("/", 1)[-1]})
        else:
            await rig.keys("1")
    await eventually(lambda: rig.call_state() is CallState.WATCHING, "the handed-back call")
    recording_id = rig.var(RESULT_VARIABLE).split(":")[1]  # type: ignore[union-attr]
    rig.left_stasis()
    rig.mixmonitor_started(recording_id)
    return recording_id


@pytest.mark.parametrize("purposes", ["securities", "documentation+securities"])
async def test_withdrawal_keeps_a_recording_the_law_requires(rig: Rig, purposes: str) -> None:
    recording_id = await notified_call(rig, purposes)
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [], "the withdrawn event")
    assert withdrawn_events(rig)[0].detail == {"kept_by_law": True}
    assert len(rig.recording_files(recording_id)) == 3
    assert rig.ami.named("StopMixMonitor") == [] and rig.var(WITHDRAWN_VARIABLE) is None
    # ... and the card-data pause still works on it.
    await rig.send("ChannelVarset", variable="BRIDGEPEER", value="PJSIP/agent-00000002")
    [call] = rig.app.calls
    await eventually(lambda: call.watch is not None and "a1" in call.watch.agents, "the agent in the bridge")
    await rig.keys("*5", channel="a1")
    await eventually(lambda: EventKind.PAUSED in [e.event for e in rig.ledger.events], "the pause")
    assert rig.ami.named("MixMonitorMute")[0]["State"] == "1"


async def test_the_stasis_end_of_the_hand_back_does_not_end_the_watch(rig: Rig) -> None:
    """StasisEnd for the continue may come while the call is still handing back: the call lives
    on past the cleanup grace period, and its codes work (found by the randomised callers)."""
    rig.app.cleanup_grace = 0.05
    await rig.start_call()
    await eventually(lambda: len(rig.plays()) == 1)
    held = rig.ari.holds[("POST", "/ari/channels/c1/continue")] = asyncio.Event()
    await rig.keys("1")
    await eventually(lambda: rig.ari.calls("POST", "/continue") != [], "the continue")
    await rig.send("StasisEnd")  # Asterisk's answer to the continue, before its HTTP response
    held.set()
    await eventually(lambda: rig.call_state() is CallState.WATCHING)
    rig.left_stasis()
    await asyncio.wait_for(rig.app.background_done(), T)  # the reaper has decided
    recording_id = rig.var(RESULT_VARIABLE).split(":")[1]  # type: ignore[union-attr]
    rig.mixmonitor_started(recording_id)
    await rig.keys("*0")
    await eventually(lambda: withdrawn_events(rig) != [])
    assert rig.recording_files(recording_id) == []


@pytest.mark.parametrize("number", ["+4512\n345678", "+45\x0012", "1" * 200])
async def test_a_caller_number_with_control_characters_is_not_used(rig: Rig, number: str) -> None:
    await rig.start_call(channel=dict(CALLER, caller={"number": number}))
    await eventually(lambda: len(rig.plays()) == 1)
    await rig.keys("1")
    await eventually(lambda: rig.ledger.events != [])
    [event] = rig.ledger.events
    assert event.caller_ref is None and event.caller_number is None
