"""The server's configuration, in one model.

Values come from, highest priority first: keyword arguments, environment variables with the
prefix ``CODOMYRMEX_SANDBOX_``, and an optional TOML file (``--config``). Built once, in the entry
point or by the caller of the Python API; nothing reads configuration at import time.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from codomyrmex_sandbox.errors import InvalidRequestError
from codomyrmex_sandbox.models import MIB

ENV_PREFIX = "CODOMYRMEX_SANDBOX_"


def default_concurrency() -> int:
    """Two sandboxes per core, fewer if memory for the default limit runs short; at least two."""
    cores = os.cpu_count() or 2
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB
    except (ValueError, OSError):
        memory_mb = 4096
    return max(2, min(2 * cores, memory_mb // 512))


_config_file: ContextVar[dict[str, Any] | None] = ContextVar("_config_file", default=None)


class _TomlValues(PydanticBaseSettingsSource):
    """The values read from the --config file, lowest priority."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # noqa: ANN401, ARG002 - pydantic-settings' signature
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_config_file.get() or {})


class Settings(BaseSettings):
    """Operator settings. Per-call arguments may lower limits, never raise them above the caps here."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    backend: Literal["docker", "fake"] = Field(
        default="docker", description="Isolation backend: docker (default) or fake (tests only)."
    )
    languages: list[str] | None = Field(
        default=None, description="Languages to enable; default every runtime found in the runtimes folder."
    )

    default_timeout_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    max_timeout_seconds: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 300.0
    default_memory_mb: Annotated[int, Field(ge=16)] = 256
    max_memory_mb: Annotated[int, Field(ge=16, le=1_048_576)] = 2048

    cpus: Annotated[float, Field(gt=0, le=256, allow_inf_nan=False)] = 1.0
    pids_limit: Annotated[int, Field(ge=8, le=65_536)] = 128
    open_files_limit: Annotated[int, Field(ge=16, le=1_048_576)] = 256
    file_size_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 64
    scratch_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 64

    max_output_bytes: Annotated[int, Field(ge=1024, le=256 * MIB)] = MIB
    max_code_bytes: Annotated[int, Field(ge=1, le=64 * MIB)] = MIB
    max_stdin_bytes: Annotated[int, Field(ge=0, le=64 * MIB)] = MIB

    max_concurrent_executions: Annotated[int, Field(ge=1, le=1024)] = Field(
        default_factory=default_concurrency,
        description="Executions running at once; default sized to the machine's cores and memory.",
    )
    max_queued_executions: Annotated[int, Field(ge=0, le=10_000)] = 16
    max_queue_wait_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0
    audit_log_path: Path | None = Field(
        default=None, description="Append-only JSON Lines audit log; records also always go to stderr."
    )
    reaper_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    pool_size: Annotated[int, Field(ge=0, le=64)] = Field(
        default=2, description="Sandboxes kept started ahead of demand per language; 0 disables the pool."
    )
    pool_max_age_seconds: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=300.0, description="Idle pool members older than this are replaced."
    )

    network: Literal["none"] = Field(
        default="none", description="Network mode of sandboxes; only none exists in this version."
    )
    oci_runtime: str | None = Field(
        default=None, description="OCI runtime for sandboxes, e.g. runsc (gVisor); default the engine's."
    )
    docker_host: str | None = Field(
        default=None, description="Engine address; default DOCKER_HOST or the local socket."
    )
    image_prefix: str = Field(default="codomyrmex-sandbox", pattern=r"^[a-z0-9][a-z0-9._/-]{0,100}$")
    runtimes_dir: Path | None = Field(
        default=None, description="Folder of runtime recipes; default the one shipped with the package."
    )
    kill_grace_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> Self:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("default_timeout_seconds must not exceed max_timeout_seconds")
        if self.default_memory_mb > self.max_memory_mb:
            raise ValueError("default_memory_mb must not exceed max_memory_mb")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files: configuration is explicit
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlValues(settings_cls)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:  # noqa: ANN401
        """Build settings from the environment and an optional TOML file.

        Raises InvalidRequestError with a readable message when the file or a value is wrong.
        """
        values: dict[str, Any] | None = None
        if config_file is not None:
            try:
                values = tomllib.loads(config_file.read_text(encoding="utf-8"))
            except OSError as exc:
                raise InvalidRequestError(f"cannot read config file {config_file}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise InvalidRequestError(f"config file {config_file} is not valid TOML: {exc}") from exc
        token = _config_file.set(values)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidRequestError(
                f"invalid configuration ({problems}); fix the {ENV_PREFIX}* environment variables or the --config file."
            ) from exc
        finally:
            _config_file.reset(token)
