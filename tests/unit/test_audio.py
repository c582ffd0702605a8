"""Unit tests for consent_gate_rig.audio (pure stdlib, no SIP)."""

from __future__ import annotations

import array
import math
import struct
import wave
from pathlib import Path

import pytest

from consent_gate_rig import audio


def test_tone_level_and_length() -> None:
    t = audio.tone(440, 1.0, 8000, amplitude=0.5)
    assert isinstance(t, array.array) and t.typecode == "h"
    assert len(t) == 8000
    # A sine of amplitude A has RMS A/sqrt(2): 0.5 FS -> about -9 dBFS.
    assert audio.rms_dbfs(t) == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.2)
    assert audio.peak(t) <= 32767 // 2 + 1
    assert t[0] == 0  # fades in: no click


def test_silence_and_empty_levels() -> None:
    assert audio.rms(audio.silence(0.5)) == 0.0
    assert audio.rms_dbfs(audio.silence(0.5)) == float("-inf")
    assert audio.rms([]) == 0.0
    assert audio.rms_dbfs([]) == float("-inf")
    assert audio.peak([]) == 0
    assert len(audio.silence(0.25, 16000)) == 4000


def test_full_scale_reference() -> None:
    square = array.array("h", [32767, -32768] * 100)
    assert audio.rms_dbfs(square) == pytest.approx(0.0, abs=0.01)
    assert audio.to_dbfs(32768 / 10) == pytest.approx(-20.0)


def test_wav_roundtrip(tmp_path: Path) -> None:
    samples = audio.tone(1000, 0.5, 16000) + audio.silence(0.25, 16000)
    path = audio.write_wav(tmp_path / "x.wav", samples, 16000)
    rate, back = audio.read_wav(path)
    assert rate == 16000
    assert back == samples
    assert audio.duration(path) == pytest.approx(0.75)


def test_read_wav_stereo_is_mixed_down(tmp_path: Path) -> None:
    path = tmp_path / "st.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(struct.pack("<4h", 1000, 3000, -2000, 0))
    rate, mono = audio.read_wav(path)
    assert rate == 8000
    assert list(mono) == [2000, -1000]


@pytest.mark.parametrize("width", [1, 3, 4])
def test_read_wav_other_widths(tmp_path: Path, width: int) -> None:
    path = tmp_path / f"w{width}.wav"
    values = [0, 16384, -16384]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(8000)
        if width == 1:
            w.writeframes(bytes(128 + (v >> 8) for v in values))
        else:
            shift = 8 * (width - 2)
            w.writeframes(
                b"".join((v << shift).to_bytes(width, "little", signed=True) for v in values)
            )
    _, back = audio.read_wav(path)
    assert list(back) == values


def test_read_wav_rejects_non_wav(tmp_path: Path) -> None:
    bogus = tmp_path / "speech.wav"
    bogus.write_bytes(b"this is not a wav file at all")
    with pytest.raises(ValueError, match="speech.wav"):
        audio.read_wav(bogus)
    with pytest.raises(FileNotFoundError):
        audio.read_wav(tmp_path / "missing.wav")


def test_segment_clamps_and_slices() -> None:
    s = array.array("h", range(100))
    assert list(audio.segment(s, 10, 1.0, 2.0)) == list(range(10, 20))
    assert list(audio.segment(s, 10, 9.5, None)) == list(range(95, 100))
    assert len(audio.segment(s, 10, 20.0, 30.0)) == 0
    assert list(audio.segment(s, 10, -1.0, 0.3)) == [0, 1, 2]
    assert len(audio.segment(s, 10, 5.0, 4.0)) == 0


def test_speech_spans_finds_bursts() -> None:
    rate = 8000
    sig = (
        audio.silence(0.5, rate)
        + audio.tone(440, 1.0, rate)
        + audio.silence(1.0, rate)
        + audio.tone(700, 0.5, rate)
        + audio.silence(0.3, rate)
    )
    spans = audio.speech_spans(sig, rate, threshold_dbfs=-40, min_len=0.1)
    assert len(spans) == 2
    (a0, a1), (b0, b1) = spans
    assert a0 == pytest.approx(0.5, abs=0.03) and a1 == pytest.approx(1.5, abs=0.03)
    assert b0 == pytest.approx(2.5, abs=0.03) and b1 == pytest.approx(3.0, abs=0.03)


def test_speech_spans_merges_short_gaps_and_drops_blips() -> None:
    rate = 8000
    sig = (
        audio.tone(300, 0.4, rate)
        + audio.silence(0.1, rate)  # pause between words: merged
        + audio.tone(300, 0.4, rate)
        + audio.silence(1.0, rate)
        + audio.tone(300, 0.04, rate)  # a click: dropped by min_len
        + audio.silence(0.5, rate)
    )
    spans = audio.speech_spans(sig, rate, min_len=0.1)
    assert len(spans) == 1
    assert spans[0][0] == pytest.approx(0.0, abs=0.03)
    assert spans[0][1] == pytest.approx(0.9, abs=0.03)
    quiet = audio.tone(300, 1.0, rate, amplitude=0.001)  # about -63 dBFS
    assert audio.speech_spans(quiet, rate, threshold_dbfs=-40) == []
    assert audio.speech_spans(quiet, rate, threshold_dbfs=-70) != []


def test_goertzel_separates_frequencies() -> None:
    rate = 8000
    t440 = audio.tone(440, 1.0, rate, amplitude=0.5)
    level = audio.rms_dbfs(t440)
    assert audio.goertzel_dbfs(t440, rate, 440) == pytest.approx(level, abs=0.5)
    assert audio.goertzel_dbfs(t440, rate, 1000) < level - 40
    assert audio.goertzel_dbfs([], rate, 440) == float("-inf")


def test_resample_preserves_duration_and_pitch() -> None:
    t = audio.tone(440, 1.0, 16000)
    down = audio.resample(t, 16000, 8000)
    assert len(down) == 8000
    assert audio.goertzel_dbfs(down, 8000, 440) == pytest.approx(audio.rms_dbfs(down), abs=0.5)
    up = audio.resample(down, 8000, 44100)
    assert len(up) == 44100
    assert audio.resample(t, 16000, 16000) == t
    with pytest.raises(ValueError):
        audio.resample(t, 0, 8000)


def test_pcm_roundtrip_and_byteorder() -> None:
    s = array.array("h", [1, -2, 300, -32768, 32767])
    assert audio.from_pcm(audio.to_pcm(s)) == s
    assert audio.to_pcm([1]) == b"\x01\x00"
    assert audio.to_pcm([1], byteorder="big") == b"\x00\x01"
    assert list(audio.from_pcm(b"\x00\x01", byteorder="big")) == [1]
    assert list(audio.from_pcm(b"\x01\x00\x07")) == [1]  # odd trailing byte ignored


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        audio.tone(440, 1.0, 8000, amplitude=2.0)
    with pytest.raises(ValueError):
        audio.segment([1, 2], 0, 0, 1)
    with pytest.raises(ValueError):
        audio.write_wav("/nonexistent/x.wav", [], 0)
