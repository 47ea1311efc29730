"""Settings from the environment: defaults, engine choice, per-role models, one-line errors."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, Settings, load_settings

KEY = "sk-test-SECRET-0123456789abcdef"


def test_defaults_without_a_key_are_the_offline_engine() -> None:
    settings = load_settings()
    assert settings.spinbot_engine == "auto"
    assert settings.engine == "offline"
    assert settings.openai_api_key is None
    assert settings.chroma_host is None
    assert settings.chroma_port == 8000
    assert settings.spinbot_model == "gpt-4o-mini"
    assert settings.model_for("coach") == "gpt-4o-mini"


def test_spinbot_home_drives_the_index_and_transcript_folders(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINBOT_HOME", str(tmp_path / "h"))
    settings = load_settings()
    assert settings.index_dir == tmp_path / "h" / "index"
    assert settings.transcripts_dir == tmp_path / "h" / "transcripts"


def test_a_key_selects_the_llm_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert load_settings().engine == "llm"


def test_a_blank_key_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "   ")
    assert load_settings().engine == "offline"


def test_offline_can_be_forced_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("SPINBOT_ENGINE", "offline")
    assert load_settings().engine == "offline"


def test_per_role_model_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINBOT_MODEL", "deepseek-chat")
    monkeypatch.setenv("SPINBOT_GRADER_MODEL", "deepseek-reasoner")
    monkeypatch.setenv("SPINBOT_COACH_MODEL", "")  # empty means: use SPINBOT_MODEL
    settings = load_settings()
    assert settings.model_for("grader") == "deepseek-reasoner"
    assert settings.model_for("buyer") == "deepseek-chat"
    assert settings.model_for("coach") == "deepseek-chat"


def test_chroma_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMA_HOST", "localhost")
    monkeypatch.setenv("CHROMA_PORT", "8123")
    settings = load_settings()
    assert (settings.chroma_host, settings.chroma_port) == ("localhost", 8123)


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("SPINBOT_ENGINE", "fast", "use auto, llm or offline"),
        ("CHROMA_PORT", "abc", "port number"),
        ("CHROMA_PORT", "70000", "port number"),
        ("OPENAI_BASE_URL", "ftp://x", "http(s) URL"),
        ("SPINBOT_TIMEOUT", "0", "greater than 0"),
        ("SPINBOT_MAX_RETRIES", "-1", "0 to 10"),
        ("SPINBOT_MODEL", "", "chat model"),
    ],
)
def test_bad_values_raise_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fix: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable} is invalid"), message
    assert fix in message
    assert "\n" not in message
    assert KEY not in message


def test_llm_engine_without_a_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINBOT_ENGINE", "llm")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "SPINBOT_ENGINE=llm" in message and "OPENAI_API_KEY" in message
    assert "\n" not in message


def test_the_key_never_shows_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    settings = load_settings()
    assert KEY not in repr(settings)
    assert KEY not in str(settings)
    assert KEY not in settings.model_dump_json()
    assert settings.openai_api_key is not None and settings.openai_api_key.get_secret_value() == KEY


def test_dotenv_is_read_when_enabled(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("SPINBOT_MODEL=qwen-plus\nSPINBOT_ENGINE=offline\n", encoding="utf-8")
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    assert settings.spinbot_model == "qwen-plus"
    assert settings.engine == "offline"
    # A real environment variable beats the file.
    monkeypatch.setenv("SPINBOT_MODEL", "gpt-4o")
    assert Settings(_env_file=env).spinbot_model == "gpt-4o"  # type: ignore[call-arg]
