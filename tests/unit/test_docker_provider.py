"""The docker side of the rig fails with the cause, never silently: no client, no engine, an
image that does not build -- and an explicit docker provider never becomes the chroot one.

Real processes, not mocks: the ``docker`` / ``docker-compose`` found on PATH here are small
executables that behave as the real ones do in those situations (exit status and message).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from consent_gate_rig import dockerimages
from consent_gate_rig.sandbox import DockerProvider, SandboxError, SandboxSettings, pick_provider


def _tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with only our stand-ins (and the basics /bin/sh needs)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    return directory


def _no_docker_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_no_client_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_docker_on_path(monkeypatch, tmp_path)
    problem = dockerimages.engine_problem()
    assert problem is not None and "docker client is not installed" in problem


def test_no_engine_is_named_with_the_daemon_message(bin_dir: Path) -> None:
    _tool(bin_dir, "docker", 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1\n')
    problem = dockerimages.engine_problem()
    assert problem is not None
    assert "no Docker engine answers `docker info`" in problem and "Cannot connect to the Docker daemon" in problem
    assert "dockerd --iptables=false --bridge=none" in problem


def test_an_explicit_docker_provider_stays_docker_and_fails_without_an_engine(bin_dir: Path) -> None:
    _tool(bin_dir, "docker", 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n')
    provider = pick_provider(SandboxSettings(provider="docker"))
    assert isinstance(provider, DockerProvider)
    with pytest.raises(SandboxError) as info:
        provider.prepare()
    assert "the docker provider: no Docker engine" in str(info.value)


def test_a_failed_image_build_names_the_image_the_base_and_the_way_out(
    bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tool(bin_dir, "docker", 'case "$1" in info) echo 20.10.24;; *) exit 1;; esac\n')
    _tool(bin_dir, "docker-compose", 'echo "Step 2/21 : FROM debian:sid-slim"; '
          'echo "pull access denied for debian, repository does not exist" >&2; exit 1\n')
    project = tmp_path / "project"
    wheels = project / "deploy" / "docker" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "pyst2-0.5.1-py3-none-any.whl").write_bytes(b"")  # already fetched: no pip here
    monkeypatch.delenv("CONSENT_GATE_BASE_IMAGE", raising=False)
    with pytest.raises(SandboxError) as info:
        dockerimages.build_asterisk_image(project, project / "docker-compose.asterisk.yml", dict(os.environ))
    message = str(info.value)
    assert f"building the image {dockerimages.asterisk_image()} on the base debian:sid-slim failed" in message
    assert "pull access denied" in message
    assert "consent-gate-sandbox base-image" in message and dockerimages.IMPORTED_BASE_IMAGE in message


def test_importing_a_root_that_is_not_ready_is_refused(bin_dir: Path, tmp_path: Path) -> None:
    _tool(bin_dir, "docker", 'case "$1" in info) echo 20.10.24;; *) exit 1;; esac\n')
    with pytest.raises(SandboxError) as info:
        dockerimages.import_base(tmp_path / "no-root")
    assert "is not a ready consent-gate root" in str(info.value)
