"""panoramisk 1.4's FastAGI, probed with inputs consent-gate must survive (docs/performance.md, "FastAGI").

    pip download --no-deps panoramisk==1.4 -d /tmp/p && unzip -q /tmp/p/*.whl -d /tmp/p/x
    .venv/bin/python bench/fastagi/panoramisk_probe.py /tmp/p/x

Prints what it finds; asserts nothing.  (Evaluation only: panoramisk is not a dependency.)
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import warnings
from typing import Any


class _Writer:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        pass


async def probe(fast_agi: Any) -> None:
    app = fast_agi.Application()
    try:
        app.add_route("plain", lambda request: None)
        print("add_route(plain function): ok")
    except Exception as error:  # noqa: BLE001 -- reported, that is the point
        print("add_route(plain function):", type(error).__name__, error)

    def request(data: bytes) -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        return fast_agi.Request(app, {}, reader, _Writer())

    # Asterisk writes HANGUP when the channel goes, also between a command and its reply.
    r = request(b"HANGUP\n200 result=-1 endpos=0\n200 result=1\n")
    first = await r.send_command('STREAM FILE x "1" 0')
    second = await r.send_command("SET VARIABLE A b")
    print("HANGUP, then the reply: first ->", first, "| the second command got ->", second)

    # A multi-line 520 usage reply, then the next command's reply.
    r = request(b"520-Invalid command syntax.  Proper usage follows:\n Usage: STREAM FILE <f> <d>\n"
                b" more usage\n520 End of proper usage.\n200 result=49 endpos=1\n")
    await r.send_command("STREAM FILE")
    try:
        print("520 usage: the next command got ->", await r.send_command('STREAM FILE x "1" 0'))
    except Exception as error:  # noqa: BLE001
        print("520 usage: the next command raised", type(error).__name__, error)

    # The environment: a repeated key (a line break in a caller name) silently wins.
    reader = asyncio.StreamReader()
    reader.feed_data(b"agi_network: yes\nagi_network_script: gate\nagi_uniqueid: 1700000000.1\n"
                     b"agi_calleridname: Eve\nagi_uniqueid: 1.2\n\n")
    seen: dict[str, str] = {}

    async def gate(req: Any) -> None:
        seen.update(req.headers)

    app.add_route("gate", gate)
    await app.handler(reader, _Writer())
    print("environment with agi_uniqueid twice: agi_uniqueid ->", seen.get("agi_uniqueid"))

    # No timeout of its own: a silent Asterisk holds the command (and its task) forever.
    try:
        await asyncio.wait_for(request(b"").send_command("ANSWER"), 1.0)
    except TimeoutError:
        print("no reply: send_command still waiting after 1 s")


def main() -> None:
    sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
    warnings.simplefilter("default")
    fast_agi = importlib.import_module("panoramisk.fast_agi")
    print("python", sys.version.split()[0])
    try:
        fast_agi.Application()  # outside a running loop, as its docs show
        print("Application() outside a loop: ok")
    except Exception as error:  # noqa: BLE001
        print("Application() outside a loop:", type(error).__name__, error)
    asyncio.run(probe(fast_agi))


if __name__ == "__main__":
    main()
