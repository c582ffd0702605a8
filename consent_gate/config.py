"""Configuration: one TOML file plus environment overrides; secrets never have defaults.

Errors name the bad key and the file, e.g. ``consent-gate.toml: purposes.training.legal_basis:
'concent' is not one of consent, legitimate-interest, legal-obligation``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consent_gate.prompts.catalog import packaged_sounds_dir

LEGAL_BASES = ("consent", "legitimate-interest", "legal-obligation")
DTMF_KEYS = "0123456789*#"
# 100 years: longer than any legal retention duty, and far from datetime's limits (year 9999).
MAX_RETENTION_DAYS = 36500
_PURPOSE_NAME = re.compile(r"^[a-z0-9-]{1,40}$")
_PROMPT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


# Keys each section may hold (None: free-form, checked by its own parser).  A typo such as
# ``accept_keys`` must be an error, not a silently ignored setting.
_SECTION_KEYS: dict[str, frozenset[str] | None] = {
    "ari": frozenset({"url", "username", "password_file", "app"}),
    "ledger": frozenset({"dsn", "journal_dir", "record_when_journaled", "write_timeout"}),
    "privacy": frozenset({"hmac_key_file", "store_raw_number"}),
    "recordings": frozenset({"dir", "owner"}),
    "prompts": frozenset({"dir", "asterisk_dir", "default_language"}),
    "dialog": frozenset({"accept_key", "decline_key", "reciprocal_key", "digit_timeout", "repeats",
                         "withdraw_code", "caller_records_code", "pause_code", "resume_code",
                         "pause_limit", "caller_may_pause", "code_timeout"}),
    "ami": frozenset({"host", "port", "username", "secret_file"}),
    "purposes": None,
    "api": frozenset({"listen", "token_file", "allow_remote"}),
    "fastagi": frozenset({"listen", "max_sessions"}),
}
_LANGUAGE = re.compile(r"^[a-z]{2}$")
# prompts.asterisk_dir goes into STREAM FILE / Playback arguments and into CONSENT_RESULT (":"
# separated); the dialplan plays a confirmation only if it matches ^/[a-zA-Z0-9/_.-]{1,200}$.
_ASTERISK_DIR = re.compile(r"^/[A-Za-z0-9/_.-]{0,150}$")
_USER = re.compile(r"^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Purpose:
    name: str
    legal_basis: str
    prompt: str
    retention_days: int
    training_copy: bool = False

    @property
    def asks_consent(self) -> bool:
        return self.legal_basis == "consent"


@dataclass(frozen=True)
class DialogSettings:
    accept_key: str = "1"
    decline_key: str = "2"
    reciprocal_key: str = "3"
    digit_timeout: float = 5.0
    repeats: int = 1
    # Mid-call codes (keyed while bridged): the caller withdraws or says they record; the agent
    # (and, if allowed, the caller) pauses the recording while card data is given.
    withdraw_code: str = "*0"
    caller_records_code: str = "*3"
    pause_code: str = "*5"
    resume_code: str = "*6"
    pause_limit: float = 120.0
    caller_may_pause: bool = False
    code_timeout: float = 3.0


DEFAULT_PURPOSES = {
    "training": Purpose("training", "consent", "question-training", 90, training_copy=True),
    "documentation": Purpose("documentation", "consent", "question-documentation", 365),
}


@dataclass(frozen=True)
class Settings:
    # repr=False on every secret (a DSN may hold a password): settings end up in logs and tracebacks.
    ari_url: str
    ari_user: str
    ari_password: str = field(repr=False)
    ari_app: str
    database_dsn: str = field(repr=False)
    journal_dir: Path
    hmac_key: bytes = field(repr=False)
    recordings_dir: Path
    prompts_dir: Path
    asterisk_prompts_dir: str
    store_raw_number: bool = False
    record_when_journaled: bool = False
    ledger_write_timeout: float = 2.0
    default_language: str = "en"
    dialog: DialogSettings = field(default_factory=DialogSettings)
    purposes: Mapping[str, Purpose] = field(default_factory=lambda: dict(DEFAULT_PURPOSES))
    # Data-subject HTTP API (consent_gate/api.py); its token is read only when the API starts.
    api_listen: str = "127.0.0.1:8089"
    api_token_file: str | None = None
    # The API erases recordings: listening beyond loopback must be asked for explicitly.
    api_allow_remote: bool = False
    # AMI (loopback) for stopping and muting MixMonitor mid-call; the secret only from env/file.
    ami_host: str = "127.0.0.1"
    ami_port: int = 5038
    ami_user: str = "consent-gate"
    ami_secret: str | None = field(default=None, repr=False)
    # The user Asterisk runs as: it must own recordings_dir (mode 0700), see consent_gate/recordings.py.
    recordings_owner: str = "asterisk"
    # The FastAGI server (consent-gate-fastagi): loopback only, always -- AGI has no authentication.
    fastagi_listen: str = "127.0.0.1:4573"
    fastagi_max_sessions: int = 500

    def purpose(self, name: str) -> Purpose | None:
        return self.purposes.get(name)


def _get(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}.{key}: missing")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _secret(env: Mapping[str, str], name: str, file_setting: str | None, what: str) -> str:
    """A secret from $NAME, $NAME_FILE or a file named in the config; never a built-in default."""
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE") or file_setting
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as error:
            raise ConfigError(f"{what}: cannot read secret file {path}: {error.strerror}") from None
    raise ConfigError(f"{what}: set ${name} or ${name}_FILE (no default is shipped)")


def _port(value: str | int, where: str) -> int:
    if isinstance(value, int) or str(value).isdigit():
        port = int(value)
        if 1 <= port <= 65535:
            return port
    raise ConfigError(f"{where}: {value!r} is not a port number")


def _optional_secret(env: Mapping[str, str], name: str, file_setting: str | None, what: str) -> str | None:
    if not (env.get(name) or env.get(f"{name}_FILE") or file_setting):
        return None
    return _secret(env, name, file_setting, what)


def _parse_dialog(table: Mapping[str, Any], where: str) -> DialogSettings:
    defaults = DialogSettings()
    dialog = DialogSettings(
        accept_key=_get(table, "accept_key", str, where, defaults.accept_key),
        decline_key=_get(table, "decline_key", str, where, defaults.decline_key),
        reciprocal_key=_get(table, "reciprocal_key", str, where, defaults.reciprocal_key),
        digit_timeout=_get(table, "digit_timeout", float, where, defaults.digit_timeout),
        repeats=_get(table, "repeats", int, where, defaults.repeats),
        withdraw_code=_get(table, "withdraw_code", str, where, defaults.withdraw_code),
        caller_records_code=_get(table, "caller_records_code", str, where, defaults.caller_records_code),
        pause_code=_get(table, "pause_code", str, where, defaults.pause_code),
        resume_code=_get(table, "resume_code", str, where, defaults.resume_code),
        pause_limit=_get(table, "pause_limit", float, where, defaults.pause_limit),
        caller_may_pause=_get(table, "caller_may_pause", bool, where, defaults.caller_may_pause),
        code_timeout=_get(table, "code_timeout", float, where, defaults.code_timeout),
    )
    for key in ("accept_key", "decline_key", "reciprocal_key"):
        value = getattr(dialog, key)
        if len(value) != 1 or value not in DTMF_KEYS:
            raise ConfigError(f"{where}.{key}: {value!r} is not a single DTMF key")
    if len({dialog.accept_key, dialog.decline_key, dialog.reciprocal_key}) != 3:
        raise ConfigError(f"{where}: accept_key, decline_key and reciprocal_key must differ")
    if not 1.0 <= dialog.digit_timeout <= 30.0:
        raise ConfigError(f"{where}.digit_timeout: {dialog.digit_timeout} is outside 1..30 seconds")
    if not 0 <= dialog.repeats <= 3:
        raise ConfigError(f"{where}.repeats: {dialog.repeats} is outside 0..3")
    codes = ("withdraw_code", "caller_records_code", "pause_code", "resume_code")
    for key in codes:
        code = getattr(dialog, key)
        # A leading * or # keeps mid-call codes apart from the digits of ordinary menus.
        if not (2 <= len(code) <= 4 and code[0] in "*#" and all(c in DTMF_KEYS for c in code)):
            raise ConfigError(f"{where}.{key}: {code!r} must be 2-4 DTMF keys starting with * or #")
    if len({getattr(dialog, key) for key in codes}) != len(codes):
        raise ConfigError(f"{where}: {', '.join(codes)} must all differ")
    if not 10.0 <= dialog.pause_limit <= 900.0:
        raise ConfigError(f"{where}.pause_limit: {dialog.pause_limit} is outside 10..900 seconds")
    if not 0.5 <= dialog.code_timeout <= 10.0:
        raise ConfigError(f"{where}.code_timeout: {dialog.code_timeout} is outside 0.5..10 seconds")
    return dialog


def _parse_purposes(table: Mapping[str, Any], where: str) -> dict[str, Purpose]:
    purposes: dict[str, Purpose] = {}
    for name, body in table.items():
        here = f"{where}.{name}"
        if not _PURPOSE_NAME.match(name):
            raise ConfigError(f"{here}: purpose names use a-z, 0-9 and '-' (max 40)")
        if not isinstance(body, dict):
            raise ConfigError(f"{here}: expected a table")
        unknown = set(body) - {"legal_basis", "prompt", "retention_days", "training_copy"}
        if unknown:
            raise ConfigError(f"{here}.{sorted(unknown)[0]}: unknown key")
        basis = _get(body, "legal_basis", str, here)
        if basis not in LEGAL_BASES:
            raise ConfigError(f"{here}.legal_basis: {basis!r} is not one of {', '.join(LEGAL_BASES)}")
        default_prompt = "notice-legal-obligation" if basis == "legal-obligation" else f"question-{name}"
        prompt = _get(body, "prompt", str, here, default_prompt)
        if not _PROMPT_NAME.match(prompt):
            raise ConfigError(f"{here}.prompt: {prompt!r} is not a prompt name")
        retention = _get(body, "retention_days", int, here, 1825 if basis == "legal-obligation" else 90)
        if not 1 <= retention <= MAX_RETENTION_DAYS:
            raise ConfigError(f"{here}.retention_days: {retention} is outside 1..{MAX_RETENTION_DAYS} days")
        purposes[name] = Purpose(name, basis, prompt, retention, _get(body, "training_copy", bool, here, False))
    if not purposes:
        raise ConfigError(f"{where}: at least one purpose is needed")
    return purposes


def load_settings(
    path: Path | None = None, env: Mapping[str, str] | None = None, *, require_ari: bool = True
) -> Settings:
    """Read the TOML file (optional) and apply CONSENT_GATE_* environment overrides."""
    env = os.environ if env is None else env
    path = path or (Path(env["CONSENT_GATE_CONFIG"]) if env.get("CONSENT_GATE_CONFIG") else None)
    data: dict[str, Any] = {}
    name = "defaults"
    if path is not None:
        name = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for key, value in data.items():
        if key not in _SECTION_KEYS:
            raise ConfigError(f"{name}: {key}: unknown section")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: {key}: expected a table")
        allowed = _SECTION_KEYS[key]
        for inner in value:
            if allowed is not None and inner not in allowed:
                raise ConfigError(f"{name}: {key}.{inner}: unknown key")
    ari = data.get("ari", {})
    ledger = data.get("ledger", {})
    privacy = data.get("privacy", {})
    recordings = data.get("recordings", {})
    prompts = data.get("prompts", {})
    api = data.get("api", {})
    ami = data.get("ami", {})
    fastagi = data.get("fastagi", {})

    def pick(env_name: str, table: Mapping[str, Any], key: str, where: str, default: Any = ...) -> Any:
        if env.get(env_name):
            return env[env_name]
        return _get(table, key, str, f"{name}: {where}", default)

    try:
        key_text = _secret(env, "CONSENT_GATE_HMAC_KEY", privacy.get("hmac_key_file"), f"{name}: privacy.hmac_key")
        if len(key_text) < 16:
            raise ConfigError(f"{name}: privacy.hmac_key: at least 16 characters (32 random bytes recommended)")
        prompts_dir = Path(pick("CONSENT_GATE_PROMPTS_DIR", prompts, "dir", "prompts",
                                str(packaged_sounds_dir())))
        settings = Settings(
            ari_url=pick("CONSENT_GATE_ARI_URL", ari, "url", "ari", "http://127.0.0.1:8088"),
            ari_user=pick("CONSENT_GATE_ARI_USER", ari, "username", "ari", "consent-gate"),
            # The AGI script never talks to ARI, so it needs no ARI password.
            ari_password=_secret(env, "CONSENT_GATE_ARI_PASSWORD", ari.get("password_file"), f"{name}: ari.password")
            if require_ari else "",
            ari_app=pick("CONSENT_GATE_ARI_APP", ari, "app", "ari", "consent-gate"),
            database_dsn=pick("CONSENT_GATE_DSN", ledger, "dsn", "ledger", "postgresql:///consent_gate"),
            journal_dir=Path(pick("CONSENT_GATE_JOURNAL_DIR", ledger, "journal_dir", "ledger",
                                  "/var/lib/consent-gate/journal")),
            record_when_journaled=_get(ledger, "record_when_journaled", bool, f"{name}: ledger", False),
            ledger_write_timeout=_get(ledger, "write_timeout", float, f"{name}: ledger", 2.0),
            hmac_key=key_text.encode(),
            store_raw_number=_get(privacy, "store_raw_number", bool, f"{name}: privacy", False),
            recordings_dir=Path(pick("CONSENT_GATE_RECORDINGS_DIR", recordings, "dir", "recordings",
                                     "/var/spool/asterisk/consent-gate")),
            prompts_dir=prompts_dir,
            asterisk_prompts_dir=pick("CONSENT_GATE_ASTERISK_SOUNDS_DIR", prompts, "asterisk_dir", "prompts",
                                      str(prompts_dir)),
            default_language=_get(prompts, "default_language", str, f"{name}: prompts", "en"),
            dialog=_parse_dialog(data.get("dialog", {}), f"{name}: dialog"),
            purposes=_parse_purposes(data["purposes"], f"{name}: purposes") if "purposes" in data
            else dict(DEFAULT_PURPOSES),
            api_listen=pick("CONSENT_GATE_API_LISTEN", api, "listen", "api", "127.0.0.1:8089"),
            api_token_file=_get(api, "token_file", str, f"{name}: api", None),
            api_allow_remote=_get(api, "allow_remote", bool, f"{name}: api", False),
            ami_host=pick("CONSENT_GATE_AMI_HOST", ami, "host", "ami", "127.0.0.1"),
            ami_port=_port(env.get("CONSENT_GATE_AMI_PORT") or ami.get("port", 5038), f"{name}: ami.port"),
            ami_user=pick("CONSENT_GATE_AMI_USER", ami, "username", "ami", "consent-gate"),
            ami_secret=_optional_secret(env, "CONSENT_GATE_AMI_SECRET", ami.get("secret_file"), f"{name}: ami.secret"),
            recordings_owner=pick("CONSENT_GATE_RECORDINGS_OWNER", recordings, "owner", "recordings", "asterisk"),
            fastagi_listen=pick("CONSENT_GATE_FASTAGI_LISTEN", fastagi, "listen", "fastagi", "127.0.0.1:4573"),
            fastagi_max_sessions=_get(fastagi, "max_sessions", int, f"{name}: fastagi", 500),
        )
    except ConfigError:
        raise
    if not _LANGUAGE.match(settings.default_language):
        # The ledger only accepts 'xx' language codes: anything else could never be stored.
        raise ConfigError(f"{name}: prompts.default_language: {settings.default_language!r} is not a "
                          "two-letter language code")
    if not 0.1 <= settings.ledger_write_timeout <= 30:
        raise ConfigError(f"{name}: ledger.write_timeout: outside 0.1..30 seconds")
    host, _, port = settings.api_listen.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: api.listen: {settings.api_listen!r} is not host:port")
    if not _is_loopback(host) and not settings.api_allow_remote:
        raise ConfigError(f"{name}: api.listen: {host!r} is not a loopback address; the API exports and "
                          "erases recordings: keep it on 127.0.0.1 behind a TLS proxy, or set "
                          "api.allow_remote = true")
    host, _, port = settings.fastagi_listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:  # 0: any free port (tests)
        raise ConfigError(f"{name}: fastagi.listen: {settings.fastagi_listen!r} is not host:port")
    if not _is_loopback(host) or host == "localhost":
        raise ConfigError(f"{name}: fastagi.listen: {host!r} is not a loopback address (127.0.0.0/8 or ::1); "
                          "AGI has no authentication: whoever reaches the port could forge a caller's consent")
    if not 1 <= settings.fastagi_max_sessions <= 10000:
        raise ConfigError(f"{name}: fastagi.max_sessions: outside 1..10000")
    if not _ASTERISK_DIR.match(settings.asterisk_prompts_dir):
        raise ConfigError(f"{name}: prompts.asterisk_dir: {settings.asterisk_prompts_dir!r} must be an absolute "
                          "path of at most 150 letters, digits and / _ . - (a ':', ',' or space would break the "
                          "dialplan's and AGI's arguments); set prompts.asterisk_dir")
    if not _USER.match(settings.recordings_owner):
        raise ConfigError(f"{name}: recordings.owner: {settings.recordings_owner!r} is not a user name or uid")
    return settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


# -- the one way every command line loads its settings -----------------------------------------

def add_settings_arguments(parser: Any) -> None:
    """``--config`` and ``--dsn`` for a subcommand (argparse), the same for every one of them."""
    parser.add_argument("--config", type=Path, help="settings file (default $CONSENT_GATE_CONFIG)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (default $CONSENT_GATE_DSN, then ledger.dsn of --config)")


def settings_for_command(args: Any, env: Mapping[str, str] | None = None) -> Settings:
    """The full settings of an admin command: --config (or $CONSENT_GATE_CONFIG) and the
    CONSENT_GATE_* environment, no ARI; ``--dsn`` wins over both.  A bad file or value exits
    with the error, naming it.  The log goes to stderr, readable on a terminal."""
    import sys

    from consent_gate.log import configure_logging

    configure_logging("console" if sys.stderr.isatty() else "json")
    try:
        settings = load_settings(getattr(args, "config", None), env, require_ari=False)
    except ConfigError as error:
        raise SystemExit(f"consent-gate: {error}") from None
    if getattr(args, "dsn", None):
        from dataclasses import replace

        settings = replace(settings, database_dsn=args.dsn)
    return settings


def dsn_for_command(args: Any, env: Mapping[str, str] | None = None) -> str:
    """Only the database, for commands that need nothing else (db migrate, history, journal):
    ``--dsn``, then $CONSENT_GATE_DSN, then ``[ledger] dsn`` of --config / $CONSENT_GATE_CONFIG.
    Needs no pseudonym key, so a migration can run before the rest is configured."""
    env = os.environ if env is None else env
    if getattr(args, "dsn", None):
        return str(args.dsn)
    if env.get("CONSENT_GATE_DSN"):
        return env["CONSENT_GATE_DSN"]
    path = getattr(args, "config", None) or (Path(env["CONSENT_GATE_CONFIG"]) if env.get("CONSENT_GATE_CONFIG") else None)
    if path is not None:
        try:
            dsn = tomllib.loads(Path(path).read_text()).get("ledger", {}).get("dsn")
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise SystemExit(f"consent-gate: {path}: {error}") from None
        if isinstance(dsn, str) and dsn:
            return dsn
    raise SystemExit("consent-gate: no database: pass --dsn, set CONSENT_GATE_DSN, or name ledger.dsn in --config")
