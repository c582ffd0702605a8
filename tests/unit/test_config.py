"""Configuration: TOML + environment; every error names the key that is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from consent_gate.config import DEFAULT_PURPOSES, ConfigError, load_settings

HMAC = "h" * 32
SECRETS = {"CONSENT_GATE_HMAC_KEY": HMAC, "CONSENT_GATE_ARI_PASSWORD": "ari-pw"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consent-gate.toml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=SECRETS if env is None else env)
    return str(caught.value)


def test_defaults_with_secrets_from_env() -> None:
    settings = load_settings(None, env=SECRETS)
    assert settings.hmac_key == HMAC.encode()
    assert settings.ari_password == "ari-pw"
    assert settings.record_when_journaled is False
    assert settings.store_raw_number is False
    assert settings.dialog.accept_key == "1" and settings.dialog.decline_key == "2"
    assert dict(settings.purposes) == DEFAULT_PURPOSES
    assert (settings.prompts_dir / "en" / "question-training.wav").is_file()


def test_missing_ari_password_names_the_variable() -> None:
    message = error_of(None, {"CONSENT_GATE_HMAC_KEY": HMAC})
    assert "CONSENT_GATE_ARI_PASSWORD" in message and "ari.password" in message


def test_missing_hmac_key_names_the_variable() -> None:
    message = error_of(None, {"CONSENT_GATE_ARI_PASSWORD": "pw"})
    assert "CONSENT_GATE_HMAC_KEY" in message and "privacy.hmac_key" in message


def test_empty_secret_counts_as_missing() -> None:
    assert "CONSENT_GATE_HMAC_KEY" in error_of(None, {**SECRETS, "CONSENT_GATE_HMAC_KEY": ""})


def test_short_hmac_key_is_refused() -> None:
    assert "privacy.hmac_key" in error_of(None, {**SECRETS, "CONSENT_GATE_HMAC_KEY": "short"})


def test_secrets_from_env_files(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text("f" * 40 + "\n")
    (tmp_path / "ari").write_text("from-file\n")
    settings = load_settings(None, env={
        "CONSENT_GATE_HMAC_KEY_FILE": str(tmp_path / "hmac"),
        "CONSENT_GATE_ARI_PASSWORD_FILE": str(tmp_path / "ari"),
    })
    assert settings.hmac_key == b"f" * 40  # trailing newline stripped
    assert settings.ari_password == "from-file"


def test_secret_files_named_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text("g" * 32)
    (tmp_path / "ari").write_text("pw-in-file")
    path = write(tmp_path, f"""
        [ari]
        password_file = "{tmp_path / 'ari'}"
        [privacy]
        hmac_key_file = "{tmp_path / 'hmac'}"
    """)
    settings = load_settings(path, env={})
    assert settings.hmac_key == b"g" * 32 and settings.ari_password == "pw-in-file"


def test_env_secret_wins_over_secret_file(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text("g" * 32)
    settings = load_settings(None, env={**SECRETS, "CONSENT_GATE_HMAC_KEY_FILE": str(tmp_path / "hmac")})
    assert settings.hmac_key == HMAC.encode()


def test_unreadable_secret_file_names_the_key(tmp_path: Path) -> None:
    message = error_of(None, {**SECRETS, "CONSENT_GATE_HMAC_KEY": "",
                              "CONSENT_GATE_HMAC_KEY_FILE": str(tmp_path / "missing")})
    assert "privacy.hmac_key" in message and str(tmp_path / "missing") in message


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [ari]
        url = "http://file:8088"
        app = "from-file"
        [ledger]
        dsn = "postgresql://file/db"
        journal_dir = "/file/journal"
        [recordings]
        dir = "/file/recordings"
    """)
    settings = load_settings(path, env={
        **SECRETS,
        "CONSENT_GATE_ARI_URL": "http://env:8088",
        "CONSENT_GATE_DSN": "postgresql://env/db",
        "CONSENT_GATE_JOURNAL_DIR": "/env/journal",
    })
    assert settings.ari_url == "http://env:8088"
    assert settings.database_dsn == "postgresql://env/db"
    assert settings.journal_dir == Path("/env/journal")
    # Not overridden: the file's values.
    assert settings.ari_app == "from-file"
    assert settings.recordings_dir == Path("/file/recordings")


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [dialog]
        accept_key = "5"
        decline_key = "9"
    """)
    settings = load_settings(None, env={**SECRETS, "CONSENT_GATE_CONFIG": str(path)})
    assert (settings.dialog.accept_key, settings.dialog.decline_key) == ("5", "9")


def test_a_full_file_parses(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [ledger]
        record_when_journaled = true
        write_timeout = 3
        [privacy]
        store_raw_number = true
        [prompts]
        default_language = "da"
        [dialog]
        digit_timeout = 7
        repeats = 2
        withdraw_code = "*9"
        [purposes.quality]
        legal_basis = "legitimate-interest"
        retention_days = 30
        [purposes.tax]
        legal_basis = "legal-obligation"
    """)
    settings = load_settings(path, env=SECRETS)
    assert settings.record_when_journaled is True and settings.ledger_write_timeout == 3.0
    assert settings.store_raw_number is True and settings.default_language == "da"
    assert settings.dialog.digit_timeout == 7.0 and settings.dialog.repeats == 2
    assert set(settings.purposes) == {"quality", "tax"}
    assert settings.purposes["quality"].prompt == "question-quality"
    assert settings.purposes["tax"].prompt == "notice-legal-obligation"
    assert settings.purposes["tax"].retention_days == 1825


@pytest.mark.parametrize(
    "toml, must_name",
    [
        # legal basis
        ('[purposes.training]\nlegal_basis = "concent"\n', "purposes.training.legal_basis"),
        ('[purposes.training]\nlegal_basis = 1\n', "purposes.training.legal_basis"),
        ('[purposes.training]\nprompt = "x"\n', "purposes.training.legal_basis"),
        # purpose names and bodies
        ('[purposes.Training]\nlegal_basis = "consent"\n', "purposes.Training"),
        ('[purposes."call recording"]\nlegal_basis = "consent"\n', "purposes.call recording"),
        ('[purposes.training]\nlegal_basis = "consent"\nretention = 5\n', "purposes.training.retention"),
        ('[purposes.training]\nlegal_basis = "consent"\nretention_days = 0\n', "purposes.training.retention_days"),
        ('[purposes.training]\nlegal_basis = "consent"\nprompt = "../etc/passwd"\n', "purposes.training.prompt"),
        # unknown keys and sections
        ('[dialgo]\naccept_key = "1"\n', "dialgo"),
        ('[dialog]\naccept_keys = "1"\n', "dialog.accept_keys"),
        ('[ledger]\nrecord_when_journalled = true\n', "ledger.record_when_journalled"),
        ('[ari]\npassword = "inline secrets are not supported"\n', "ari.password"),
        ('[privacy]\nhmac_key = "inline secrets are not supported"\n', "privacy.hmac_key"),
        ('[prompts]\nlanguage = "da"\n', "prompts.language"),
        ('[recordings]\npath = "/x"\n', "recordings.path"),
        ('ari = "not a table"\n', "ari"),
        # keys
        ('[dialog]\naccept_key = "2"\n', "accept_key"),
        ('[dialog]\ndecline_key = "1"\n', "decline_key"),
        ('[dialog]\naccept_key = "A"\n', "dialog.accept_key"),
        ('[dialog]\naccept_key = "12"\n', "dialog.accept_key"),
        ('[dialog]\naccept_key = 1\n', "dialog.accept_key"),
        ('[dialog]\nwithdraw_code = "*"\n', "dialog.withdraw_code"),
        # timeouts and counts
        ('[dialog]\ndigit_timeout = 0.2\n', "dialog.digit_timeout"),
        ('[dialog]\ndigit_timeout = 600\n', "dialog.digit_timeout"),
        ('[dialog]\ndigit_timeout = "5"\n', "dialog.digit_timeout"),
        ('[dialog]\ndigit_timeout = true\n', "dialog.digit_timeout"),
        ('[dialog]\nrepeats = 9\n', "dialog.repeats"),
        ('[dialog]\nrepeats = 1.5\n', "dialog.repeats"),
        ('[ledger]\nwrite_timeout = 0\n', "ledger.write_timeout"),
        ('[ledger]\nwrite_timeout = "2"\n', "ledger.write_timeout"),
        ('[ledger]\nrecord_when_journaled = "yes"\n', "ledger.record_when_journaled"),
        ('[privacy]\nstore_raw_number = 1\n', "privacy.store_raw_number"),
        ('[ari]\nurl = 8088\n', "ari.url"),
        ('[prompts]\ndefault_language = "english"\n', "prompts.default_language"),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, toml: str, must_name: str) -> None:
    path = write(tmp_path, toml)
    message = error_of(path)
    assert must_name in message, message
    assert str(path) in message, message


def test_empty_purposes_table_is_an_error(tmp_path: Path) -> None:
    assert "purposes" in error_of(write(tmp_path, "[purposes]\n"))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[dialog\n")
    assert str(path) in error_of(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert str(path) in error_of(path)


# -- issue 16, case 12: secrets out of repr, arguments that break the dialplan, remote API ------

def test_repr_and_str_show_no_secret(tmp_path: Path) -> None:
    secrets = {"CONSENT_GATE_HMAC_KEY": "hmac-secret-value-0123456789",
               "CONSENT_GATE_ARI_PASSWORD": "ari-secret-value",
               "CONSENT_GATE_AMI_SECRET": "ami-secret-value",
               "CONSENT_GATE_DSN": "postgresql://gate:dsn-secret-value@db.example/consent_gate"}
    settings = load_settings(None, env=secrets)
    assert settings.ami_secret == "ami-secret-value"  # loaded, only not shown
    for text in (repr(settings), str(settings)):
        for value in secrets.values():
            assert value not in text and "dsn-secret-value" not in text, text
    assert "ari_url=" in repr(settings)  # the rest is still there for debugging


@pytest.mark.parametrize("value", ["/srv/sounds:x", "/srv/so,unds", "/srv/my sounds", "relative/sounds",
                                   "/srv/$(id)", "/srv/" + "a" * 200])
def test_asterisk_dir_that_breaks_dialplan_arguments_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[prompts]\nasterisk_dir = {value!r}\n")
    message = error_of(path)
    assert "prompts.asterisk_dir" in message and str(path) in message, message
    # The environment override is checked the same way.
    assert "prompts.asterisk_dir" in error_of(None, {**SECRETS, "CONSENT_GATE_ASTERISK_SOUNDS_DIR": value})


def test_a_normal_asterisk_dir_loads(tmp_path: Path) -> None:
    path = write(tmp_path, '[prompts]\nasterisk_dir = "/usr/share/asterisk/sounds/consent-gate_v2.1"\n')
    assert load_settings(path, env=SECRETS).asterisk_prompts_dir == "/usr/share/asterisk/sounds/consent-gate_v2.1"


@pytest.mark.parametrize("listen", ["0.0.0.0:8089", "192.168.1.10:8089", "[::]:8089", "crm.example:8089"])
def test_api_on_a_non_loopback_address_needs_allow_remote(tmp_path: Path, listen: str) -> None:
    message = error_of(write(tmp_path, f'[api]\nlisten = "{listen}"\n'))
    assert "api.listen" in message and "api.allow_remote = true" in message, message
    assert "api.listen" in error_of(None, {**SECRETS, "CONSENT_GATE_API_LISTEN": listen})
    allowed = load_settings(write(tmp_path, f'[api]\nlisten = "{listen}"\nallow_remote = true\n'), env=SECRETS)
    assert allowed.api_listen == listen and allowed.api_allow_remote is True


@pytest.mark.parametrize("listen", ["127.0.0.1:8089", "127.0.0.2:9000", "[::1]:8089", "localhost:8089"])
def test_api_on_loopback_needs_nothing(tmp_path: Path, listen: str) -> None:
    settings = load_settings(write(tmp_path, f'[api]\nlisten = "{listen}"\n'), env=SECRETS)
    assert settings.api_listen == listen and settings.api_allow_remote is False


def test_recordings_owner(tmp_path: Path) -> None:
    assert load_settings(None, env=SECRETS).recordings_owner == "asterisk"
    assert load_settings(write(tmp_path, '[recordings]\nowner = "pbx"\n'), env=SECRETS).recordings_owner == "pbx"
    assert load_settings(None, env={**SECRETS, "CONSENT_GATE_RECORDINGS_OWNER": "101"}).recordings_owner == "101"
    assert "recordings.owner" in error_of(write(tmp_path, '[recordings]\nowner = "bad user"\n'))
