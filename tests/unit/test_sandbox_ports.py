"""The sandbox refuses ports another process holds, naming the port and how to change it
(instead of starting an Asterisk that cannot bind while our requests reach the other one)."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from consent_gate_rig.sandbox import AsteriskSandbox, SandboxError, SandboxSettings


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sandbox(**ports: int) -> AsteriskSandbox:
    settings = dataclasses.replace(SandboxSettings(), name="port-check", sip_port=_free_tcp_port(),
                                   http_port=_free_tcp_port(), ami_port=_free_tcp_port())
    return AsteriskSandbox(dataclasses.replace(settings, **ports))


def test_free_ports_pass() -> None:
    _sandbox().check_ports_free()


@pytest.mark.parametrize("which", ["http_port", "ami_port", "sip_port"])
def test_a_held_port_is_refused_with_its_name_and_variable(which: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        sandbox = _sandbox(**{which: port})
        with pytest.raises(SandboxError) as info:
            sandbox.check_ports_free()
    message = str(info.value)
    assert f"127.0.0.1:{port}/tcp is in use" in message
    assert f"CONSENT_GATE_SANDBOX_{which.removesuffix('_port').upper()}_PORT" in message
