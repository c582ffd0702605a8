"""Voice de-identification for training copies: McAdams-coefficient LPC pole warping.

What it does
------------
The signal is cut into 20 ms frames (10 ms hop, square-root Hann windows, so that analysis
and synthesis windows multiply to a Hann window that overlap-adds to one).  For each frame
an LPC all-pole model ``1/A(z)`` is estimated (autocorrelation method, Levinson via
``scipy.linalg.solve_toeplitz``); the frame is inverse-filtered to its residual (the
excitation: pitch pulses and noise), every complex pole pair of ``A`` is moved from angle
``phi`` to ``phi ** alpha`` with its radius unchanged, and the residual is filtered through
the warped model.  The frame's energy is restored and the frames are overlap-added.  This is
the signal-processing baseline of the VoicePrivacy Challenge (McAdams coefficient
``alpha``; Patino et al., 2021) re-implemented here in numpy/scipy.

Why the range differs at 8 kHz
-------------------------------
``phi ** alpha`` has its fixed point at ``phi = 1 rad``.  At 16 kHz that is 2546 Hz; at 8 kHz
it is 1273 Hz, right between the first and second formant.  With ``alpha < 1`` formants below
1273 Hz move up and those above move down (the spectrum is squeezed towards 1273 Hz); the
challenge's 16 kHz settings therefore do not transfer: squeezing F1 and F2 together costs
intelligibility fast.  The defaults (``alpha`` in 0.80-0.90, or its reciprocal, which spreads
the formants apart, each half of the time; no pitch shift unless asked for) were picked from the trade-off curve measured by
``bench/anonymisation`` (see ``docs/anonymisation.md``).

Randomness
----------
``alpha``, its direction (``alpha`` or ``1/alpha``) and the optional pitch shift are drawn per
call of :func:`anonymise` from
``secrets.SystemRandom`` unless a generator is passed (tests pass a seeded
``numpy.random.Generator``).  The drawn values are never returned, logged or stored.

Pitch shift (optional; ``DEFAULT_PITCH_SEMITONES`` = ±1-2 semitones when asked for)
-------------------------------------------------------------------------------------
With ``pitch_semitones`` set, the residual (not the speech: the formant envelope stays where
the McAdams step put it) is time-stretched by WSOLA and resampled back to its length, which
moves the pitch by the drawn number of semitones and keeps the duration.
"""

from __future__ import annotations

import math
import secrets
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.linalg import solve_toeplitz
from scipy.signal import lfilter, resample_poly

__all__ = [
    "DEFAULT_COEFFICIENT_RANGE",
    "DEFAULT_PITCH_SEMITONES",
    "FIXED_POINT_RAD",
    "AnonymiserSettings",
    "AudioFormatError",
    "anonymise",
    "anonymise_file",
    "draw_parameters",
    "dtmf_frames",
    "silence_dtmf",
    "lpc",
    "mcadams",
    "pitch_shift",
    "read_wav",
    "read_wav_mono",
    "warp_poles",
    "write_wav",
]

SAMPLE_RATE = 8000
FIXED_POINT_RAD = 1.0
#: McAdams coefficient range drawn from per recording (chosen from bench/anonymisation).
DEFAULT_COEFFICIENT_RANGE: tuple[float, float] = (0.80, 0.90)
#: Whether alpha is replaced by 1/alpha with probability 1/2 (see AnonymiserSettings).
DEFAULT_BIDIRECTIONAL = True
#: Magnitude range of the optional pitch shift, in semitones (the sign is random too).  Off by
#: default: it lowers identification further but costs about two points of digit error (bench).
DEFAULT_PITCH_SEMITONES: tuple[float, float] = (1.0, 2.0)
_EPS = 1e-10


class AudioFormatError(ValueError):
    """The input is not audio this module can process (not 8 kHz 16-bit PCM WAV, ...)."""


class RandomSource(Protocol):
    """``random.Random``/``secrets.SystemRandom`` and ``numpy.random.Generator`` both fit."""

    def uniform(self, low: float, high: float) -> float: ...  # noqa: E704
    def random(self) -> float: ...  # noqa: E704


@dataclass(frozen=True)
class AnonymiserSettings:
    """How the caller's voice is changed.

    ``coefficient_range``: McAdams ``alpha`` is drawn uniformly from it per recording;
    ``bidirectional``: with probability 1/2 the reciprocal ``1/alpha`` is used instead, which
    spreads the formants away from 1 rad rather than squeezing them towards it (so even the
    direction of the change is secret).  ``coefficient`` fixes it instead (benchmarks, audits;
    never the default: a fixed, known coefficient makes the transform easy to learn).  ``pitch_semitones``: ``None`` for no
    pitch shift, else the magnitude range in semitones (random sign).
    """

    coefficient_range: tuple[float, float] = DEFAULT_COEFFICIENT_RANGE
    coefficient: float | None = None
    bidirectional: bool = DEFAULT_BIDIRECTIONAL
    pitch_semitones: tuple[float, float] | None = None
    lpc_order: int = 12
    frame_ms: float = 20.0  # analysis frame; the hop is half of it

    def __post_init__(self) -> None:
        low, high = self.coefficient_range
        if not 0.3 <= low <= high <= 2.0:
            raise ValueError(f"coefficient_range {self.coefficient_range} must lie within 0.3..2.0, low <= high")
        if self.coefficient is not None and not 0.3 <= self.coefficient <= 2.0:
            raise ValueError(f"coefficient {self.coefficient} must lie within 0.3..2.0")
        if self.pitch_semitones is not None:
            p_low, p_high = self.pitch_semitones
            if not 0.0 <= p_low <= p_high <= 12.0:
                raise ValueError(f"pitch_semitones {self.pitch_semitones} must lie within 0..12, low <= high")
        if not 4 <= self.lpc_order <= 40:
            raise ValueError(f"lpc_order {self.lpc_order} must lie within 4..40")
        if not 5.0 <= self.frame_ms <= 60.0:
            raise ValueError(f"frame_ms {self.frame_ms} must lie within 5..60")


def _system_random() -> RandomSource:
    return secrets.SystemRandom()


def draw_parameters(settings: AnonymiserSettings, rng: RandomSource | None = None) -> tuple[float, float]:
    """``(alpha, pitch_factor)`` for one recording.  Callers must not keep them."""
    rng = rng or _system_random()
    if settings.coefficient is not None:
        alpha = settings.coefficient
    else:
        alpha = float(rng.uniform(*settings.coefficient_range))
        if settings.bidirectional and rng.random() < 0.5:
            alpha = 1.0 / alpha
    factor = 1.0
    if settings.pitch_semitones is not None:
        semitones = float(rng.uniform(*settings.pitch_semitones))
        if rng.random() < 0.5:
            semitones = -semitones
        factor = 2.0 ** (semitones / 12.0)
    return alpha, factor


# -- LPC and pole warping ------------------------------------------------------------------

def lpc(frame: np.ndarray, order: int) -> np.ndarray:
    """LPC polynomial ``[1, a1, ..., ap]`` of a (windowed) frame, autocorrelation method.

    The autocorrelation matrix is made strictly positive definite (a tiny white-noise floor and
    a Gaussian lag window), so the model is minimum phase: all poles inside the unit circle.
    """
    n = len(frame)
    spectrum = np.fft.rfft(frame, 2 * n)
    r = np.fft.irfft(np.abs(spectrum) ** 2)[: order + 1]
    if r[0] <= _EPS:
        a = np.zeros(order + 1)
        a[0] = 1.0
        return a
    lag = np.arange(order + 1)
    r = r * np.exp(-0.5 * (2 * np.pi * 40.0 / SAMPLE_RATE * lag) ** 2)  # 40 Hz lag window
    r[0] *= 1.0 + 1e-6
    coefficients = solve_toeplitz(r[:order], -r[1: order + 1])
    return np.concatenate(([1.0], coefficients))


def warp_poles(a: np.ndarray, alpha: float) -> np.ndarray:
    """Move each complex pole from angle ``phi`` to ``phi ** alpha`` (radius kept).

    Real poles stay.  Angles are kept inside (0, pi); conjugate pairs stay pairs, so the
    returned polynomial is real.  Radii are unchanged, so a stable model stays stable.
    """
    if alpha == 1.0 or len(a) < 2:
        return np.array(a, dtype=float)
    poles = np.roots(a)
    angles = np.angle(poles)
    complex_ = np.abs(poles.imag) > 1e-12
    magnitude = np.abs(angles[complex_])
    warped = np.clip(magnitude ** alpha, 1e-6, np.pi - 1e-6) * np.sign(angles[complex_])
    poles = poles.astype(complex)
    poles[complex_] = np.abs(poles[complex_]) * np.exp(1j * warped)
    return np.real(np.poly(poles))


def _windows(rate: int, settings: AnonymiserSettings) -> tuple[int, int, np.ndarray]:
    hop = max(2, int(round(rate * settings.frame_ms / 2000)))
    size = 2 * hop
    # Periodic sqrt-Hann: analysis x synthesis = Hann, which sums to 1 at 50 % overlap.
    window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size))
    return size, hop, window


def mcadams(samples: np.ndarray, rate: int, alpha: float, *, pitch_factor: float = 1.0,
            settings: AnonymiserSettings | None = None) -> np.ndarray:
    """The McAdams transform with a given ``alpha`` (float samples in, float samples out).

    The output has the input's length; each frame keeps its input energy.  With
    ``alpha == 1`` and no pitch shift the input is reconstructed (up to rounding).
    """
    settings = settings or AnonymiserSettings()
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("mono samples expected")
    if len(x) == 0:
        return x.copy()
    size, hop, window = _windows(rate, settings)
    # Half a frame of padding in front, and enough behind, so every sample is under two frames.
    count = int(math.ceil(len(x) / hop)) + 1
    padded = np.zeros((count - 1) * hop + size)
    padded[hop: hop + len(x)] = x
    order = settings.lpc_order
    out = np.zeros_like(padded)
    models: list[tuple[np.ndarray, float]] = []
    residual = np.zeros_like(padded) if pitch_factor != 1.0 else None
    for k in range(count):
        start = k * hop
        frame = padded[start: start + size] * window
        energy = float(frame @ frame)
        a = lpc(frame, order)
        a_new = warp_poles(a, alpha)
        if residual is None:
            y = lfilter([1.0], a_new, lfilter(a, [1.0], frame))
            y_energy = float(y @ y)
            if y_energy > _EPS and np.isfinite(y_energy):
                y *= math.sqrt(energy / y_energy)
            else:
                y = frame.copy()
            out[start: start + size] += y * window
        else:
            residual[start: start + size] += lfilter(a, [1.0], frame) * window
            models.append((a_new, energy))
    if residual is not None:
        shifted = pitch_shift(residual, pitch_factor, rate)
        for k, (a_new, energy) in enumerate(models):
            start = k * hop
            excitation = shifted[start: start + size] * window
            y = lfilter([1.0], a_new, excitation)
            y_energy = float(y @ y)
            if y_energy > _EPS and np.isfinite(y_energy):
                y *= math.sqrt(energy / y_energy)
            else:
                y = np.zeros(size)
            out[start: start + size] += y * window
    return out[hop: hop + len(x)]


# -- pitch shift: WSOLA time-stretch + resampling --------------------------------------------

def _wsola(x: np.ndarray, factor: float, rate: int) -> np.ndarray:
    """Time-stretch by ``factor`` (>1 longer) keeping the pitch (WSOLA, Hann 30 ms, 50 %)."""
    size = int(round(0.030 * rate)) // 2 * 2
    hop = size // 2
    tolerance = int(round(0.008 * rate))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)
    out_len = int(round(len(x) * factor))
    count = out_len // hop + 1
    source = np.concatenate((np.zeros(tolerance), x, np.zeros(size + tolerance + hop + int(size * factor) + 2)))
    out = np.zeros(count * hop + size)
    previous = tolerance
    for k in range(count):
        nominal = tolerance + int(round(k * hop / factor))
        if k == 0:
            best = nominal
        else:
            target = source[previous + hop: previous + hop + size]
            low = max(0, nominal - tolerance)
            region = source[low: nominal + tolerance + size]
            corr = np.correlate(region, target, mode="valid")
            best = low + int(np.argmax(corr)) if corr.size and np.any(corr) else nominal
        out[k * hop: k * hop + size] += source[best: best + size] * window
        previous = best
    return out[:out_len]


def pitch_shift(samples: np.ndarray, factor: float, rate: int) -> np.ndarray:
    """Pitch times ``factor``, same length: WSOLA-stretch by ``factor``, resample by 1/``factor``."""
    x = np.asarray(samples, dtype=np.float64)
    if factor == 1.0 or len(x) == 0:
        return x.copy()
    stretched = _wsola(x, factor, rate)
    up = 96
    down = max(1, int(round(up * factor)))
    y = resample_poly(stretched, up, down)
    if len(y) < len(x):
        y = np.concatenate((y, np.zeros(len(x) - len(y))))
    return y[: len(x)]


# -- DTMF: no card or account digits survive as tones -----------------------------------------

DTMF_LOW = (697.0, 770.0, 852.0, 941.0)
DTMF_HIGH = (1209.0, 1336.0, 1477.0, 1633.0)


def dtmf_frames(samples: np.ndarray, rate: int = SAMPLE_RATE, *, frame_ms: float = 20.0) -> np.ndarray:
    """Boolean per ``frame_ms`` frame: does it hold a DTMF tone pair?

    A frame counts when one low-group and one high-group frequency together carry at least 90 %
    of its energy, neither is more than 10 dB below the other (twist) and the frame is louder
    than -45 dBFS.  Speech almost never meets this; DTMF always does.
    """
    x = np.asarray(samples, dtype=np.float64)
    size = max(1, int(round(rate * frame_ms / 1000)))
    count = len(x) // size
    if count == 0:
        return np.zeros(0, dtype=bool)
    frames = x[: count * size].reshape(count, size) * np.hanning(size)
    t = np.arange(size) / rate
    freqs = np.array(DTMF_LOW + DTMF_HIGH)
    basis = np.exp(-2j * np.pi * freqs[:, None] * t[None, :])
    window = np.hanning(size)
    # Energy of a tone in the windowed frame from its DFT value: |X|^2 * 2 * sum(w^2) / sum(w)^2.
    tones = np.abs(frames @ basis.T) ** 2 * 2 * np.sum(window ** 2) / np.sum(window) ** 2
    low, high = tones[:, :4], tones[:, 4:]
    best_low, best_high = low.max(axis=1), high.max(axis=1)
    energy = np.sum(frames ** 2, axis=1)
    loud = energy / np.sum(window ** 2) > (32768 * 10 ** (-45 / 20)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (best_low + best_high) / np.maximum(energy, 1e-9)
        twist = np.abs(10 * np.log10(np.maximum(best_low, 1e-9) / np.maximum(best_high, 1e-9)))
    return loud & (share >= 0.9) & (twist <= 10.0)


def silence_dtmf(samples: np.ndarray, rate: int = SAMPLE_RATE, *, pad_ms: float = 40.0) -> tuple[np.ndarray, int]:
    """Zero every DTMF tone (two or more consecutive 20 ms frames) plus ``pad_ms`` around it.

    Returns ``(samples, number of silenced spans)``; the input is not modified.
    """
    out = np.array(samples, copy=True)
    size = int(round(rate * 0.020))
    flags = dtmf_frames(out, rate)
    pad = int(round(rate * pad_ms / 1000))
    spans = 0
    k = 0
    while k < len(flags):
        if not flags[k]:
            k += 1
            continue
        end = k
        while end < len(flags) and flags[end]:
            end += 1
        if end - k >= 2:
            out[max(0, k * size - pad): min(len(out), end * size + pad)] = 0
            spans += 1
        k = end
    return out, spans


# -- public entry points ----------------------------------------------------------------------

def anonymise(samples: np.ndarray, rate: int = SAMPLE_RATE, settings: AnonymiserSettings | None = None,
              rng: RandomSource | None = None) -> np.ndarray:
    """De-identify one recording (int16 or float samples) -> int16 samples of the same length.

    A new ``alpha`` (and pitch shift) is drawn for every call; the overall level (RMS) of the
    input is kept, and the output is limited to 16 bits without wrapping.
    """
    settings = settings or AnonymiserSettings()
    if rate != SAMPLE_RATE:
        raise AudioFormatError(f"{rate} Hz audio: the anonymiser is tuned for {SAMPLE_RATE} Hz telephone audio "
                               f"(convert with: sox in.wav -r {SAMPLE_RATE} -c 1 -b 16 out.wav)")
    x = np.asarray(samples, dtype=np.float64)
    alpha, factor = draw_parameters(settings, rng)
    y = mcadams(x, rate, alpha, pitch_factor=factor, settings=settings)
    del alpha, factor  # never kept
    rms_in = math.sqrt(float(x @ x) / len(x)) if len(x) else 0.0
    rms_out = math.sqrt(float(y @ y) / len(y)) if len(y) else 0.0
    if rms_out > _EPS:
        y *= rms_in / rms_out
    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def _g711_decode(codes: np.ndarray, law: str) -> np.ndarray:
    """G.711 mu-law / A-law bytes -> int16 (ITU-T G.711 expansion)."""
    c = codes.astype(np.int32)
    if law == "mu":
        c = ~c & 0xFF
        exponent, mantissa = (c >> 4) & 0x07, c & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        return np.where(c & 0x80, -magnitude, magnitude).astype(np.int16)
    c = c ^ 0x55
    exponent, mantissa = (c >> 4) & 0x07, c & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(c & 0x80, magnitude, -magnitude).astype(np.int16)


def read_wav(path: str | Path) -> tuple[int, np.ndarray]:
    """Any common WAV file as ``(rate, int16 array of shape (frames, channels))``.

    Reads PCM 8/16/24/32-bit, IEEE float, G.711 mu-law and A-law (as Asterisk and many
    recorders write), plain or WAVE_FORMAT_EXTENSIBLE; other chunks (LIST, INFO, bext, ...)
    are skipped, never copied.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError(f"{path}: not a RIFF/WAVE file")
    fmt: bytes | None = None
    payload: bytes | None = None
    offset = 12
    while offset + 8 <= len(data):
        name, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        body = data[offset + 8: offset + 8 + size]
        if name == b"fmt ":
            fmt = body
        elif name == b"data":
            payload = body  # a recorder that never closed the file leaves size 0 or too large: take what is there
            if size == 0 or offset + 8 + size > len(data):
                payload = data[offset + 8:]
            break
        offset += 8 + size + (size & 1)
    if fmt is None or payload is None or len(fmt) < 16:
        raise AudioFormatError(f"{path}: no fmt/data chunk")
    tag, channels, rate = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little"), \
        int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")
    if channels < 1 or rate < 1:
        raise AudioFormatError(f"{path}: invalid header ({channels} channels, {rate} Hz)")
    width = max(1, bits // 8)
    usable = len(payload) - len(payload) % (width * channels)
    raw = payload[:usable]
    if tag == 1 and width == 1:
        samples = ((np.frombuffer(raw, np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
    elif tag == 1 and width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.int16)
    elif tag == 1 and width in (3, 4):
        bytes_ = np.frombuffer(raw, np.uint8).reshape(-1, width)
        samples = (bytes_[:, -2].astype(np.int16) & 0xFF) | (bytes_[:, -1].astype(np.int8).astype(np.int16) << 8)
    elif tag == 3 and width in (4, 8):
        floats = np.frombuffer(raw, "<f4" if width == 4 else "<f8")
        samples = np.clip(np.round(np.nan_to_num(floats) * 32767), -32768, 32767).astype(np.int16)
    elif tag in (6, 7) and width == 1:
        samples = _g711_decode(np.frombuffer(raw, np.uint8), "mu" if tag == 7 else "a")
    else:
        raise AudioFormatError(f"{path}: WAV format {tag} with {bits}-bit samples is not supported "
                               "(convert with: sox IN.wav -b 16 -e signed-integer OUT.wav)")
    return rate, samples.reshape(-1, channels)


def read_wav_mono(path: str | Path) -> tuple[int, np.ndarray]:
    """A mono WAV file (any encoding :func:`read_wav` reads) as ``(rate, int16 samples)``."""
    rate, frames = read_wav(path)
    if frames.shape[1] != 1:
        raise AudioFormatError(f"{path}: {frames.shape[1]} channels; mono expected "
                               f"(convert with: sox {Path(path).name} -c 1 out.wav)")
    return rate, frames[:, 0].copy()


def write_wav(path: str | Path, channels: list[np.ndarray], rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM WAV with exactly the RIFF, fmt and data chunks: no LIST/INFO or other metadata.

    ``channels``: one int16 array per channel (padded with silence to the longest).
    """
    path = Path(path)
    length = max((len(c) for c in channels), default=0)
    matrix = np.zeros((length, len(channels)), dtype="<i2")
    for index, channel in enumerate(channels):
        matrix[: len(channel), index] = channel
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(len(channels))
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(matrix.tobytes())
    return path


def anonymise_file(source: str | Path, target: str | Path, settings: AnonymiserSettings | None = None,
                   rng: RandomSource | None = None) -> Path:
    """Anonymise an 8 kHz WAV file into a new metadata-free 16-bit PCM WAV file.

    Every channel is anonymised, each with its own draw (a stereo call recording has the caller
    on one channel and the agent on the other; which is which is not known here).
    """
    rate, frames = read_wav(source)
    return write_wav(target, [anonymise(frames[:, c], rate, settings, rng) for c in range(frames.shape[1])], rate)
