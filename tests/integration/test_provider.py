"""Where the sandbox's Asterisk really runs: the provider the run asked for, never another.

With CONSENT_GATE_SANDBOX_PROVIDER=docker (CI's docker job) the Asterisk that serves every test
of the session must be a container of the stack's image (consent-gate/asterisk:<tag>); with
the chroot provider a process rooted in the cached sid root.  Nothing here skips: a docker job
that silently ran on the chroot provider fails this test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from consent_gate_rig import dockerimages
from consent_gate_rig.sandbox import AsteriskSandbox

pytestmark = pytest.mark.integration


def test_asterisk_runs_where_the_provider_says(asterisk: AsteriskSandbox) -> None:
    wanted = os.environ.get("CONSENT_GATE_SANDBOX_PROVIDER", "auto")
    if wanted != "auto":
        assert asterisk.provider.name == wanted, f"asked for {wanted}, ran on {asterisk.provider.name}"
    assert "Asterisk 22" in asterisk.cli("core show version")
    if asterisk.provider.name == "docker":
        container = asterisk.state.container
        assert container, "the docker provider recorded no container"
        inspect = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Running}} {{.Config.Image}} {{.HostConfig.NetworkMode}}", container],
            capture_output=True, text=True, timeout=30, check=True).stdout.split()
        assert inspect == ["true", dockerimages.asterisk_image(), "host"], inspect
        # The Asterisk answering the CLI is the container's own process.
        top = subprocess.run(["docker", "top", container], capture_output=True, text=True, timeout=30, check=True)
        assert "asterisk" in top.stdout
    else:
        assert asterisk.provider.name == "chroot"
        assert asterisk.state.pid is not None
        root = Path(f"/proc/{asterisk.state.pid}/root").resolve()
        assert root == asterisk.settings.root_dir.resolve()
