"""Audio measurement helpers for the test rig (stdlib only: wave, array, math).

Everything works on *mono signed 16-bit* samples held in ``array.array("h")``
(any sequence of ints is accepted as input). Times are in seconds, levels in
dBFS where 0 dBFS is a full-scale square wave (``rms == 32768``): a full-scale
sine measures about -3 dBFS, digital silence ``-inf``.

Typical use in a test::

    rate, samples = read_wav(path)               # or call.heard_samples()
    assert rms_dbfs(segment(samples, rate, 0.0, 2.0)) > -40   # something heard
    spans = speech_spans(samples, rate)          # where was there sound?

and to make "speech" for a softphone to send::

    write_wav(path, tone(440, 1.5) + silence(0.5) + tone(660, 1.0), 8000)
"""

from __future__ import annotations

import array
import math
import struct
import sys
import wave
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "FULL_SCALE",
    "duration",
    "from_pcm",
    "goertzel_dbfs",
    "peak",
    "read_wav",
    "resample",
    "rms",
    "rms_dbfs",
    "segment",
    "silence",
    "speech_spans",
    "to_dbfs",
    "to_pcm",
    "tone",
    "write_wav",
]

#: Reference for dBFS: the magnitude of a full-scale 16-bit square wave.
FULL_SCALE = 32768.0

_INT16_MIN, _INT16_MAX = -32768, 32767


def _clip(value: float) -> int:
    v = int(round(value))
    return _INT16_MIN if v < _INT16_MIN else _INT16_MAX if v > _INT16_MAX else v


def _as_samples(samples: Iterable[int]) -> array.array[int]:
    if isinstance(samples, array.array) and samples.typecode == "h":
        return samples
    return array.array("h", samples)


# -- PCM <-> samples -----------------------------------------------------------


def from_pcm(pcm: bytes | bytearray | memoryview, *, byteorder: str = "little") -> array.array[int]:
    """Signed 16-bit PCM bytes -> samples. A trailing odd byte is ignored."""
    data = bytes(pcm)
    if len(data) % 2:
        data = data[:-1]
    out = array.array("h")
    out.frombytes(data)
    if byteorder != sys.byteorder:
        out.byteswap()
    return out


def to_pcm(samples: Iterable[int], *, byteorder: str = "little") -> bytes:
    """Samples -> signed 16-bit PCM bytes (little-endian unless told)."""
    arr = array.array("h", _as_samples(samples))  # copy: byteswap is in place
    if byteorder != sys.byteorder:
        arr.byteswap()
    return arr.tobytes()


# -- WAV files -----------------------------------------------------------------


def read_wav(path: str | Path) -> tuple[int, array.array[int]]:
    """Read a PCM WAV file as ``(sample_rate, mono 16-bit samples)``.

    8-, 16-, 24- and 32-bit integer PCM are accepted; several channels are
    mixed down to mono by averaging. Compressed or floating-point WAVs
    (which Python's ``wave`` module cannot read) raise ValueError naming the
    file — convert them with e.g. ``sox in.wav -b 16 out.wav``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable PCM WAV file.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            rate = w.getframerate()
            channels = w.getnchannels()
            width = w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except wave.Error as exc:
        raise ValueError(f"{path}: not a PCM WAV file this reader understands ({exc})") from None
    except EOFError:
        raise ValueError(f"{path}: truncated WAV file") from None
    if rate <= 0 or channels <= 0:
        raise ValueError(f"{path}: invalid WAV header (rate {rate}, channels {channels})")
    if width == 1:  # unsigned 8-bit
        interleaved = array.array("h", ((b - 128) << 8 for b in raw))
    elif width == 2:
        interleaved = from_pcm(raw, byteorder="little")
    elif width in (3, 4):
        shift = 8 * (width - 2)
        n = len(raw) // width
        interleaved = array.array(
            "h",
            (
                int.from_bytes(raw[i * width : (i + 1) * width], "little", signed=True) >> shift
                for i in range(n)
            ),
        )
    else:
        raise ValueError(f"{path}: unsupported sample width of {width} bytes")
    if channels == 1:
        return rate, interleaved
    frames = len(interleaved) // channels
    mono = array.array(
        "h",
        (
            _clip(sum(interleaved[f * channels : (f + 1) * channels]) / channels)
            for f in range(frames)
        ),
    )
    return rate, mono


def write_wav(path: str | Path, samples: Iterable[int], rate: int = 8000) -> Path:
    """Write mono 16-bit samples as a PCM WAV file; returns the path."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    path = Path(path)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_pcm(samples))
    return path


def riff_chunks(path: str | Path) -> list[str]:
    """The chunk ids of a WAV file in order (e.g. ``["fmt ", "data"]``): shows metadata chunks
    such as ``LIST``/``INFO`` that the wave module skips silently."""
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    chunks, offset = [], 12
    while offset + 8 <= len(data):
        name, size = struct.unpack("<4sI", data[offset:offset + 8])
        chunks.append(name.decode("latin-1"))
        offset += 8 + size + (size & 1)
    return chunks


def duration(path: str | Path) -> float:
    """Length of a WAV file in seconds."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except wave.Error as exc:
        raise ValueError(f"{path}: not a PCM WAV file this reader understands ({exc})") from None


# -- levels --------------------------------------------------------------------


def rms(samples: Sequence[int]) -> float:
    """Root-mean-square amplitude (0 .. 32768); 0.0 for no samples."""
    n = len(samples)
    if n == 0:
        return 0.0
    return math.sqrt(math.fsum(s * s for s in samples) / n)


def to_dbfs(level: float) -> float:
    """A linear amplitude (as :func:`rms` returns) in dBFS; ``-inf`` for 0."""
    if level <= 0:
        return float("-inf")
    return 20.0 * math.log10(level / FULL_SCALE)


def rms_dbfs(samples: Sequence[int]) -> float:
    """RMS level in dBFS (full-scale square = 0, full-scale sine ~ -3.01,
    digital silence or no samples = ``-inf``)."""
    return to_dbfs(rms(samples))


def peak(samples: Sequence[int]) -> int:
    """Largest absolute sample value; 0 for no samples."""
    return max((abs(s) for s in samples), default=0)


def goertzel_dbfs(samples: Sequence[int], rate: int, freq: float) -> float:
    """Level of one frequency component in dBFS (Goertzel algorithm).

    Scaled so that a pure sine of amplitude A at ``freq`` reads the same as
    its :func:`rms_dbfs` (about ``20*log10(A/32768) - 3``). Use it to tell
    *which* tone was heard, e.g. the caller's 440 Hz versus the agent's
    1000 Hz, where plain RMS cannot.
    """
    n = len(samples)
    if n == 0:
        return float("-inf")
    k = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + k * s1 - s2
        s2, s1 = s1, s0
    power = s1 * s1 + s2 * s2 - k * s1 * s2
    if power <= 0:
        return float("-inf")
    amplitude = 2.0 * math.sqrt(power) / n  # peak amplitude of the component
    return to_dbfs(amplitude / math.sqrt(2.0))


# -- slicing and analysis -------------------------------------------------------


def segment(
    samples: Sequence[int], rate: int, start_s: float, end_s: float | None
) -> array.array[int]:
    """Samples between ``start_s`` and ``end_s`` seconds (None = to the end).

    Bounds are clamped to the recording, so asking past the end yields fewer
    (possibly zero) samples rather than an error.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    n = len(samples)
    lo = min(n, max(0, int(round(start_s * rate))))
    hi = n if end_s is None else min(n, max(lo, int(round(end_s * rate))))
    return array.array("h", _as_samples(samples)[lo:hi])


def speech_spans(
    samples: Sequence[int],
    rate: int,
    threshold_dbfs: float = -40.0,
    min_len: float = 0.1,
    *,
    window: float = 0.02,
    max_gap: float = 0.25,
) -> list[tuple[float, float]]:
    """Where there is sound: ``[(start_s, end_s), ...]``, in order.

    The signal is cut into ``window``-second frames; a frame is active when
    its RMS level is at or above ``threshold_dbfs``. Active frames separated
    by less than ``max_gap`` seconds of quiet merge into one span (speech has
    short pauses between words), and spans shorter than ``min_len`` seconds
    are dropped (clicks, comfort-noise blips). Resolution is one window.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    samples = _as_samples(samples)
    step = max(1, int(round(window * rate)))
    spans: list[list[int]] = []  # [start_sample, end_sample]
    gap_samples = int(round(max_gap * rate))
    for start in range(0, len(samples), step):
        frame = samples[start : start + step]
        if rms_dbfs(frame) < threshold_dbfs:
            continue
        end = start + len(frame)
        if spans and start - spans[-1][1] <= gap_samples:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    return [(s / rate, e / rate) for s, e in spans if (e - s) / rate >= min_len]


# -- synthesis -----------------------------------------------------------------


def tone(freq: float, seconds: float, rate: int = 8000, amplitude: float = 0.5) -> array.array[int]:
    """A sine tone: ``amplitude`` is a fraction of full scale (0..1).

    Starts and ends at zero phase, with a 5 ms fade in and out so the tone
    does not click (a click reads as broadband energy in analyses).
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude must be within 0..1, got {amplitude}")
    n = max(0, int(round(seconds * rate)))
    fade = min(n // 2, int(0.005 * rate))
    peak_value = amplitude * _INT16_MAX
    w = 2.0 * math.pi * freq / rate
    out = array.array("h", bytes(2 * n))
    for i in range(n):
        gain = 1.0
        if i < fade:
            gain = i / fade
        elif i >= n - fade:
            gain = (n - 1 - i) / fade
        out[i] = _clip(peak_value * gain * math.sin(w * i))
    return out


def silence(seconds: float, rate: int = 8000) -> array.array[int]:
    """Digital silence of the given length."""
    return array.array("h", bytes(2 * max(0, int(round(seconds * rate)))))


def resample(samples: Sequence[int], from_rate: int, to_rate: int) -> array.array[int]:
    """Linear-interpolation resampling (adequate for telephony test audio).

    No anti-alias filter: downsampling content above the new Nyquist
    frequency aliases. Test speech/tones below 3.4 kHz are unaffected.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"rates must be positive, got {from_rate} -> {to_rate}")
    samples = _as_samples(samples)
    if from_rate == to_rate or not samples:
        return array.array("h", samples)
    n_out = int(len(samples) * to_rate / from_rate)
    ratio = from_rate / to_rate
    last = len(samples) - 1
    out = array.array("h", bytes(2 * n_out))
    for i in range(n_out):
        pos = i * ratio
        j = int(pos)
        frac = pos - j
        a = samples[j]
        b = samples[j + 1] if j < last else a
        out[i] = _clip(a + (b - a) * frac)
    return out
