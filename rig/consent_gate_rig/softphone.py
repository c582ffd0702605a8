"""Test-side softphone: real SIP user agents (callers and agents) on baresip.

The integration tests place *real* SIP calls through a real Asterisk; this
module is the phone they use. It is also a small command for admins who want
to check their own PBX (``consent-gate-softphone --help``).

Model::

    async with Softphone() as phone:                    # one per process
        agent = await phone.register("agent", "pw", "127.0.0.1:25060")
        alice = await phone.register("alice", "pw", "127.0.0.1:25060")
        call = await alice.call("sip:100@127.0.0.1:25060", caller_name="Alice")
        await call.wait_answered(10)
        await call.send_dtmf("1")
        leg = await agent.wait_incoming(30)
        await leg.answer()
        await call.play_wav(Path("speech.wav"))
        assert rms_dbfs(leg.heard_segment(0, 5)) > -40
        await call.hangup()
        assert await leg.wait_hangup(5) and leg.remote_hung_up

Everything is asyncio; every wait takes a timeout. Received audio is captured
continuously from the moment a call is answered (a background task reads the
call's PCM and fills gaps with silence, so sample ``n`` of :meth:`heard`
was heard ``n / heard_rate`` seconds after answer).

baresip facts this module works around (see also the report in the docs):

* One baresip ``Runtime`` per process, so one :class:`Softphone` per process;
  many lines (user agents) share its SIP socket.
* The DTMF transport (RFC 4733 or SIP INFO) and the From header (display name
  and user) belong to the baresip *account*, not to a call. A per-call
  ``caller_name`` / ``from_user`` / ``dtmf_method`` is therefore implemented
  with extra, non-registering user agents that share the line's credentials
  (created on demand and cached), and ``send_dtmf(method=...)`` can only
  confirm the method the call was placed with.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from consent_gate_rig import audio as _audio

if TYPE_CHECKING:  # pragma: no cover - typing only
    import baresip

logger = logging.getLogger("consent_gate_rig.softphone")

DtmfMethod = Literal["rfc4733", "info"]
Transport = Literal["udp", "tcp", "tls"]

#: Our DTMF method names -> baresip account ``dtmf_mode`` values.
_DTMF_MODES: dict[str, str] = {"rfc4733": "rtpevent", "info": "info"}
_DTMF_DIGITS = "0123456789ABCD*#"

#: Headers of incoming INVITEs made visible on :attr:`PhoneCall.headers`.
DEFAULT_EXPOSED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "P-Asserted-Identity",
    "Remote-Party-ID",
    "Diversion",
    "History-Info",
    "User-Agent",
)

# Characters a SIP URI user part may carry unescaped (RFC 3261 "user"),
# minus ";" and "?" which baresip's account parser refuses; everything else
# is percent-encoded by :func:`encode_sip_user`.
_USER_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,/"
)

_CAPTURE_POLL_S = 0.01
_CAPTURE_SLACK_S = 0.12  # gap tolerated before the timeline is silence-filled
_TX_LEAD_S = 0.06  # how far ahead of real time transmit audio is queued
_MEDIA_READY_TIMEOUT_S = 5.0
_ORPHAN_CALLS_MAX = 64


# -- errors ----------------------------------------------------------------------


class SoftphoneError(Exception):
    """Base class for softphone failures."""


class RegistrationFailed(SoftphoneError):
    """The registrar refused (``status`` = SIP code, e.g. 401/403) or never answered."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class CallNotAnswered(SoftphoneError):
    """An outbound call ended or timed out before it was answered.

    ``status`` is the final SIP status when the far end sent one (404, 486,
    603...), None for a timeout or transport failure; ``reason`` the text.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason


class NoIncomingCall(SoftphoneError, TimeoutError):
    """:meth:`Line.wait_incoming` saw no call within its timeout."""


class CallEnded(SoftphoneError):
    """The operation needs a live call, and this one has ended."""


def _baresip() -> Any:
    try:
        import baresip
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SoftphoneError(
            "the softphone needs baresip-python: pip install 'consent-gate[softphone]'"
        ) from exc
    return baresip


# -- small helpers -----------------------------------------------------------------


def encode_sip_user(user: str) -> str:
    """Percent-encode ``user`` for the user part of a SIP URI.

    The input is the *intended* (decoded) user: ``"$(id)"`` stays as is
    (``$ ( )`` are legal), ``"a b;c"`` becomes ``"a%20b%3Bc"``, non-ASCII is
    UTF-8 percent-encoded. A literal ``%`` is encoded as ``%25``.
    """
    if not user:
        raise ValueError("SIP user must not be empty")
    out = []
    for ch in user:
        if ch in _USER_SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def quote_display_name(name: str) -> str:
    """``name`` as a SIP quoted-string (RFC 3261), e.g. ``"O\\"Brien"``.

    Any Unicode text is allowed except control characters (CR/LF/NUL and
    friends, which would let a name inject SIP headers): ValueError.
    """
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise ValueError(f"caller name contains control character {ch!r}")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


_FROM_RE = re.compile(r"^\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^<]*?))\s*<([^>]*)>")


def parse_name_addr(value: str | None) -> tuple[str | None, str | None]:
    """Split a From/To/P-Asserted-Identity value into ``(display_name, uri)``.

    The display name is unquoted (``\\"`` -> ``"``); None when absent.
    """
    if not value:
        return None, None
    m = _FROM_RE.match(value)
    if not m:
        if value.lstrip().startswith('"') or "<" in value:
            return None, None  # cut short (baresip caps exposed values) or malformed
        uri = value.split(";", 1)[0].strip()
        return None, uri or None
    quoted, token, uri = m.groups()
    if quoted is not None:
        name: str | None = re.sub(r"\\(.)", r"\1", quoted)
    else:
        name = token.strip() or None
    return name, uri


def sip_uri_user(uri: str | None) -> str | None:
    """The user part of ``sip:user@host`` (still percent-encoded), or None."""
    if not uri:
        return None
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    if "@" not in rest:
        return None
    return rest.split("@", 1)[0]


def _split_hostport(value: str) -> tuple[str, int | None]:
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if port:
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r}: bad port {port!r}")
        return host, int(port)
    return host, None


_PORT_PICK_ATTEMPTS = 5


def _free_port(host: str) -> int:
    """A port free for baresip's SIP listeners on ``host``.

    baresip binds UDP and TCP on the port and TLS (TCP) on port + 1, so all
    three must be free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            if port >= 65535:
                continue
            if _tcp_free(family, host, port) and _tcp_free(family, host, port + 1):
                return port
    raise SoftphoneError(f"no free SIP port found on {host}")


def _tcp_free(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as tcp:
        try:
            tcp.bind((host, port))
        except OSError:
            return False
        return True


def _local_ip_toward(host: str) -> str:
    """The local address the kernel would use to reach ``host``."""
    try:
        addr = ipaddress.ip_address(host)
        if addr.is_loopback:
            return str(addr)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, 5060, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


# -- the phone ---------------------------------------------------------------------


class Softphone:
    """One baresip runtime (one per process) hosting any number of lines.

    Args:
        listen: Local SIP address ``host:port`` (UDP and TCP). Port 0 picks a
            free port; read the result from :attr:`address`. The host is
            also the address media (RTP) is sent from and must be reachable
            by the PBX: ``127.0.0.1`` for a local Asterisk.
        max_calls: Concurrent calls across all lines (baresip's default is
            2); None for unlimited.
        rtp_ports: Local RTP port range ``(first, last)``; None = baresip's.
        sip_trace: Log every SIP message under ``baresip.native.sip`` (DEBUG).
        expose_headers: Incoming-INVITE headers copied to
            :attr:`PhoneCall.headers` (at most 16; values capped at 512
            characters by baresip).
        rtp_timeout: Seconds without RTP before baresip drops a call (0=off).
        native_log_level: baresip's own log threshold ("debug".."error").
    """

    _current: Softphone | None = None

    def __init__(
        self,
        *,
        listen: str = "127.0.0.1:0",
        max_calls: int | None = 16,
        rtp_ports: tuple[int, int] | None = None,
        sip_trace: bool = False,
        expose_headers: Sequence[str] = DEFAULT_EXPOSED_HEADERS,
        rtp_timeout: int = 0,
        native_log_level: str = "warning",
    ):
        host, port = _split_hostport(listen)
        self._host = host
        self._port = port or 0
        self._max_calls = max_calls
        self._rtp_ports = rtp_ports
        self._sip_trace = sip_trace
        self._expose_headers = tuple(expose_headers)
        self._rtp_timeout = rtp_timeout
        self._native_log_level = native_log_level
        self._runtime: baresip.Runtime | None = None
        self._lines: list[Line] = []
        self._line_by_ua: dict[int, Line] = {}
        self._calls: dict[int, PhoneCall] = {}
        self._capture_tasks: set[asyncio.Task[None]] = set()
        self._orphans: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()

    # -- lifecycle

    @classmethod
    def current(cls) -> Softphone | None:
        """The Softphone open in this process, if any (there can be one)."""
        return cls._current

    @property
    def address(self) -> str:
        """``host:port`` the SIP stack listens on (UDP and TCP)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def runtime(self) -> baresip.Runtime:
        """The underlying ``baresip.Runtime`` (escape hatch)."""
        if self._runtime is None:
            raise SoftphoneError("softphone is not started (use 'async with Softphone()')")
        return self._runtime

    async def __aenter__(self) -> Softphone:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the SIP stack. Prefer ``async with Softphone(...)``."""
        bs = _baresip()
        if Softphone._current is not None:
            raise SoftphoneError(
                "a Softphone is already open in this process; baresip allows one "
                "runtime per process - reuse it (Softphone.current()) for more lines"
            )
        if self._port:
            runtime = await self._start_runtime(bs)
        else:
            # A probed port can be taken by another process before baresip
            # binds it; probe again rather than fail the caller.
            for attempt in range(1, _PORT_PICK_ATTEMPTS + 1):
                self._port = _free_port(self._host)
                try:
                    runtime = await self._start_runtime(bs)
                    break
                except bs.BaresipError as exc:
                    if "in use" not in str(exc) or attempt == _PORT_PICK_ATTEMPTS:
                        raise
                    logger.info("SIP port %s taken meanwhile, picking another", self._port)
        runtime.subscribe(self._on_stack_event)
        self._runtime = runtime
        Softphone._current = self
        logger.info("softphone listening on %s", self.address)

    async def _start_runtime(self, bs: Any) -> baresip.Runtime:
        extra = [f"sip_listen {self.address}"]
        if self._rtp_ports:
            lo, hi = self._rtp_ports
            if not 0 < lo <= hi <= 65535:
                raise ValueError(f"bad rtp_ports {self._rtp_ports!r}")
            extra.append(f"rtp_ports {lo}-{hi}")
        config = bs.Config(
            net_interface=self._host,
            max_concurrent_calls=self._max_calls,
            sip_trace=self._sip_trace,
            expose_headers=self._expose_headers,
            rtp_timeout=self._rtp_timeout,
            native_log_level=self._native_log_level,
            extra_config_text="\n".join(extra) + "\n",
        )
        runtime = bs.Runtime(native_log_level=self._native_log_level)
        await runtime.start(config)
        return runtime

    async def close(self) -> None:
        """Hang up live calls, unregister lines, stop the SIP stack."""
        runtime = self._runtime
        if runtime is None:
            return
        try:
            live = [c for c in self._calls.values() if not c.ended]
            for call in live:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(call.hangup(), 2)
            for call in live:
                await call.wait_hangup(2)
            for task in list(self._capture_tasks):
                task.cancel()
            for line in self._lines:
                if line.registered:
                    with contextlib.suppress(Exception):
                        await line.unregister(timeout=2)
        finally:
            with contextlib.suppress(ValueError):
                runtime.unsubscribe(self._on_stack_event)
            await runtime.close()
            self._runtime = None
            if Softphone._current is self:
                Softphone._current = None
            logger.info("softphone closed")

    # -- lines

    async def register(
        self,
        user: str,
        password: str,
        domain: str,
        *,
        transport: Transport = "udp",
        display_name: str | None = None,
        dtmf_method: DtmfMethod = "rfc4733",
        outbound_proxy: str | None = None,
        codecs: Sequence[str] = ("pcmu", "pcma"),
        timeout: float = 10.0,
    ) -> Line:
        """Create a line and REGISTER it with ``domain`` (``host:port``).

        Raises:
            RegistrationFailed: refused (``status`` 401/403...) or no answer.
            ValueError: an argument baresip cannot carry (named in the text).
        """
        line = await self.line(
            user,
            password,
            domain,
            transport=transport,
            display_name=display_name,
            dtmf_method=dtmf_method,
            outbound_proxy=outbound_proxy,
            codecs=codecs,
            _reg_interval=600,
        )
        await line._register(timeout)
        return line

    async def line(
        self,
        user: str,
        password: str = "",
        domain: str | None = None,
        *,
        transport: Transport = "udp",
        display_name: str | None = None,
        dtmf_method: DtmfMethod = "rfc4733",
        outbound_proxy: str | None = None,
        codecs: Sequence[str] = ("pcmu", "pcma"),
        _reg_interval: int = 0,
    ) -> Line:
        """Create a line *without* registration (outbound-only, or for direct
        peer-to-peer calls to :attr:`Line.uri`). ``domain`` defaults to this
        softphone's own address. INVITEs challenged with 401/407 are answered
        with ``user``/``password``."""
        runtime = self.runtime
        line = Line(
            self,
            user=user,
            password=password,
            domain=domain or self.address,
            transport=transport,
            display_name=display_name,
            dtmf_method=dtmf_method,
            outbound_proxy=outbound_proxy,
            codecs=tuple(codecs),
            reg_interval=_reg_interval,
        )
        await line._create_primary(runtime)
        self._lines.append(line)
        return line

    # -- event plumbing (runs on the asyncio loop)

    def _on_stack_event(self, event: Any) -> None:
        handle = event.call
        if not handle:
            return
        call = self._calls.get(handle)
        if call is not None:
            call._on_event(event)
            return
        # Events that arrive before the PhoneCall exists (between the dial
        # command's completion and our wrapper, or the INCOMING event
        # itself) are kept and replayed so nothing - not even an
        # immediate rejection - is missed.
        if event.event.name in ("CALL_RTCP", "VU_TX", "VU_RX"):
            return
        bucket = self._orphans.get(handle)
        if bucket is None:
            bucket = self._orphans[handle] = []
            while len(self._orphans) > _ORPHAN_CALLS_MAX:
                self._orphans.popitem(last=False)
        if len(bucket) < 200:
            bucket.append(event)

    def _adopt(self, call: PhoneCall) -> None:
        self._calls[call.handle] = call
        for event in self._orphans.pop(call.handle, []):
            call._on_event(event)

    def _forget(self, call: PhoneCall) -> None:
        self._calls.pop(call.handle, None)


class Line:
    """One SIP account on a :class:`Softphone`: places and receives calls."""

    def __init__(
        self,
        phone: Softphone,
        *,
        user: str,
        password: str,
        domain: str,
        transport: Transport,
        display_name: str | None,
        dtmf_method: DtmfMethod,
        outbound_proxy: str | None,
        codecs: tuple[str, ...],
        reg_interval: int,
    ):
        if dtmf_method not in _DTMF_MODES:
            raise ValueError(f"dtmf_method must be 'rfc4733' or 'info', got {dtmf_method!r}")
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be udp, tcp or tls, got {transport!r}")
        _split_hostport(domain)  # validates
        if display_name is not None:
            quote_display_name(display_name)  # validates
        self.phone = phone
        self.user = user
        self.domain = domain
        self.transport: Transport = transport
        self.display_name = display_name
        self.dtmf_method: DtmfMethod = dtmf_method
        self._password = password
        self._outbound_proxy = outbound_proxy
        self._codecs = codecs
        self._reg_interval = reg_interval
        self._primary: Any = None
        self._variants: dict[tuple[str, str | None, str], Any] = {}
        self._incoming: asyncio.Queue[PhoneCall] = asyncio.Queue()
        self.registered = False

    def __repr__(self) -> str:
        return f"<Line {self.user}@{self.domain} registered={self.registered}>"

    @property
    def uri(self) -> str:
        """This line's address, ``sip:user@domain`` (callable directly for an
        unregistered line whose domain is the softphone's own address)."""
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{encode_sip_user(self.user)}@{self.domain}{suffix}"

    def _account_aor(
        self, from_user: str, display_name: str | None, dtmf_mode: str, reg_interval: int
    ) -> str:
        bs = _baresip()
        auth_user = None if from_user == self.user else encode_sip_user(self.user)
        try:
            account = bs.Account(
                user=encode_sip_user(from_user),
                domain=self.domain,
                password=self._password,
                registrar=self._outbound_proxy,
                reg_interval=reg_interval,
                transport=self.transport,
                audio_codecs=self._codecs,
                dtmf_mode=dtmf_mode,
                auth_user=auth_user,
            )
        except ValueError as exc:
            raise ValueError(f"line {self.user}@{self.domain}: {exc}") from None
        aor = str(account.aor())
        if display_name:
            aor = f"{quote_display_name(display_name)} {aor}"
        return aor

    async def _new_ua(self, runtime: Any, aor: str, method: DtmfMethod) -> Any:
        bs = _baresip()
        try:
            ua = await bs.UserAgent.create(runtime, aor, transfer_policy="reject")
        except bs.BaresipError as exc:
            raise SoftphoneError(f"baresip refused line {self.user}@{self.domain}: {exc}") from exc
        self.phone._line_by_ua[ua.handle] = self

        def incoming(call: Any) -> None:
            self._on_incoming(call, method)

        ua.on_incoming(incoming)
        return ua

    async def _create_primary(self, runtime: Any) -> None:
        mode = _DTMF_MODES[self.dtmf_method]
        aor = self._account_aor(self.user, self.display_name, mode, self._reg_interval)
        self._primary = await self._new_ua(runtime, aor, self.dtmf_method)
        self._variants[(self.user, self.display_name or None, mode)] = self._primary

    async def _register(self, timeout: float) -> None:
        bs = _baresip()
        try:
            await self._primary.register(timeout=timeout)
        except bs.RegistrationError as exc:
            raise RegistrationFailed(
                f"registration of {self.user}@{self.domain} failed: {exc}",
                status=getattr(exc, "status", None),
            ) from exc
        self.registered = True
        logger.info("registered %s@%s", self.user, self.domain)

    async def unregister(self, timeout: float = 5.0) -> None:
        """Remove the registration (no-op for unregistered lines)."""
        if self.registered:
            await self._primary.unregister(timeout=timeout)
            self.registered = False

    async def _ua_for(
        self, from_user: str | None, caller_name: str | None, dtmf_method: DtmfMethod | None
    ) -> Any:
        user = from_user if from_user is not None else self.user
        name = caller_name if caller_name is not None else self.display_name
        method = dtmf_method or self.dtmf_method
        if method not in _DTMF_MODES:
            raise ValueError(f"dtmf_method must be 'rfc4733' or 'info', got {method!r}")
        mode = _DTMF_MODES[method]
        key = (user, name or None, mode)
        ua = self._variants.get(key)
        if ua is None:
            # A non-registering sibling with the same credentials: baresip
            # fixes From and DTMF mode per account. With a different From
            # user the digest username stays this line's user (auth_user).
            aor = self._account_aor(user, name or None, mode, 0)
            ua = await self._new_ua(self.phone.runtime, aor, method)
            self._variants[key] = ua
        return ua

    def _target(self, uri: str) -> str:
        uri = uri.strip()
        if not uri or any(c in uri for c in " \r\n\t"):
            raise ValueError(f"bad SIP URI {uri!r}")
        if not uri.startswith(("sip:", "sips:")):
            uri = f"sip:{uri}" if "@" in uri else f"sip:{uri}@{self.domain}"
        if self.transport != "udp" and "transport=" not in uri:
            uri += f";transport={self.transport}"
        return uri

    async def call(
        self,
        uri: str,
        *,
        headers: dict[str, str] | None = None,
        caller_name: str | None = None,
        from_user: str | None = None,
        dtmf_method: DtmfMethod | None = None,
    ) -> PhoneCall:
        """Place a call; returns at once (await :meth:`PhoneCall.wait_answered`).

        Args:
            uri: ``sip:100@host:port``, or just ``100`` (dialled at the
                line's domain).
            headers: Extra INVITE headers (e.g. ``P-Asserted-Identity``).
            caller_name: From display name for this call (any Unicode
                text without control characters; ``""`` = none).
            from_user: From URI user for this call (percent-encoded as
                needed); authentication still uses the line's user.
            dtmf_method: How :meth:`PhoneCall.send_dtmf` sends digits on
                this call; defaults to the line's.
        """
        bs = _baresip()
        target = self._target(uri)
        ua = await self._ua_for(from_user, caller_name, dtmf_method)
        try:
            call = await ua.dial(target, headers=dict(headers or {}))
        except ValueError as exc:
            raise ValueError(f"cannot dial {target!r}: {exc}") from None
        except bs.BaresipError as exc:
            raise SoftphoneError(f"cannot dial {target!r}: {exc}") from exc
        phone_call = PhoneCall(
            self, call, direction="outgoing", dtmf_method=dtmf_method or self.dtmf_method
        )
        logger.info("calling %s from %s", target, self.user)
        return phone_call

    def _on_incoming(self, call: Any, method: DtmfMethod) -> None:
        phone_call = PhoneCall(self, call, direction="incoming", dtmf_method=method)
        self._incoming.put_nowait(phone_call)

    async def wait_incoming(self, timeout: float, *, include_ended: bool = False) -> PhoneCall:
        """The next inbound call to this line (ringing; :meth:`PhoneCall.answer` it).

        Calls that rang and were already cancelled by the caller before this
        wait picked them up are skipped unless ``include_ended``.

        Raises:
            NoIncomingCall: none arrived within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                call = await asyncio.wait_for(
                    self._incoming.get(), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                raise NoIncomingCall(
                    f"no incoming call for {self.user} within {timeout:g} s"
                ) from None
            if include_ended or not call.ended:
                return call


class PhoneCall:
    """One call leg as seen by its softphone line (caller or agent side).

    Times (:attr:`answered_at`, :attr:`ended_at`) are ``time.monotonic()``
    values; audio and DTMF timestamps are seconds after answer.
    """

    def __init__(self, line: Line, call: Any, *, direction: str, dtmf_method: DtmfMethod):
        self.line = line
        self.direction = direction  # "outgoing" | "incoming"
        self.dtmf_method: DtmfMethod = dtmf_method
        self._call = call
        self.handle: int = call.handle
        self.remote_uri: str | None = call.peer
        self.call_id: str | None = call.call_id
        #: Exposed headers of the incoming INVITE (see Softphone.expose_headers).
        self.headers: dict[str, str] = dict(call.headers or {})
        self.created_at = time.monotonic()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.ringing = False
        #: True when baresip cut an exposed header value short (512 chars).
        self.headers_truncated = False
        self.close_reason: str | None = None
        self.status: int | None = None
        self._local_end = False
        self._established = asyncio.Event()
        self._closed = asyncio.Event()
        self._dtmf: list[tuple[float, str]] = []
        self._dtmf_cursor = 0
        self._dtmf_changed = asyncio.Event()
        self._tx_lock = asyncio.Lock()
        self._capture_task: asyncio.Task[None] | None = None
        self._heard = bytearray()
        self._rate = 8000
        self._rx_rate = 8000
        self._rate_known = False
        self._padded_samples = 0
        self._discarded_bytes = 0
        line.phone._adopt(self)

    def __repr__(self) -> str:
        return (
            f"<PhoneCall {self.direction} {self.line.user} <-> {self.remote_uri} "
            f"answered={self.answered} ended={self.ended}>"
        )

    # -- state

    @property
    def answered(self) -> bool:
        return self.answered_at is not None

    @property
    def ended(self) -> bool:
        return self._closed.is_set()

    @property
    def remote_hung_up(self) -> bool:
        """True when the far end ended the call (BYE, CANCEL or a rejection)."""
        return self.ended and not self._local_end

    @property
    def caller_id(self) -> tuple[str | None, str | None]:
        """``(display name, URI user)`` of the From header of an incoming
        call (percent-escapes left as received). The name is None when
        absent - or unknown because baresip cut the exposed header short
        (values are capped at 512 characters; see :attr:`headers_truncated`)."""
        name, uri = parse_name_addr(self.headers.get("From"))
        return name, sip_uri_user(uri or self.remote_uri)

    def elapsed(self) -> float:
        """Seconds since answer (0.0 before)."""
        if self.answered_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.answered_at

    def _on_event(self, event: Any) -> None:
        name = event.event.name
        if event.call_id and not self.call_id:
            self.call_id = event.call_id
        if name in ("CALL_RINGING", "CALL_PROGRESS"):
            self.ringing = True
        elif name == "CALL_INCOMING":
            self.headers_truncated = bool(event.truncated)
        elif name == "CALL_ESTABLISHED":
            if self.answered_at is None:
                self.answered_at = time.monotonic()
                self._established.set()
                task = asyncio.get_running_loop().create_task(
                    self._capture(), name=f"softphone-capture-{self.handle}"
                )
                tasks = self.line.phone._capture_tasks
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self._capture_task = task
        elif name == "CALL_CLOSED":
            if not self._closed.is_set():
                self.ended_at = time.monotonic()
                self.close_reason = event.text or ""
                status, _, _ = (event.text or "").partition(" ")
                if status.isdigit() and len(status) == 3:
                    self.status = int(status)
                self._closed.set()
                self._dtmf_changed.set()
                self.line.phone._forget(self)
                logger.info("call %s ended: %s", self.call_id, self.close_reason)
        elif name == "CALL_DTMF_START" and event.text:
            at = (time.monotonic() - self.answered_at) if self.answered_at else 0.0
            self._dtmf.append((at, event.text))
            self._dtmf_changed.set()

    # -- answering

    async def wait_answered(self, timeout: float, *, hangup_on_timeout: bool = True) -> None:
        """Wait until the call is answered (media set up).

        Raises:
            CallNotAnswered: rejected (``status`` 486/603/404...), failed, or
                not answered within ``timeout`` (then the attempt is
                cancelled unless ``hangup_on_timeout=False``).
        """
        if not self.answered and not self.ended:
            done, pending = await asyncio.wait(
                [
                    asyncio.ensure_future(self._established.wait()),
                    asyncio.ensure_future(self._closed.wait()),
                ],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for fut in pending:
                fut.cancel()
            if not done:
                if hangup_on_timeout:
                    await self.hangup()
                raise CallNotAnswered(
                    f"call to {self.remote_uri} not answered within {timeout:g} s",
                    reason="timeout",
                )
        if not self.answered:
            raise CallNotAnswered(
                f"call to {self.remote_uri} failed: {self.close_reason or 'no reason given'}",
                status=self.status,
                reason=self.close_reason or "",
            )

    async def answer(self, timeout: float = 10.0) -> None:
        """Answer an incoming call and wait until it is established."""
        bs = _baresip()
        if self.direction != "incoming":
            raise SoftphoneError("answer() is for incoming calls")
        if self.ended:
            raise CallEnded(f"call from {self.remote_uri} already ended: {self.close_reason}")
        try:
            await self._call.answer()
        except bs.BaresipError as exc:
            raise CallEnded(f"cannot answer call from {self.remote_uri}: {exc}") from exc
        try:
            await asyncio.wait_for(self._established.wait(), timeout)
        except TimeoutError:
            raise SoftphoneError(f"answered call not established within {timeout:g} s") from None

    async def reject(self) -> None:
        """Refuse an incoming call (486 Busy Here)."""
        bs = _baresip()
        self._local_end = True
        with contextlib.suppress(bs.StaleHandleError):
            await self._call.reject()

    # -- ending

    async def hangup(self) -> None:
        """Hang up (CANCEL/decline before answer, BYE after). Idempotent."""
        bs = _baresip()
        if self.ended:
            return
        self._local_end = True
        with contextlib.suppress(bs.StaleHandleError):
            await self._call.hangup()

    async def transfer(self, uri: str, timeout: float = 20.0) -> None:
        """Blind transfer (REFER): the far end is asked to call ``uri``; on success this call ends."""
        bs = _baresip()
        try:
            await self._call.transfer(self.line._target(uri), timeout=timeout)
        except bs.BaresipError as exc:
            raise SoftphoneError(f"transfer to {uri!r} failed: {exc}") from exc

    async def wait_hangup(self, timeout: float) -> bool:
        """Wait until the call ends; True if it did within ``timeout``."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- DTMF

    async def send_dtmf(
        self, digits: str, *, method: DtmfMethod | None = None, gap: float = 0.25
    ) -> None:
        """Send DTMF keys (each ~100 ms, ``gap`` seconds apart).

        ``method`` must match the call's :attr:`dtmf_method` (fixed when the
        call was placed - pass ``dtmf_method=`` to :meth:`Line.call`);
        None means "whatever the call uses".
        """
        bs = _baresip()
        keys = digits.upper()
        bad = [c for c in keys if c not in _DTMF_DIGITS]
        if not keys or bad:
            raise ValueError(f"DTMF keys must be from 0-9 A-D * #, got {digits!r}")
        if method is not None and method not in _DTMF_MODES:
            raise ValueError(f"method must be 'rfc4733' or 'info', got {method!r}")
        if method is not None and method != self.dtmf_method:
            raise SoftphoneError(
                f"this call sends DTMF as {self.dtmf_method!r}; baresip fixes the DTMF "
                f"method per account, so place the call with dtmf_method={method!r}"
            )
        if gap < 0:
            raise ValueError(f"gap must be >= 0, got {gap}")
        if not self.answered:
            raise SoftphoneError("send_dtmf() needs an answered call")
        if self.ended:
            raise CallEnded("cannot send DTMF: the call has ended")
        try:
            await self._call.send_dtmf(keys, interdigit_ms=int(gap * 1000))
        except bs.StaleHandleError as exc:
            raise CallEnded("cannot send DTMF: the call has ended") from exc
        logger.info("sent DTMF %s (%s)", keys, self.dtmf_method)

    def received_dtmf(self) -> str:
        """Every DTMF key received on this call so far, in order."""
        return "".join(d for _, d in self._dtmf)

    @property
    def dtmf_log(self) -> list[tuple[float, str]]:
        """Received keys as ``(seconds after answer, key)``."""
        return list(self._dtmf)

    async def wait_dtmf(self, timeout: float, count: int = 1) -> str:
        """Wait for ``count`` keys not yet returned by an earlier wait_dtmf().

        Raises:
            TimeoutError: fewer arrived within ``timeout`` (or the call ended).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._dtmf) - self._dtmf_cursor < count:
            if self.ended:
                raise TimeoutError(
                    f"call ended after {self.received_dtmf()!r}; wanted {count} more key(s)"
                )
            self._dtmf_changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {count} DTMF key(s) within {timeout:g} s "
                    f"(received so far: {self.received_dtmf()!r})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dtmf_changed.wait(), remaining)
        keys = "".join(d for _, d in self._dtmf[self._dtmf_cursor : self._dtmf_cursor + count])
        self._dtmf_cursor += count
        return keys

    # -- receive audio

    async def _capture(self) -> None:
        """Read received PCM continuously, keeping the timeline true: when
        nothing arrives for longer than the slack, silence is inserted."""
        bs = _baresip()
        audio = self._call.audio
        first_read = True
        assert self.answered_at is not None
        t0 = self.answered_at
        channels = 1
        while True:
            data = b""
            try:
                if not self._rate_known:
                    info = audio.info()
                    if info.rx_ready:
                        rx_rate = info.rx_sample_rate
                        if rx_rate != self._rate and self._padded_samples * 2 == len(self._heard):
                            # Only filler so far: re-express it at the real rate.
                            n = len(self._heard) // 2 * rx_rate // self._rate
                            self._heard = bytearray(2 * n)
                            self._padded_samples = n
                            self._rate = rx_rate
                        elif rx_rate != self._rate:
                            logger.warning(
                                "receive rate changed from %d to %d Hz mid-call; "
                                "resampling to keep one timeline",
                                self._rate,
                                rx_rate,
                            )
                        channels = max(1, info.rx_channels)
                        self._rx_rate = info.rx_sample_rate
                        self._rate_known = True
                if self._rate_known:
                    data = audio.read(65536)
                    if first_read:
                        # Audio buffered before answer (early media, nobody
                        # reading) is stale; the timeline starts now.
                        self._discarded_bytes += len(data)
                        data = b""
                        first_read = False
            except bs.AudioRestarted:
                self._rate_known = False  # re-INVITE replaced the streams
            except bs.AudioNotActive:
                pass
            if data:
                samples = _audio.from_pcm(data, byteorder=sys.byteorder)
                if channels > 1:
                    samples = array.array(
                        "h",
                        (
                            sum(samples[i : i + channels]) // channels
                            for i in range(0, len(samples) - channels + 1, channels)
                        ),
                    )
                if self._rx_rate != self._rate:
                    samples = _audio.resample(samples, self._rx_rate, self._rate)
                self._heard += _audio.to_pcm(samples)
            now = self.ended_at or time.monotonic()
            have = len(self._heard) // 2
            expected = int((now - t0) * self._rate)
            slack = 0 if self.ended else int(_CAPTURE_SLACK_S * self._rate)
            if expected - have > slack:
                pad = expected - slack - have
                self._heard += bytes(2 * pad)
                self._padded_samples += pad
            if self.ended:
                return
            await asyncio.sleep(_CAPTURE_POLL_S)

    @property
    def heard_rate(self) -> int:
        """Sample rate of :meth:`heard` (the call's receive rate, 8000 for G.711)."""
        return self._rate

    def heard(self) -> bytes:
        """Everything received since answer: mono signed 16-bit little-endian
        PCM at :attr:`heard_rate`; sample ``n`` was heard ``n/heard_rate``
        seconds after answer (gaps are silence-filled)."""
        return bytes(self._heard)

    def heard_samples(self) -> array.array[int]:
        """:meth:`heard` as an ``array('h')`` of samples."""
        return _audio.from_pcm(self._heard)

    def heard_segment(self, start_s: float, end_s: float | None = None) -> array.array[int]:
        """Samples heard between ``start_s`` and ``end_s`` seconds after answer."""
        return _audio.segment(self.heard_samples(), self._rate, start_s, end_s)

    def save_heard(self, path: str | Path) -> Path:
        """Write :meth:`heard` as a mono 16-bit WAV file."""
        return _audio.write_wav(path, self.heard_samples(), self._rate)

    @property
    def capture_stats(self) -> dict[str, float]:
        """Seconds heard, seconds silence-filled, bytes of stale pre-answer audio dropped."""
        return {
            "heard_s": len(self._heard) / 2 / self._rate,
            "padded_s": self._padded_samples / self._rate,
            "discarded_pre_answer_bytes": self._discarded_bytes,
        }

    # -- transmit audio

    async def _tx_format(self) -> tuple[int, int, int]:
        bs = _baresip()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _MEDIA_READY_TIMEOUT_S
        while True:
            if self.ended:
                raise CallEnded("the call has ended")
            with contextlib.suppress(bs.AudioNotActive, bs.AudioRestarted):
                info = self._call.audio.info()
                if info.tx_ready:
                    return info.tx_sample_rate, max(1, info.tx_channels), info.tx_ptime_ms or 20
            if loop.time() > deadline:
                raise SoftphoneError("call audio did not become ready for sending")
            await asyncio.sleep(0.02)

    async def play_pcm(self, samples: Sequence[int], rate: int) -> bool:
        """Send mono 16-bit samples at ``rate`` Hz, paced in real time.

        Resampled to the call's rate as needed. Returns when the audio has
        been sent: True, or False if the call ended first. Concurrent plays
        are queued one after the other.
        """
        bs = _baresip()
        if not self.answered:
            raise SoftphoneError("playing audio needs an answered call")
        async with self._tx_lock:
            try:
                tx_rate, channels, ptime = await self._tx_format()
            except CallEnded:
                return False
            data = _audio.resample(samples, rate, tx_rate)
            if channels > 1:
                data = array.array("h", (s for s in data for _ in range(channels)))
            pcm = _audio.to_pcm(data, byteorder=sys.byteorder)
            bytes_per_s = tx_rate * channels * 2
            frame = max(2 * channels, bytes_per_s * ptime // 1000)
            total_s = len(pcm) / bytes_per_s
            audio = self._call.audio
            loop = asyncio.get_running_loop()
            start = loop.time()
            sent = 0
            while sent < len(pcm):
                if self.ended:
                    return False
                due = int((loop.time() - start + _TX_LEAD_S) * bytes_per_s)
                due = min(len(pcm), due - due % frame)
                if due > sent:
                    try:
                        n = audio.write(pcm[sent:due])
                    except bs.AudioRestarted:
                        n = 0
                    except bs.AudioNotActive:
                        return False
                    sent += n - n % (2 * channels)
                await asyncio.sleep(ptime / 2000)
            # Return once the tail has actually gone out on the wire.
            remaining = start + total_s + ptime / 1000 - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            return not self.ended

    async def play_wav(self, path: str | Path) -> bool:
        """Send a WAV file as the caller's speech (any rate; resampled)."""
        rate, samples = _audio.read_wav(path)
        return await self.play_pcm(samples, rate)

    async def play_tone(self, freq: float, seconds: float, amplitude: float = 0.5) -> bool:
        """Send a sine tone (``amplitude`` = fraction of full scale)."""
        return await self.play_pcm(_audio.tone(freq, seconds, 8000, amplitude), 8000)

    async def play_silence(self, seconds: float) -> bool:
        """Send ``seconds`` of digital silence (keeps later audio in order)."""
        return await self.play_pcm(_audio.silence(seconds, 8000), 8000)


# -- command line -----------------------------------------------------------------

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3
EXIT_REGISTRATION = 4
EXIT_NO_INCOMING = 5
EXIT_INTERRUPTED = 130

_EPILOG = """\
examples:
  # call extension 100, press 1 after the prompt, say something, keep what was heard
  consent-gate-softphone --registrar 127.0.0.1:25060 --user alice --password X \\
      --call 100 --wait-answer 10 --keys 1 --keys-delay 4 --speak speech.wav \\
      --save-heard heard.wav --duration 8

  # be the agent: register, answer the next call, talk back, record
  consent-gate-softphone --registrar 127.0.0.1:25060 --user agent --password X \\
      --answer --wait-incoming 30 --speak reply.wav --save-heard agent.wav --duration 20

  # peer to peer (no PBX): one side listens, the other calls it
  consent-gate-softphone --listen 127.0.0.1:5099 --user bob --answer --wait-incoming 30
  consent-gate-softphone --user alice --call sip:bob@127.0.0.1:5099 --keys 12

exit codes:
  0 ok   1 SIP stack/unexpected error   2 usage (bad option or file)
  3 call not answered (timeout, busy, declined, not found, auth refused)
  4 registration failed
  5 no incoming call within --wait-incoming   130 interrupted

The password may come from --password, --password-file or the environment
variable CONSENT_GATE_SOFTPHONE_PASSWORD (keeps it out of the process list).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit 2 with a clear message
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(name: str) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number of seconds, got {text!r}"
            ) from None
        if value < 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be >= 0 seconds, got {text!r}")
        return value

    return conv


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="consent-gate-softphone",
        description=(
            "A scriptable SIP softphone (baresip) for checking a PBX: register, call or "
            "answer, press keys, send a WAV file as speech, record what is heard."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    acc = p.add_argument_group("account")
    acc.add_argument(
        "--registrar",
        metavar="HOST:PORT",
        help="PBX to register with and the domain of the account "
        "(omit for peer-to-peer use without registration)",
    )
    acc.add_argument("--user", required=True, help="SIP user (also the digest username)")
    acc.add_argument("--password", help="SIP password")
    acc.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="read the password from the first line of FILE",
    )
    acc.add_argument(
        "--no-register",
        action="store_true",
        help="do not REGISTER (outbound calls are still authenticated)",
    )
    acc.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    acc.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="local SIP address (default: the address routing to the registrar, free port)",
    )
    acc.add_argument("--rtp-ports", metavar="LO-HI", help="local RTP port range")

    mode = p.add_argument_group("what to do (one of)")
    excl = mode.add_mutually_exclusive_group(required=True)
    excl.add_argument(
        "--call", metavar="URI", help="call this URI (sip:100@host:port) or extension (100)"
    )
    excl.add_argument("--answer", action="store_true", help="wait for a call and answer it")
    mode.add_argument(
        "--wait-incoming",
        type=_positive("--wait-incoming"),
        default=30.0,
        metavar="SECONDS",
        help="with --answer: how long to wait (default 30)",
    )
    mode.add_argument(
        "--wait-answer",
        type=_positive("--wait-answer"),
        default=30.0,
        metavar="SECONDS",
        help="with --call: how long to ring (default 30)",
    )
    mode.add_argument("--caller-name", help="From display name for the call")
    mode.add_argument("--from-user", help="From URI user for the call (auth stays --user)")
    mode.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra INVITE header (repeatable)",
    )

    media = p.add_argument_group("during the call")
    media.add_argument("--keys", metavar="DIGITS", help="DTMF keys to press (0-9 A-D * #)")
    media.add_argument(
        "--keys-delay",
        type=_positive("--keys-delay"),
        default=1.0,
        metavar="SECONDS",
        help="seconds after answer before pressing --keys (default 1)",
    )
    media.add_argument(
        "--dtmf-method",
        choices=("rfc4733", "info"),
        default="rfc4733",
        help="RTP telephone-events (default) or SIP INFO",
    )
    media.add_argument(
        "--speak", type=Path, metavar="WAV", help="send this WAV file as speech (after --keys)"
    )
    media.add_argument(
        "--save-heard",
        type=Path,
        metavar="WAV",
        help="write everything heard since answer to this WAV file",
    )
    media.add_argument(
        "--duration",
        type=_positive("--duration"),
        default=10.0,
        metavar="SECONDS",
        help="hang up this many seconds after answer, unless the far "
        "end hangs up first (default 10)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    out.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-vv adds a SIP message trace)",
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.password is not None and args.password_file is not None:
        p.error("give --password or --password-file, not both")
    if args.password_file is not None:
        try:
            args.password = args.password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            p.error(f"--password-file {args.password_file}: cannot read a password ({exc})")
    if args.password is None:
        args.password = os.environ.get("CONSENT_GATE_SOFTPHONE_PASSWORD", "")
    if args.registrar is not None:
        try:
            _split_hostport(args.registrar)
        except ValueError as exc:
            p.error(f"--registrar {exc}")
    if args.listen is not None:
        try:
            _split_hostport(args.listen)
        except ValueError as exc:
            p.error(f"--listen {exc}")
    if args.registrar is None and args.call and "@" not in args.call:
        p.error(f"--call {args.call!r} needs a full sip:user@host URI when no --registrar is given")
    if args.registrar is None and args.answer and args.listen is None:
        p.error(
            "--answer without --registrar needs --listen HOST:PORT so the caller "
            "knows where to call"
        )
    if args.rtp_ports is not None:
        m = re.fullmatch(r"(\d+)-(\d+)", args.rtp_ports)
        if not m or not 0 < int(m.group(1)) <= int(m.group(2)) <= 65535:
            p.error(f"--rtp-ports must look like 35000-35100, got {args.rtp_ports!r}")
        args.rtp_ports = (int(m.group(1)), int(m.group(2)))
    if args.keys is not None:
        bad = sorted({c for c in args.keys.upper() if c not in _DTMF_DIGITS})
        if not args.keys or bad:
            p.error(f"--keys {args.keys!r}: not DTMF keys {''.join(bad)!r} (use 0-9 A-D * #)")
    if args.speak is not None:
        try:
            _audio.read_wav(args.speak)
        except (OSError, ValueError) as exc:
            p.error(f"--speak {args.speak}: {exc}")
    if args.save_heard is not None:
        parent = args.save_heard.parent
        if not parent.is_dir():
            p.error(f"--save-heard {args.save_heard}: directory {parent} does not exist")
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or any(c in name.strip() for c in " \t"):
            p.error(f"--header {h!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    args.headers = headers
    for opt, value in (("--caller-name", args.caller_name), ("--from-user", args.from_user)):
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            p.error(f"{opt}: control characters are not allowed")


def _emit(args: argparse.Namespace, text: str, *, error: bool = False) -> None:
    """Progress goes to stdout (stderr under --json); problems always to stderr."""
    stream = sys.stderr if (error or args.json) else sys.stdout
    print(text, file=stream, flush=True)


async def _run(args: argparse.Namespace) -> int:
    summary: dict[str, Any] = {"ok": False}
    code = EXIT_ERROR
    if args.listen:
        listen = args.listen
    else:
        target_host = (
            _split_hostport(args.registrar)[0]
            if args.registrar
            else (_split_hostport(args.call.split("@", 1)[1].split(";", 1)[0])[0])
        )
        listen = f"{_local_ip_toward(target_host)}:0"
    async with Softphone(
        listen=listen,
        rtp_ports=args.rtp_ports,
        sip_trace=args.verbose >= 2,
        native_log_level="info" if args.verbose >= 2 else "warning",
    ) as phone:
        summary["listen"] = phone.address
        domain = args.registrar or phone.address
        try:
            if args.registrar and not args.no_register:
                line = await phone.register(
                    args.user,
                    args.password,
                    domain,
                    transport=args.transport,
                    dtmf_method=args.dtmf_method,
                )
                _emit(args, f"registered {args.user}@{domain}")
            else:
                line = await phone.line(
                    args.user,
                    args.password,
                    domain,
                    transport=args.transport,
                    dtmf_method=args.dtmf_method,
                )
        except RegistrationFailed as exc:
            _emit(args, f"error: {exc}", error=True)
            summary["error"] = str(exc)
            code = EXIT_REGISTRATION
            line = None
        except ValueError as exc:
            _emit(args, f"error: {exc}", error=True)
            summary["error"] = str(exc)
            code = EXIT_USAGE
            line = None
        if line is not None:
            code = await _run_call(args, line, summary)
    summary["exit_code"] = code
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    return code


async def _run_call(args: argparse.Namespace, line: Line, summary: dict[str, Any]) -> int:
    if args.call:
        try:
            call = await line.call(
                args.call,
                headers=args.headers,
                caller_name=args.caller_name,
                from_user=args.from_user,
                dtmf_method=args.dtmf_method,
            )
        except ValueError as exc:
            _emit(args, f"error: {exc}", error=True)
            summary["error"] = str(exc)
            return EXIT_USAGE
        _emit(args, f"calling {call.remote_uri} ...")
        try:
            await call.wait_answered(args.wait_answer)
        except CallNotAnswered as exc:
            _emit(args, f"not answered: {exc}", error=True)
            summary.update(error=str(exc), status=exc.status)
            return EXIT_NO_ANSWER
        answered_at = call.answered_at or call.created_at
        _emit(args, f"answered after {answered_at - call.created_at:.2f} s")
    else:
        _emit(args, f"waiting up to {args.wait_incoming:g} s for a call to {line.uri} ...")
        try:
            call = await line.wait_incoming(args.wait_incoming)
        except NoIncomingCall as exc:
            _emit(args, f"error: {exc}", error=True)
            summary["error"] = str(exc)
            return EXIT_NO_INCOMING
        name, user = call.caller_id
        _emit(args, f"incoming call from {call.remote_uri} (name {name!r}, user {user!r})")
        summary["caller"] = {
            "uri": call.remote_uri,
            "name": name,
            "user": user,
            "headers": call.headers,
        }
        try:
            await call.answer()
        except SoftphoneError as exc:
            _emit(args, f"error: {exc}", error=True)
            summary["error"] = str(exc)
            return EXIT_ERROR
        _emit(args, "answered")
    summary["call_id"] = call.call_id
    assert call.answered_at is not None
    loop = asyncio.get_running_loop()

    async def script() -> None:
        if args.keys:
            delay = args.keys_delay - call.elapsed()
            if delay > 0:
                await asyncio.sleep(delay)
            if call.ended:
                return
            await call.send_dtmf(args.keys, gap=0.25)
            _emit(args, f"pressed {args.keys} ({call.dtmf_method}) at {call.elapsed():.2f} s")
            summary["keys_sent"] = args.keys
        if args.speak:
            _emit(
                args,
                f"speaking {args.speak} ({_audio.duration(args.speak):.2f} s) "
                f"at {call.elapsed():.2f} s",
            )
            complete = await call.play_wav(args.speak)
            summary["speech_complete"] = complete

    task = loop.create_task(script())
    try:
        await call.wait_hangup(max(0.0, args.duration - call.elapsed()))
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, CallEnded):
            await task
    finally:
        by_remote = call.ended
        await call.hangup()
        await call.wait_hangup(5)
    samples = call.heard_samples()
    rate = call.heard_rate
    spans = _audio.speech_spans(samples, rate)
    level = _audio.rms_dbfs(samples)
    if by_remote:
        _emit(args, f"far end hung up after {call.elapsed():.2f} s ({call.close_reason})")
    else:
        _emit(args, f"hung up after {call.elapsed():.2f} s")
    _emit(
        args,
        f"heard {len(samples) / rate:.2f} s, RMS {level:.1f} dBFS, sound at "
        + (", ".join(f"{a:.2f}-{b:.2f}" for a, b in spans) or "none"),
    )
    if call.received_dtmf():
        _emit(args, f"received DTMF {call.received_dtmf()}")
    if args.save_heard:
        call.save_heard(args.save_heard)
        _emit(args, f"saved heard audio to {args.save_heard}")
    summary.update(
        ok=True,
        duration_s=round(call.elapsed(), 3),
        ended_by="remote" if by_remote else "local",
        close_reason=call.close_reason,
        heard_s=round(len(samples) / rate, 3),
        heard_rms_dbfs=None if level == float("-inf") else round(level, 2),
        sound_spans=[[round(a, 2), round(b, 2)] for a, b in spans],
        dtmf_received=call.received_dtmf(),
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``consent-gate-softphone``; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose >= 2
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # Our own messages say the same, more plainly.
        logging.getLogger("baresip").setLevel(logging.CRITICAL)
    elif args.verbose == 1:
        logging.getLogger("baresip").setLevel(logging.WARNING)
    try:
        _baresip()
    except SoftphoneError as exc:
        print(f"consent-gate-softphone: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SoftphoneError as exc:
        print(f"consent-gate-softphone: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
