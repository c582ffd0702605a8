"""The Docker side of the rig: the engine check, the base image imported from the cached sid
root, and the Asterisk image the sandbox's docker provider runs (the stack's own image).

Hosts without a registry (CI) cannot pull ``debian:sid-slim``; they import the debootstrap root
the chroot provider caches (``tar -C ROOT -c . | docker import - consent-gate/base:sid-root``)
and build every image with ``BASE_IMAGE`` set to it.  Nothing here falls back to the chroot
provider: no engine, a failed import or a failed build is a :class:`SandboxError` naming it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from consent_gate_rig.sandbox_errors import SandboxError

DEFAULT_BASE_IMAGE = "debian:sid-slim"
IMPORTED_BASE_IMAGE = "consent-gate/base:sid-root"
DEFAULT_IMAGE_TAG = "0.1.0"
# pyst2 (the AGI library) for the images' wheel stage, fetched with the host's pip: the build
# containers may not reach the index the host reaches (proxies, private certificates).
PYST2 = "pyst2==0.5.1"


def image_tag() -> str:
    return os.environ.get("CONSENT_GATE_IMAGE_TAG") or DEFAULT_IMAGE_TAG


def asterisk_image() -> str:
    return f"consent-gate/asterisk:{image_tag()}"


def base_image() -> str:
    return os.environ.get("CONSENT_GATE_BASE_IMAGE") or DEFAULT_BASE_IMAGE


def engine_problem() -> str | None:
    """Why no Docker engine can be used, or None if ``docker info`` reaches one."""
    if shutil.which("docker") is None:
        return "the docker client is not installed (apt-get install docker.io)"
    try:
        probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                               capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s: the engine hangs"
    if probe.returncode != 0 or not probe.stdout.strip():
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        return ("no Docker engine answers `docker info` (" + (detail[-1] if detail else f"exit {probe.returncode}")
                + "); start one (dockerd --iptables=false --bridge=none) or use CONSENT_GATE_SANDBOX_PROVIDER=chroot")
    return None


def require_engine(what: str) -> None:
    problem = engine_problem()
    if problem is not None:
        raise SandboxError(f"{what}: {problem}")


def image_exists(reference: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", reference], capture_output=True, timeout=60)
    return done.returncode == 0


def compose_command() -> list[str]:
    found = shutil.which("docker-compose")
    if found:
        return [found]
    return ["docker", "compose"]


def prefetch_wheels(wheels_dir: Path) -> None:
    """Put the pyst2 wheel into deploy/docker/wheels/ (the build context) with this Python's pip."""
    if list(wheels_dir.glob("pyst2-0.5.1-*.whl")):
        return
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", str(wheels_dir), PYST2], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SandboxError(f"could not fetch {PYST2} for the image build into {wheels_dir}: "
                           + (done.stderr or done.stdout).strip()[-500:])


def import_base(root: Path, tag: str = IMPORTED_BASE_IMAGE) -> str:
    """``tar -C ROOT -c . | docker import - TAG``: the cached root, read under its lock (shared:
    other sandboxes may run from it meanwhile; nobody rebuilds it while we read), without what
    is mounted inside it (/proc, /dev of running chroot sandboxes) or their instance dirs."""
    require_engine("docker import of the sid root")
    marker = root / ".consent-gate-root.json"
    if not marker.is_file():
        raise SandboxError(f"{root} is not a ready consent-gate root (no {marker.name}); "
                           "build it first: CONSENT_GATE_SANDBOX_PROVIDER=chroot consent-gate-sandbox prepare")
    lock_path = root.with_name(root.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--one-file-system", "--numeric-owner", "-c",
             "--exclude=./srv/consent-gate/*", "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./tmp/*", "."],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["docker", "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
                stdin=tar.stdout, capture_output=True, text=True, timeout=900)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar_err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
            tar_rc = tar.wait(120)
    if tar_rc != 0:
        raise SandboxError(f"tar of {root} failed (exit {tar_rc}): {tar_err.strip()[-500:]}")
    if imported.returncode != 0:
        raise SandboxError(f"docker import of {root} as {tag} failed: {(imported.stderr or imported.stdout).strip()}")
    return tag


def build_asterisk_image(project_dir: Path, compose_file: Path, env: dict[str, str]) -> None:
    """Build the Asterisk image (the stack's, via the sandbox's compose file: same Dockerfile,
    same build argument, same tag).  A failed build is an error naming the base image."""
    require_engine("docker image build")
    prefetch_wheels(project_dir / "deploy" / "docker" / "wheels")
    base = env.get("CONSENT_GATE_BASE_IMAGE") or DEFAULT_BASE_IMAGE
    print(f"sandbox: building {asterisk_image()} on {base} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run([*compose_command(), "-f", str(compose_file), "build", "asterisk"],
                              capture_output=True, text=True, timeout=1800, env=env, cwd=project_dir)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"building {asterisk_image()} on {base} did not finish in 1800 s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        hint = ""
        if base == DEFAULT_BASE_IMAGE:
            hint = (f"\n(no registry? import the cached root: consent-gate-sandbox base-image, then "
                    f"CONSENT_GATE_BASE_IMAGE={IMPORTED_BASE_IMAGE})")
        raise SandboxError(f"building the image {asterisk_image()} on the base {base} failed "
                           f"(exit {done.returncode}):\n{tail}{hint}")
