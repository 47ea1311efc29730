"""Settings from the environment (and an optional .env file), validated in one place."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Engine = Literal["llm", "offline"]
Role = Literal["buyer", "grader", "coach"]

REPO_ROOT = Path(__file__).resolve().parent.parent
KNOWLEDGE_DIR = REPO_ROOT / "knowledge"
PROMPTS_DIR = REPO_ROOT / "prompts"
EVALS_DIR = REPO_ROOT / "evals"

# One line per variable: what it is for and how to fix a bad value.
FIXES: dict[str, str] = {
    "OPENAI_API_KEY": "set it to your provider's API key, or unset it to use the offline engine",
    "OPENAI_BASE_URL": "use an http(s) URL such as https://api.deepseek.com/v1 or http://127.0.0.1:11434/v1",
    "SPINBOT_ENGINE": "use auto, llm or offline",
    "SPINBOT_MODEL": "name a chat model your endpoint serves, e.g. gpt-4o-mini",
    "SPINBOT_BUYER_MODEL": "name a chat model, or leave it empty to use SPINBOT_MODEL",
    "SPINBOT_GRADER_MODEL": "name a chat model, or leave it empty to use SPINBOT_MODEL",
    "SPINBOT_COACH_MODEL": "name a chat model, or leave it empty to use SPINBOT_MODEL",
    "SPINBOT_EMBED_MODEL": "name an embedding model your endpoint serves, e.g. text-embedding-3-small",
    "SPINBOT_HOME": "use a writable folder path",
    "SPINBOT_TIMEOUT": "use a number of seconds greater than 0, e.g. 60",
    "SPINBOT_MAX_RETRIES": "use a whole number from 0 to 10",
    "SPINBOT_CONCURRENCY": "use a whole number from 1 to 64",
    "CHROMA_HOST": "use a host name such as localhost, or leave it empty for the embedded index",
    "CHROMA_PORT": "use a port number from 1 to 65535",
    "SPINBOT_AUTH": "use user:password (both non-empty), or leave it empty",
}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and the fix."""


class Settings(BaseSettings):
    """Every knob spinbot reads from the environment."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    spinbot_engine: Literal["auto", "llm", "offline"] = Field(default="auto", alias="SPINBOT_ENGINE")
    spinbot_model: str = Field(default="gpt-4o-mini", alias="SPINBOT_MODEL", min_length=1)
    spinbot_buyer_model: str | None = Field(default=None, alias="SPINBOT_BUYER_MODEL")
    spinbot_grader_model: str | None = Field(default=None, alias="SPINBOT_GRADER_MODEL")
    spinbot_coach_model: str | None = Field(default=None, alias="SPINBOT_COACH_MODEL")
    spinbot_embed_model: str = Field(default="text-embedding-3-small", alias="SPINBOT_EMBED_MODEL", min_length=1)
    spinbot_home: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("spinbot")), alias="SPINBOT_HOME"
    )
    spinbot_timeout: float = Field(default=60.0, gt=0, alias="SPINBOT_TIMEOUT")
    spinbot_max_retries: int = Field(default=3, ge=0, le=10, alias="SPINBOT_MAX_RETRIES")
    # LLM calls in flight in evals; 429s are retried with backoff, so a high default is safe.
    spinbot_concurrency: int = Field(default=32, ge=1, le=64, alias="SPINBOT_CONCURRENCY")
    chroma_host: str | None = Field(default=None, alias="CHROMA_HOST")
    chroma_port: int = Field(default=8000, ge=1, le=65535, alias="CHROMA_PORT")
    spinbot_auth: SecretStr | None = Field(default=None, alias="SPINBOT_AUTH")

    @field_validator(
        "openai_api_key",
        "openai_base_url",
        "spinbot_buyer_model",
        "spinbot_grader_model",
        "spinbot_coach_model",
        "chroma_host",
        "spinbot_auth",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("spinbot_auth")
    @classmethod
    def _user_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            user, _, password = value.get_secret_value().partition(":")
            if not user or not password:
                raise ValueError("not user:password")
        return value

    def ui_auth(self, host: str, *, no_auth: bool = False) -> tuple[str, str] | None:
        """Credentials for the web app. Loopback needs none; any other address needs SPINBOT_AUTH
        unless the operator explicitly chose --no-auth."""
        if self.spinbot_auth is not None:
            user, _, password = self.spinbot_auth.get_secret_value().partition(":")
            return user, password
        if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.") or no_auth:
            return None
        raise ConfigError(
            f"serving on {host} exposes the app beyond this machine: set SPINBOT_AUTH=user:password, "
            "or pass --no-auth to serve without a password"
        )

    @cached_property
    def engine(self) -> Engine:
        """The engine in use: `auto` means llm when an API key is set."""
        if self.spinbot_engine == "auto":
            return "llm" if self.openai_api_key else "offline"
        if self.spinbot_engine == "llm" and not self.openai_api_key:
            raise ConfigError(
                "SPINBOT_ENGINE=llm needs OPENAI_API_KEY: set the key, or use SPINBOT_ENGINE=offline"
            )
        return self.spinbot_engine

    def model_for(self, role: Role) -> str:
        """Chat model for one role: the per-role override, else SPINBOT_MODEL."""
        override = {
            "buyer": self.spinbot_buyer_model,
            "grader": self.spinbot_grader_model,
            "coach": self.spinbot_coach_model,
        }[role]
        return override or self.spinbot_model

    @property
    def index_dir(self) -> Path:
        return self.spinbot_home / "index"

    @property
    def transcripts_dir(self) -> Path:
        return self.spinbot_home / "transcripts"


def load_settings() -> Settings:
    """Read settings; any bad value becomes one ConfigError line naming the variable and the fix."""
    try:
        settings = Settings()
        _ = settings.engine
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        variable = _variable_name(field)
        raise ConfigError(
            f"{variable} is invalid ({error['msg']}): {FIXES.get(variable, 'check its value')}"
        ) from None
    return settings


def _variable_name(field: str) -> str:
    for name, info in Settings.model_fields.items():
        if field in (name, info.alias):
            return info.alias or name.upper()
    return field.upper()
