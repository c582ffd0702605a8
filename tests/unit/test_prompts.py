"""Prompt texts, the shipped audio/manifest, the drift check and the runtime catalog."""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import math
import shutil
import string
import subprocess
import sys
import tomllib
import wave
from pathlib import Path

import pytest

from consent_gate.prompts import build as P
from consent_gate.prompts.build import build, check, register_cli, render_texts
from consent_gate.prompts.catalog import PromptCatalog, PromptError, packaged_prompts_dir

REPO = Path(__file__).resolve().parents[2]
PROMPTS = packaged_prompts_dir()
TEXTS = PROMPTS / "texts"
PARAMS = PROMPTS / "params.toml"
SOUNDS = PROMPTS / "sounds"

EXPECTED_NAMES = {
    "question-training",
    "question-documentation",
    "notice-legal-obligation",
    "granted",
    "declined",
    "invalid",
    "withdrawn",
    "agent-recording-stopped",
    "caller-records-ack",
    "agent-caller-records",
    "agent-recorded-training",
    "agent-recorded-documentation",
    "agent-not-recorded",
    "paused",
    "resumed",
}
LANGS = ("da", "en")
SHIPPED_WAVS = sorted(SOUNDS.glob("*/*.wav"))

@pytest.fixture
def prompt_tools() -> None:
    """Building prompts needs espeak-ng and sox: a missing tool fails the test, never skips it."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} needed to build prompts (Debian: apt-get install espeak-ng sox)")


needs_tools = pytest.mark.usefixtures("prompt_tools")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rms_dbfs(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        samples = array.array("h", w.readframes(w.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    rms = math.sqrt(sum(s * s for s in samples) / max(len(samples), 1))
    return 20 * math.log10(rms / 32768) if rms else -math.inf


@pytest.fixture
def prompts_copy(tmp_path: Path) -> Path:
    """A writable copy of prompts/ (texts, params, sounds, manifest)."""
    dst = tmp_path / "prompts"
    shutil.copytree(PROMPTS, dst)
    return dst


# ---------------------------------------------------------------- texts


def test_da_and_en_have_the_same_expected_names() -> None:
    for lang in LANGS:
        assert {p.stem for p in (TEXTS / lang).glob("*.txt")} == EXPECTED_NAMES, lang
        assert {p.stem for p in (SOUNDS / lang).glob("*.wav")} == EXPECTED_NAMES, lang
    manifest = json.loads((PROMPTS / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["prompts"]) == set(LANGS)
    for lang in LANGS:
        assert set(manifest["prompts"][lang]) == EXPECTED_NAMES


def test_templates_render_without_leftover_placeholders() -> None:
    rendered = render_texts(TEXTS, PARAMS, LANGS)
    for lang in LANGS:
        for name, text in rendered[lang].items():
            assert "{" not in text and "}" not in text, (lang, name, text)
            assert text == " ".join(text.split()), "rendered text is one normalised line"


def test_every_template_placeholder_is_known() -> None:
    params = tomllib.loads(PARAMS.read_text(encoding="utf-8"))
    known = {"company"} | {f"key_{k}" for k in params["keys"]} | {f"retention_{p}" for p in params["retention"]}
    for path in TEXTS.glob("*/*.txt"):
        fields = {f for _, f, _, _ in string.Formatter().parse(path.read_text(encoding="utf-8")) if f is not None}
        assert fields <= known, (path, fields - known)


def test_questions_carry_the_information_consent_needs() -> None:
    """Who, purpose, retention, keys, withdraw code, reciprocal key: all in the rendered question."""
    rendered = render_texts(TEXTS, PARAMS, LANGS)
    spoken = {
        "da": {"withdraw": "stjerne 0", "training": "90 dage", "documentation": "3 år", "legal": "5 år"},
        "en": {"withdraw": "star 0", "training": "90 days", "documentation": "3 years", "legal": "5 years"},
    }
    for lang in LANGS:
        for purpose in ("training", "documentation"):
            text = rendered[lang][f"question-{purpose}"]
            assert "Nordlys Energi" in text
            assert spoken[lang][purpose] in text
            assert spoken[lang]["withdraw"] in text
            for key in ("1", "2", "3"):
                assert f" {key} " in f" {text.replace(',', ' ').replace('.', ' ')} ", (lang, purpose, key)
        legal = rendered[lang]["notice-legal-obligation"]
        assert spoken[lang]["legal"] in legal and "Nordlys Energi" in legal
        assert spoken[lang]["withdraw"] in rendered[lang]["granted"]


def test_unknown_placeholder_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "da").mkdir()
    (tmp_path / "da" / "x.txt").write_text("Tryk {key_alow}.", encoding="utf-8")
    with pytest.raises(PromptError, match=r"key_alow"):
        render_texts(tmp_path, PARAMS, ("da",))


def test_duplicate_keys_in_params_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "params.toml"
    bad.write_text(PARAMS.read_text(encoding="utf-8").replace('decline = "2"', 'decline = "1"'), encoding="utf-8")
    with pytest.raises(PromptError, match=r"both '1'"):
        render_texts(TEXTS, bad, ("da",))


def test_retention_of_one_uses_the_singular(tmp_path: Path) -> None:
    params = tmp_path / "params.toml"
    params.write_text(
        PARAMS.read_text(encoding="utf-8").replace("amount = 90\nunit = \"days\"", "amount = 1\nunit = \"years\""),
        encoding="utf-8",
    )
    rendered = render_texts(TEXTS, params, LANGS)
    assert "ét år" in rendered["da"]["question-training"]
    assert "one year" in rendered["en"]["question-training"]


# ---------------------------------------------------------------- shipped audio


@pytest.mark.parametrize("wav_path", SHIPPED_WAVS, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED_WAVS])
def test_shipped_wav_is_asterisk_format_and_not_silent(wav_path: Path) -> None:
    with wave.open(str(wav_path), "rb") as w:
        assert w.getframerate() == 8000
        assert w.getnchannels() == 1
        assert w.getsampwidth() == 2
        assert w.getcomptype() == "NONE"
        duration = w.getnframes() / w.getframerate()
    assert 0.8 < duration < 60
    raw = wav_path.read_bytes()
    # Plain PCM (format tag 1) in a 16-byte fmt chunk: what Asterisk's format_wav reads.
    assert raw[12:16] == b"fmt " and int.from_bytes(raw[16:20], "little") == 16
    assert int.from_bytes(raw[20:22], "little") == 1
    assert rms_dbfs(wav_path) > -35, "prompt is (nearly) silent"


def test_shipped_wavs_exist() -> None:
    assert len(SHIPPED_WAVS) == len(EXPECTED_NAMES) * len(LANGS)


def test_english_audio_is_piper_and_danish_is_espeak() -> None:
    manifest = json.loads((PROMPTS / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["prompts"]["en"].values():
        assert entry["engine"].startswith("piper-tts"), entry["engine"]
        assert "fallback" not in entry["engine"]
    for entry in manifest["prompts"]["da"].values():
        assert entry["engine"].startswith("espeak-ng") and entry["voice"] == "da"


# ---------------------------------------------------------------- check


def test_check_is_clean_on_the_committed_tree() -> None:
    problems = check(TEXTS, PARAMS, PROMPTS, LANGS)
    assert problems == [], "\n".join(map(str, problems))


def test_check_detects_a_changed_text(prompts_copy: Path) -> None:
    txt = prompts_copy / "texts" / "da" / "declined.txt"
    txt.write_text("Tak. Vi optager ikke samtalen.\n", encoding="utf-8")
    problems = check(prompts_copy / "texts", prompts_copy / "params.toml", prompts_copy, LANGS)
    assert [(p.kind, p.lang, p.name) for p in problems] == [("text-changed", "da", "declined")]
    assert "da/declined" in str(problems[0])


def test_check_detects_changed_params(prompts_copy: Path) -> None:
    params = prompts_copy / "params.toml"
    params.write_text(params.read_text(encoding="utf-8").replace('withdraw = "*0"', 'withdraw = "*9"'), "utf-8")
    problems = check(prompts_copy / "texts", params, prompts_copy, LANGS)
    changed = {(p.lang, p.name) for p in problems if p.kind == "text-changed"}
    assert ("da", "question-training") in changed and ("en", "granted") in changed
    assert ("da", "declined") not in changed


def test_check_detects_missing_and_changed_audio(prompts_copy: Path) -> None:
    (prompts_copy / "sounds" / "en" / "invalid.wav").unlink()
    resumed = prompts_copy / "sounds" / "da" / "resumed.wav"
    resumed.write_bytes(resumed.read_bytes()[:-2] + b"\x01\x00")
    (prompts_copy / "texts" / "en" / "extra.txt").write_text("Extra.", encoding="utf-8")
    kinds = {(p.kind, p.lang, p.name) for p in check(prompts_copy / "texts", prompts_copy / "params.toml",
                                                      prompts_copy, LANGS)}
    assert ("audio-missing", "en", "invalid") in kinds
    assert ("audio-changed", "da", "resumed") in kinds
    assert ("not-built", "en", "extra") in kinds
    assert any(k[0] == "names-differ" for k in kinds)


def test_check_without_manifest(prompts_copy: Path) -> None:
    (prompts_copy / "manifest.json").unlink()
    problems = check(prompts_copy / "texts", prompts_copy / "params.toml", prompts_copy, LANGS)
    assert [p.kind for p in problems] == ["manifest-missing"]


# ---------------------------------------------------------------- catalog


def test_catalog_loads_the_shipped_manifest() -> None:
    cat = PromptCatalog.load(SOUNDS)
    assert cat.languages == ("da", "en")
    assert cat.names("da") == cat.names("en") == EXPECTED_NAMES
    params = tomllib.loads(PARAMS.read_text(encoding="utf-8"))
    assert cat.params["keys"] == params["keys"]
    assert cat.text("da", "declined") == "Tak. Samtalen bliver ikke optaget."
    # The prompts/ root works too.
    assert PromptCatalog.load(PROMPTS).path("en", "granted") == SOUNDS / "en" / "granted.wav"


def test_catalog_versions_are_sha256_of_the_files() -> None:
    cat = PromptCatalog.load(SOUNDS)
    manifest = json.loads((PROMPTS / "manifest.json").read_text(encoding="utf-8"))
    for lang in LANGS:
        for name in EXPECTED_NAMES:
            path = cat.path(lang, name)
            assert path == SOUNDS / lang / f"{name}.wav"
            assert cat.version(lang, name) == sha256(path) == manifest["prompts"][lang][name]["audio_sha256"]


def test_catalog_version_follows_the_file_on_disk_after_reload(prompts_copy: Path) -> None:
    cat = PromptCatalog.load(prompts_copy / "sounds")
    before = cat.version("da", "granted")
    studio = prompts_copy / "sounds" / "da" / "granted.wav"
    shutil.copyfile(prompts_copy / "sounds" / "da" / "declined.wav", studio)  # a "studio recording"
    assert cat.version("da", "granted") == before  # cached while running
    cat.reload()
    assert cat.version("da", "granted") == sha256(studio) != before


def test_catalog_falls_back_to_english(prompts_copy: Path) -> None:
    (prompts_copy / "sounds" / "da" / "invalid.wav").unlink()
    cat = PromptCatalog.load(prompts_copy / "sounds")
    r = cat.resolve("da", "invalid")
    assert (r.lang, r.requested_lang, r.fallback) == ("en", "da", True)
    assert cat.path("da", "invalid") == prompts_copy / "sounds" / "en" / "invalid.wav"
    assert cat.version("da", "invalid") == cat.version("en", "invalid")
    # A language with no prompts at all.
    assert cat.resolve("de", "granted").lang == "en"
    # Region tags are accepted and not a fallback.
    r = cat.resolve("da-DK", "granted")
    assert (r.lang, r.fallback) == ("da", False)


def test_catalog_error_names_the_missing_prompt(prompts_copy: Path) -> None:
    for lang in LANGS:
        (prompts_copy / "sounds" / lang / "paused.wav").unlink()
    cat = PromptCatalog.load(prompts_copy / "sounds")
    with pytest.raises(PromptError) as exc:
        cat.path("da", "paused")
    msg = str(exc.value)
    assert "'paused'" in msg and "'da'" in msg and "'en'" in msg
    assert (exc.value.lang, exc.value.name) == ("da", "paused")
    with pytest.raises(PromptError, match=r"'no-such-prompt'.*'de'"):
        cat.version("de", "no-such-prompt")


def test_catalog_needs_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "sounds" / "da").mkdir(parents=True)
    with pytest.raises(PromptError, match=r"manifest not found"):
        PromptCatalog.load(tmp_path / "sounds")


def test_runtime_module_does_not_import_piper() -> None:
    code = (
        "import sys; sys.modules['piper'] = None; sys.modules['onnxruntime'] = None;"
        "from consent_gate.prompts.catalog import PromptCatalog;"
        f"c = PromptCatalog.load({str(SOUNDS)!r}); print(c.version('da', 'granted'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == sha256(SOUNDS / "da" / "granted.wav")


# ---------------------------------------------------------------- CLI


def test_register_cli_adds_prompts_build_and_check() -> None:
    parser = argparse.ArgumentParser(prog="consent-gate")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prompts", "check", "--texts", str(TEXTS), "--params", str(PARAMS),
                              "--out", str(PROMPTS)])
    assert args.func(args) == 0
    args = parser.parse_args(["prompts", "build", "--lang", "da", "--force"])
    assert args.langs == ["da"] and args.force and callable(args.func)


def test_python_m_check_fails_on_drift(prompts_copy: Path) -> None:
    cmd = [sys.executable, "-m", "consent_gate.prompts.build", "check", "--texts", str(prompts_copy / "texts"),
           "--params", str(prompts_copy / "params.toml"), "--out", str(prompts_copy)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    (prompts_copy / "texts" / "en" / "resumed.txt").write_text("Recording continues.", encoding="utf-8")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1
    assert "text-changed: en/resumed" in res.stdout


# ---------------------------------------------------------------- build (real tools)


@needs_tools
def test_build_one_danish_prompt_with_espeak(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    (texts / "da").mkdir(parents=True)
    shutil.copyfile(TEXTS / "da" / "invalid.txt", texts / "da" / "invalid.txt")
    out = tmp_path / "out"

    manifest = build(texts, PARAMS, out, ("da",))

    wav_path = out / "sounds" / "da" / "invalid.wav"
    entry = manifest["prompts"]["da"]["invalid"]
    assert entry["text"] == "Den tast er ikke gyldig."
    assert entry["text_sha256"] == hashlib.sha256(entry["text"].encode()).hexdigest()
    assert entry["audio_sha256"] == sha256(wav_path)
    assert entry["engine"].startswith("espeak-ng") and entry["voice"] == "da"
    with wave.open(str(wav_path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert entry["duration_s"] == round(w.getnframes() / 8000, 3)
    assert 0.5 < entry["duration_s"] < 5
    assert rms_dbfs(wav_path) > -35
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert check(texts, PARAMS, out, ("da",)) == []

    # Danish (espeak-ng + sox -R -D) is reproducible byte for byte.
    first = sha256(wav_path)
    assert build(texts, PARAMS, out, ("da",), force=True)["prompts"]["da"]["invalid"]["audio_sha256"] == first

    # Changing the text makes check complain until the next build.
    (texts / "da" / "invalid.txt").write_text("Ugyldig tast.", encoding="utf-8")
    assert [p.kind for p in check(texts, PARAMS, out, ("da",))] == ["text-changed"]
    build(texts, PARAMS, out, ("da",))
    assert check(texts, PARAMS, out, ("da",)) == []
    assert sha256(wav_path) != first

    # A deleted template loses its manifest entry and its audio.
    (texts / "da" / "resumed.txt").write_text("Optagelsen fortsætter nu.", encoding="utf-8")
    build(texts, PARAMS, out, ("da",))
    assert (out / "sounds" / "da" / "resumed.wav").is_file()
    (texts / "da" / "resumed.txt").unlink()
    assert "resumed" not in build(texts, PARAMS, out, ("da",))["prompts"]["da"]
    assert not (out / "sounds" / "da" / "resumed.wav").exists()
    assert check(texts, PARAMS, out, ("da",)) == []


@needs_tools
def test_build_falls_back_to_espeak_when_piper_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_piper() -> None:
        raise ImportError("No module named 'piper'")

    monkeypatch.setattr(P, "_Piper", no_piper)
    monkeypatch.setattr(P, "_piper_importable", lambda: False)
    texts = tmp_path / "texts"
    (texts / "en").mkdir(parents=True)
    shutil.copyfile(TEXTS / "en" / "resumed.txt", texts / "en" / "resumed.txt")

    entry = build(texts, PARAMS, tmp_path / "out", ("en",))["prompts"]["en"]["resumed"]

    assert entry["engine"].startswith("espeak-ng") and "fallback" in entry["engine"]
    assert entry["voice"] == "en-us"
    assert check(texts, PARAMS, tmp_path / "out", ("en",)) == []
