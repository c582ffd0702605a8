"""What the AGI unit tests (script and FastAGI server) share: the environment res_agi writes,
the commands the AGI port sends while it listens, and the settings they run with."""

from __future__ import annotations

SOUNDS = "/snd/consent-gate"  # as Asterisk would see the prompts: only a string here


HMAC_KEY = "agi-test-hmac-key-0123456789abcdef"


LISTEN = "WAIT FOR DIGIT 50"  # AgiPort listening between commands after a key


DISCARD = "WAIT FOR DIGIT 10"  # AgiPort.discard_keys before each purpose's question


def agi_environment(purpose: str, *, call_id: str, number: str = "+4520304050", language: str = "en",
                    name: str = "Test Caller", network: bool = False) -> str:
    """What res_agi writes (the key set and order of a real Asterisk 22.10 session), values
    written as res_agi writes them: as they are, nothing escaped.  FastAGI (``network``) starts
    with ``agi_network`` and the URL's path, and ``agi_request`` is the URL."""
    environment = {
        "agi_request": "agi://127.0.0.1:4573/consent-gate" if network else "/usr/local/bin/consent-gate-agi",
        "agi_channel": "PJSIP/caller-00000001",
        "agi_language": language,
        "agi_type": "PJSIP",
        "agi_uniqueid": call_id,
        "agi_version": "22.10.1+dfsg+~cs6.17.60671434-1",
        "agi_callerid": number,
        "agi_calleridname": name,
        "agi_callingpres": "0",
        "agi_callingani2": "0",
        "agi_callington": "0",
        "agi_callingtns": "0",
        "agi_dnid": "300",
        "agi_rdnis": "unknown",
        "agi_context": "consent-gate-agi",
        "agi_extension": "s",
        "agi_priority": "5",
        "agi_enhanced": "0.0",
        "agi_accountcode": "",
        "agi_threadid": "139816155580096",
        "agi_arg_1": purpose,
    }
    head = "agi_network: yes\nagi_network_script: consent-gate\n" if network else ""
    return head + "".join(f"{key}: {value}\n" for key, value in environment.items()) + "\n"
