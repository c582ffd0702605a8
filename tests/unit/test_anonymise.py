"""Unit tests for the McAdams anonymiser (numpy/scipy only, deterministic with seeded generators)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter

from consent_gate import anonymise as an

RATE = 8000


def vowel(seconds: float = 2.0, f0: float = 120.0, formants: tuple[float, ...] = (700, 1200, 2600),
          seed: int = 0) -> np.ndarray:
    """A speech-like int16 signal: a jittered glottal pulse train through formant resonators,
    with a syllable-rate amplitude envelope and a little breath noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    excitation = np.zeros(n)
    t = 0.0
    while t < n:
        excitation[int(t)] = 1.0
        t += RATE / (f0 * (1 + 0.02 * rng.standard_normal()))
    excitation += 0.02 * rng.standard_normal(n)
    y = excitation
    for freq in formants:
        r = math.exp(-math.pi * 80 / RATE)
        theta = 2 * math.pi * freq / RATE
        y = lfilter([1.0], [1.0, -2 * r * math.cos(theta), r * r], y)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * np.arange(n) / RATE)
    y = y * envelope
    return np.round(y / np.max(np.abs(y)) * 12000).astype(np.int16)


def rms(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return math.sqrt(float(x @ x) / len(x))


def lpc_peak_hz(x: np.ndarray, below: float, above: float = 0.0) -> float:
    """Frequency of the strongest LPC-envelope peak in a band (averaged over the signal)."""
    spectrum = np.zeros(512)
    size = 320
    for start in range(0, len(x) - size, size):
        frame = x[start:start + size] * np.hanning(size)
        a = an.lpc(frame.astype(float), 12)
        spectrum += 1.0 / (np.abs(np.fft.rfft(a, 1022)) ** 2 + 1e-12)
    freqs = np.linspace(0, RATE / 2, 512)
    band = (freqs >= above) & (freqs <= below)
    return float(freqs[band][np.argmax(spectrum[band])])


def test_output_differs_keeps_length_and_energy_and_has_no_nans() -> None:
    x = vowel()
    y = an.anonymise(x, RATE, rng=np.random.default_rng(7))
    assert y.dtype == np.int16 and len(y) == len(x)
    assert np.all(np.isfinite(y.astype(float)))
    assert rms(y) == pytest.approx(rms(x), rel=0.02)
    correlation = float(np.corrcoef(x.astype(float), y.astype(float))[0, 1])
    assert correlation < 0.8, correlation
    # The first formant moved up (alpha < 1 squeezes the spectrum towards 1 rad = 1273 Hz).
    assert lpc_peak_hz(y, 1000) > lpc_peak_hz(x, 1000) + 60


def test_energy_contour_is_kept() -> None:
    x = vowel(seconds=3.0)
    y = an.anonymise(x, RATE, an.AnonymiserSettings(coefficient=0.7), rng=np.random.default_rng(1))
    block = RATE // 10
    levels_x = [rms(x[i:i + block]) for i in range(0, len(x) - block, block)]
    levels_y = [rms(y[i:i + block]) for i in range(0, len(y) - block, block)]
    assert np.corrcoef(levels_x, levels_y)[0, 1] > 0.95


def test_deterministic_with_a_seeded_generator_and_random_without() -> None:
    x = vowel()
    a = an.anonymise(x, RATE, rng=np.random.default_rng(42))
    b = an.anonymise(x, RATE, rng=np.random.default_rng(42))
    c = an.anonymise(x, RATE, rng=np.random.default_rng(43))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # The default source is the OS's secure generator: two runs differ.
    assert not np.array_equal(an.anonymise(x, RATE), an.anonymise(x, RATE))


def test_coefficient_drawn_within_range() -> None:
    settings = an.AnonymiserSettings(coefficient_range=(0.6, 0.8))
    rng = np.random.default_rng(3)
    draws = [an.draw_parameters(settings, rng) for _ in range(200)]
    alphas = [alpha for alpha, _ in draws]
    assert min(alphas) >= 0.6 and max(alphas) <= 0.8 and np.std(alphas) > 0.03
    assert all(factor == 1.0 for _, factor in draws)
    pitched = an.AnonymiserSettings(pitch_semitones=(2.0, 4.0))
    factors = [an.draw_parameters(pitched, rng)[1] for _ in range(200)]
    semitones = 12 * np.log2(factors)
    assert np.all((np.abs(semitones) >= 2.0 - 1e-9) & (np.abs(semitones) <= 4.0 + 1e-9))
    assert (semitones > 0).any() and (semitones < 0).any()


@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.8, 0.9, 1.2])
def test_warped_filter_is_stable(alpha: float) -> None:
    x = vowel(seed=5).astype(float)
    rng = np.random.default_rng(11)
    frames = [x[s:s + 160] * np.hanning(160) for s in range(0, len(x) - 160, 80)]
    frames += [rng.standard_normal(160) * np.hanning(160) for _ in range(20)]
    frames += [np.zeros(160), np.full(160, 1e-3)]
    for frame in frames:
        a = an.lpc(frame, 12)
        assert np.all(np.abs(np.roots(a)) < 1.0)
        warped = an.warp_poles(a, alpha)
        assert np.all(np.isreal(warped)) and np.all(np.isfinite(warped))
        assert warped[0] == pytest.approx(1.0)
        assert np.all(np.abs(np.roots(warped)) < 1.0)


def test_fixed_point_is_one_radian() -> None:
    # A resonance at exactly 1 rad stays put, others move towards it for alpha < 1.
    for hz, moves in ((RATE / (2 * math.pi), 0), (500, +1), (2500, -1)):
        theta = 2 * math.pi * hz / RATE
        a = np.real(np.poly([0.95 * np.exp(1j * theta), 0.95 * np.exp(-1j * theta)]))
        warped = an.warp_poles(a, 0.8)
        new_theta = float(np.max(np.angle(np.roots(warped))))
        if moves == 0:
            assert new_theta == pytest.approx(1.0, abs=1e-9)
        else:
            assert np.sign(new_theta - theta) == moves


def test_identity_coefficient_reconstructs() -> None:
    x = vowel()
    y = an.mcadams(x.astype(float), RATE, 1.0)
    assert np.max(np.abs(y - x)) < 1e-6


def test_pitch_shift_moves_pitch_and_keeps_length() -> None:
    n = RATE * 2
    tone = np.sin(2 * np.pi * 200 * np.arange(n) / RATE)
    factor = 2 ** (3 / 12)
    shifted = an.pitch_shift(tone, factor, RATE)
    assert len(shifted) == n
    spectrum = np.abs(np.fft.rfft(shifted[RATE // 4: -RATE // 4] * np.hanning(n - RATE // 2)))
    peak = np.argmax(spectrum) * RATE / (n - RATE // 2)
    assert peak == pytest.approx(200 * factor, rel=0.03)


def test_pitch_option_output_is_sane() -> None:
    x = vowel()
    settings = an.AnonymiserSettings(pitch_semitones=(3.0, 3.0))
    y = an.anonymise(x, RATE, settings, rng=np.random.default_rng(2))
    assert len(y) == len(x) and np.all(np.isfinite(y.astype(float)))
    assert rms(y) == pytest.approx(rms(x), rel=0.02)
    assert not np.array_equal(y, an.anonymise(x, RATE, an.AnonymiserSettings(), rng=np.random.default_rng(2)))


def test_edge_cases() -> None:
    assert len(an.anonymise(np.zeros(0, dtype=np.int16), RATE)) == 0
    silent = an.anonymise(np.zeros(1234, dtype=np.int16), RATE)
    assert len(silent) == 1234 and not silent.any()
    short = an.anonymise(vowel()[:37], RATE, rng=np.random.default_rng(0))
    assert len(short) == 37
    loud = np.full(4000, 32767, dtype=np.int16)
    loud[::2] = -32768
    assert an.anonymise(loud, RATE).dtype == np.int16
    with pytest.raises(an.AudioFormatError, match="8000 Hz"):
        an.anonymise(vowel(), 16000)
    with pytest.raises(ValueError):
        an.AnonymiserSettings(coefficient_range=(0.9, 0.6))


def riff_chunks(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    chunks, offset = [], 12
    while offset + 8 <= len(data):
        name, size = struct.unpack("<4sI", data[offset:offset + 8])
        chunks.append(name.decode("latin-1"))
        offset += 8 + size + (size & 1)
    return chunks


def test_anonymise_file_writes_only_audio_chunks(tmp_path: Path) -> None:
    source = tmp_path / "in.wav"
    an.write_wav(source, [vowel()])
    # An input with a LIST/INFO chunk (as some recorders write): the output must not carry it.
    data = bytearray(source.read_bytes())
    info = b"INFOINAM" + struct.pack("<I", 12) + b"+4512345678\x00"
    data += b"LIST" + struct.pack("<I", len(info)) + info
    data[4:8] = struct.pack("<I", len(data) - 8)
    source.write_bytes(bytes(data))
    assert "LIST" in riff_chunks(source)
    target = tmp_path / "out.wav"
    an.anonymise_file(source, target, rng=np.random.default_rng(0))
    assert riff_chunks(target) == ["fmt ", "data"]
    assert b"4512345678" not in target.read_bytes()
    rate, samples = an.read_wav_mono(target)
    assert rate == RATE and len(samples) == len(vowel())


def test_anonymise_file_rejects_wrong_formats(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo.wav"
    an.write_wav(stereo, [vowel(), vowel()])
    with pytest.raises(an.AudioFormatError, match="mono"):
        an.anonymise_file(stereo, tmp_path / "x.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav")
    with pytest.raises(an.AudioFormatError):
        an.anonymise_file(tmp_path / "junk.wav", tmp_path / "y.wav")
