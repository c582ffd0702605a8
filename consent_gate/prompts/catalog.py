"""The runtime prompt catalog: which WAV file plays for (language, name), and its version.

Stdlib and structlog only; never imports a TTS engine.  The files ship inside this
package (``consent_gate/prompts``)::

    texts/<lang>/<name>.txt     templates with {placeholders}    (build input)
    params.toml                 values filled into the templates (build input)
    sounds/<lang>/<name>.wav    8 kHz mono 16-bit PCM (Asterisk ``wav``)
    manifest.json               text, hashes, duration, engine per prompt

``consent_gate.prompts.build`` (``consent-gate prompts build|check``) makes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

__all__ = ["FALLBACK_LANG", "PromptCatalog", "PromptError", "Resolved", "normalize_lang", "packaged_prompts_dir",
           "packaged_sounds_dir"]

log = structlog.get_logger(__name__)

FALLBACK_LANG = "en"
MANIFEST_NAME = "manifest.json"
SOUNDS_DIRNAME = "sounds"
MANIFEST_FORMAT = 1


def packaged_prompts_dir() -> Path:
    """This package's directory: texts, params, sounds and manifest as installed with the wheel."""
    return Path(str(resources.files(__package__ or "consent_gate.prompts")))


def packaged_sounds_dir() -> Path:
    """The sounds shipped with the product (the default of ``[prompts] dir``)."""
    return packaged_prompts_dir() / SOUNDS_DIRNAME


class PromptError(LookupError):
    """A prompt is missing or the prompt sources/manifest are unusable."""

    def __init__(self, message: str, *, lang: str | None = None, name: str | None = None):
        super().__init__(message)
        self.lang = lang
        self.name = name




def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def normalize_lang(lang: str | None) -> str:
    """'da-DK', 'da_dk', 'DA' -> 'da'.  Empty/None -> ''."""
    if not lang:
        return ""
    return re.split(r"[-_.@]", lang.strip().lower(), maxsplit=1)[0]


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"prompt manifest not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("prompts"), dict):
        raise PromptError(f"prompt manifest {path} has an unknown format (expected format {MANIFEST_FORMAT})")
    return data




@dataclass(frozen=True)
class Resolved:
    """Which file plays for a requested (lang, name)."""

    name: str
    requested_lang: str
    lang: str  # the language actually chosen
    path: Path
    version: str  # sha256 of the file as it is on disk

    @property
    def fallback(self) -> bool:
        return self.lang != self.requested_lang


class PromptCatalog:
    """The prompt files an installation plays, and their versions.

    ``load(sounds_dir)`` takes the directory holding ``<lang>/<name>.wav``; the
    manifest is ``sounds_dir/manifest.json`` or, as in the repository layout,
    ``sounds_dir/../manifest.json``.  Files present on disk count even when the
    manifest does not list them (a studio recording added later); a manifest
    entry whose file is missing is not available.  Versions are the sha256 of
    the files as they are on disk, computed once and cached; ``reload()``
    rescans and rehashes.
    """

    def __init__(self, sounds_dir: Path, manifest_path: Path, fallback_lang: str = FALLBACK_LANG):
        self.sounds_dir = Path(sounds_dir)
        self.manifest_path = Path(manifest_path)
        self.fallback_lang = fallback_lang
        self._lock = threading.Lock()
        self._manifest: dict[str, Any] = {}
        self._files: dict[tuple[str, str], Path] = {}
        self._versions: dict[Path, str] = {}
        self.reload()

    @classmethod
    def load(cls, sounds_dir: Path | str, manifest_path: Path | str | None = None) -> PromptCatalog:
        sounds_dir = Path(sounds_dir)
        if not sounds_dir.is_dir():
            raise PromptError(f"prompt sounds directory not found: {sounds_dir}")
        if manifest_path is None:
            if (sounds_dir / SOUNDS_DIRNAME).is_dir() and (sounds_dir / MANIFEST_NAME).is_file():
                sounds_dir = sounds_dir / SOUNDS_DIRNAME  # given the prompts/ root
            candidates = [sounds_dir / MANIFEST_NAME, sounds_dir.parent / MANIFEST_NAME]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise PromptError(
                    f"prompt manifest not found: looked for {candidates[0]} and {candidates[1]}; "
                    f"copy prompts/{MANIFEST_NAME} beside the sounds or pass manifest_path"
                )
            manifest_path = found[0]
        return cls(sounds_dir, Path(manifest_path))

    def reload(self) -> None:
        """Re-read the manifest, rescan the files and forget cached hashes."""
        manifest = read_manifest(self.manifest_path)
        files: dict[tuple[str, str], Path] = {}
        for lang_dir in sorted(p for p in self.sounds_dir.iterdir() if p.is_dir()):
            for wav in sorted(lang_dir.glob("*.wav")):
                files[(lang_dir.name, wav.stem)] = wav
        for lang, entries in manifest["prompts"].items():
            for name in entries:
                if (lang, name) not in files:
                    log.warning("prompt_file_missing", lang=lang, name=name,
                                path=str(self.sounds_dir / lang / f"{name}.wav"))
        with self._lock:
            self._manifest = manifest
            self._files = files
            self._versions = {}
        log.debug("prompt_catalog_loaded", sounds_dir=str(self.sounds_dir), files=len(files))

    # -- what is there

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages with at least one prompt file on disk, sorted."""
        return tuple(sorted({lang for lang, _ in self._files}))

    def names(self, lang: str | None = None) -> frozenset[str]:
        """Prompt names available in ``lang`` (all languages if None)."""
        lang = normalize_lang(lang) if lang else None
        return frozenset(n for l, n in self._files if lang is None or l == lang)

    def inventory(self) -> list[tuple[str, str, str]]:
        """Every prompt file on disk as (language, name, audio sha256), sorted."""
        with self._lock:
            files = sorted(self._files.items())
        return [(lang, name, self._version_of(path)) for (lang, name), path in files]

    def has(self, lang: str, name: str) -> bool:
        return (normalize_lang(lang), name) in self._files

    @property
    def params(self) -> dict[str, Any]:
        """Company, keys and retention the audio was built with (from the manifest)."""
        return json.loads(json.dumps(self._manifest.get("params", {})))

    def text(self, lang: str, name: str) -> str | None:
        """The text the manifest says the file speaks (None for unlisted files)."""
        r = self.resolve(lang, name)
        entry = self._manifest["prompts"].get(r.lang, {}).get(name)
        return entry.get("text") if entry else None

    # -- lookup

    def resolve(self, lang: str | None, name: str) -> Resolved:
        """The file to play for ``name`` in ``lang``; falls back to English."""
        want = normalize_lang(lang)
        for candidate in (want, self.fallback_lang):
            path = self._files.get((candidate, name))
            if path is not None:
                if candidate != want:
                    log.info("prompt_language_fallback", name=name, requested=lang, chosen=candidate)
                return Resolved(name, want, candidate, path, self._version_of(path))
        known = "" if name in self.names() else f" (no language has a prompt named {name!r})"
        raise PromptError(
            f"prompt {name!r} is missing for language {want or lang!r} and for the fallback "
            f"{self.fallback_lang!r} in {self.sounds_dir}{known}",
            lang=want or lang, name=name,
        )

    def path(self, lang: str | None, name: str) -> Path:
        """Path of the WAV to play (``resolve(...).lang`` says which language)."""
        return self.resolve(lang, name).path

    def version(self, lang: str | None, name: str) -> str:
        """sha256 of the audio file that ``path(lang, name)`` plays, as on disk."""
        return self.resolve(lang, name).version

    def _version_of(self, path: Path) -> str:
        with self._lock:
            cached = self._versions.get(path)
        if cached is None:
            cached = sha256_file(path)
            with self._lock:
                self._versions[path] = cached
        return cached
