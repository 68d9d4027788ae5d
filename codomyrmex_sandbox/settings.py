"""The server's configuration, in one model.

Values come from, highest priority first: keyword arguments, environment variables with the
prefix ``CODOMYRMEX_SANDBOX_``, and an optional TOML file (``--config``). Built once, in the entry
point or by the caller of the Python API; nothing reads configuration at import time.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from codomyrmex_sandbox.errors import ConfigurationError
from codomyrmex_sandbox.models import MIB

ENV_PREFIX = "CODOMYRMEX_SANDBOX_"
# Signed 32-bit: some programs still store a uid in an int, and (uid_t)-1 means "no change".
MAX_SANDBOX_UID = 2**31 - 2


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


class LimitFields(BaseModel):
    """The limit settings, declared once: the base settings carry them, and so does each policy."""

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
    # Files in and out (see MCP_TOOL_SPECIFICATION.md, "Files"): uploads are decoded bytes.
    max_input_files: Annotated[int, Field(ge=0, le=10_000)] = 64
    max_input_bytes: Annotated[int, Field(ge=0, le=1024 * MIB)] = 16 * MIB
    max_output_files: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=32, description="Files returned with their content; the rest are listed with omitted over_count."
    )
    max_output_file_bytes: Annotated[int, Field(ge=1024, le=256 * MIB)] = Field(
        default=4 * MIB, description="The largest file or figure returned with its content."
    )
    max_output_files_bytes: Annotated[int, Field(ge=0, le=1024 * MIB)] = Field(
        default=16 * MIB, description="The content of all returned files together (figures have their own cap)."
    )
    max_figures: Annotated[int, Field(ge=0, le=256)] = 16
    network: Literal["none", "egress"] = Field(
        default="none",
        description="none (default): no network. egress: the public internet only, never the host, "
        "private ranges, link-local/metadata addresses or other sandboxes.",
    )


class LimitPolicy(LimitFields):
    """The limits one language runs under: a default and a cap for what a call may choose (timeout,
    memory), and fixed values for the rest. A call may lower its timeout and memory, never raise
    them above the caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> Self:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("default_timeout_seconds must not exceed max_timeout_seconds")
        if self.default_memory_mb > self.max_memory_mb:
            raise ValueError("default_memory_mb must not exceed max_memory_mb")
        if self.max_input_bytes > self.scratch_mb * MIB:
            raise ValueError("max_input_bytes must not exceed the scratch space (scratch_mb): uploads live there")
        return self


LIMIT_FIELDS = tuple(LimitPolicy.model_fields)

# Named sets of limits; an operator selects one per server (`profile`) and may define more.
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "strict": {
        "default_timeout_seconds": 10.0,
        "max_timeout_seconds": 30.0,
        "default_memory_mb": 128,
        "max_memory_mb": 512,
        "cpus": 0.5,
        "pids_limit": 64,
        "open_files_limit": 128,
        "file_size_mb": 16,
        "scratch_mb": 32,
        "max_output_bytes": 256 * 1024,
        "max_code_bytes": 256 * 1024,
        "max_stdin_bytes": 256 * 1024,
        "max_input_files": 16,
        "max_input_bytes": 4 * MIB,
        "max_output_files": 16,
        "max_output_file_bytes": MIB,
        "max_output_files_bytes": 4 * MIB,
        "max_figures": 8,
    },
    "data-science": {
        "default_timeout_seconds": 120.0,
        "max_timeout_seconds": 900.0,
        "default_memory_mb": 1024,
        "max_memory_mb": 8192,
        "cpus": 2.0,
        "pids_limit": 256,
        "file_size_mb": 512,
        "scratch_mb": 1024,
        "max_output_bytes": 4 * MIB,
        "max_input_files": 256,
        "max_input_bytes": 128 * MIB,
        "max_output_files": 64,
        "max_output_file_bytes": 16 * MIB,
        "max_output_files_bytes": 64 * MIB,
        "max_figures": 32,
    },
}


class Settings(BaseSettings, LimitFields):
    """Operator settings. Per-call arguments may lower limits, never raise them above the caps here."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    backend: Literal["docker", "fake"] = Field(
        default="docker", description="Isolation backend: docker (default) or fake (tests only)."
    )
    languages: list[str] | None = Field(
        default=None, description="Languages to enable; default every runtime found in the runtimes folder."
    )

    profile: str = Field(default="default", description="The named set of limits this server applies.")
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Operator-defined profiles (limit name -> value), beside the built-in ones."
    )
    language_limits: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-language limit overrides, applied on top of the profile."
    )

    max_concurrent_executions: Annotated[int, Field(ge=1, le=1024)] = Field(
        default_factory=default_concurrency,
        description="Executions running at once; default sized to the machine's cores and memory.",
    )
    max_queued_executions: Annotated[int, Field(ge=0, le=10_000)] = 16
    max_queue_wait_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0
    result_stream_bytes: Annotated[int, Field(ge=1024, le=256 * MIB)] = Field(
        default=32 * 1024,
        description="UTF-8 bytes of each stream (stdout, stderr) and of the return value that an MCP "
        "tool result carries; beyond it the result keeps the head and the tail, with a marker line "
        "saying how many bytes were left out. The Python API always returns the whole output.",
    )
    result_content_blocks: Literal["all", "images", "none"] = Field(
        default="all",
        description="Which returned files and figures an MCP result carries as content blocks: all (an "
        "image per figure and image file, an embedded resource per other file), images (figures and "
        "image files only), or none (the structured content still lists every entry, with the text of "
        "text files). For clients that turn the whole result into the model's text (google-genai, "
        "llama-index), where an image is only base64 the model cannot see.",
    )
    max_sessions: Annotated[int, Field(ge=0, le=1024)] = Field(
        default=8, description="Sessions open at once on this server; 0 turns sessions off."
    )
    max_sessions_per_client: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4, description="Sessions one client (a stdio connection, an HTTP principal) may hold open at once."
    )
    session_idle_timeout_seconds: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = Field(
        default=600.0,
        description="A session ends after this long without a call; create_session may ask for less, never more.",
    )
    session_max_lifetime_seconds: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = Field(
        default=3600.0, description="A session's hard end, counted from its creation, however busy it is."
    )
    session_pool_size: Annotated[int, Field(ge=0, le=64)] = Field(
        default=1,
        description="Sandboxes kept started for new sessions, per language, once that language's first session "
        "was created (none before); 0 starts each session's sandbox on demand.",
    )
    max_concurrent_executions_per_principal: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="Executions one HTTP principal may have running or queued at once; default half of "
        "max_concurrent_executions (at least 1). A principal at its limit is refused as busy, and never "
        "takes another principal's slot.",
    )

    # Remote use: MCP's streamable HTTP transport (see MCP_TOOL_SPECIFICATION.md, "Remote use").
    transport: Literal["stdio", "http"] = Field(
        default="stdio", description="stdio (default): one client, which started the server. http: streamable HTTP."
    )
    http_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=255,
        description="The address the HTTP transport listens on; any other than loopback needs authentication.",
    )
    http_port: Annotated[int, Field(ge=0, le=65_535)] = Field(
        default=8000, description="The HTTP transport's port (0: any free port, logged as http_listening)."
    )
    http_public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The MCP endpoint's URL as clients reach it (behind a proxy: its https URL, ending in "
        "/mcp); it names the resource in /.well-known/oauth-protected-resource. Default "
        "http://http_host:http_port/mcp.",
    )
    http_allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origin header values a request may carry (browsers send one); a request with any "
        "other Origin gets 403. Requests without Origin (agents, SDKs) are not affected.",
    )
    http_max_body_bytes: Annotated[int, Field(ge=1024, le=4096 * MIB)] | None = Field(
        default=None,
        description="The largest request body; larger ones get 413 without being read whole. Default: "
        "twice the code and stdin caps, plus the files cap in base64, plus 1 MiB.",
    )
    http_request_timeout_seconds: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = Field(
        default=30.0,
        description="A request's line and headers must arrive within this long of the connection opening "
        "(or of the previous answer), else the connection is closed; then its body, else 408. A client that "
        "trickles holds a connection no longer than this.",
    )
    http_max_connections: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=512, description="Concurrent HTTP connections and requests; beyond it, 503."
    )
    auth_tokens_file: Path | None = Field(
        default=None,
        description="Bearer tokens for the HTTP transport: lines 'NAME SHA256HEX' (the SHA-256 of a token, "
        "never the token; # comments). NAME is the principal. `codomyrmex-sandbox auth new-token NAME` makes one.",
    )
    auth_jwt_issuer: str | None = Field(
        default=None, description="JWT bearer tokens: the required iss claim (with auth_jwt_audience, auth_jwks_url)."
    )
    auth_jwt_audience: str | None = Field(default=None, description="JWT bearer tokens: the required aud claim.")
    auth_jwks_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="JWT bearer tokens: the issuer's JWKS (https, or http on loopback only); sub is the principal.",
    )
    insecure_no_auth: bool = Field(
        default=False,
        description="Serve HTTP without authentication: loopback addresses only, for development "
        "(`serve --insecure-no-auth`). Every caller is the principal 'anonymous'.",
    )
    metrics_public: bool = Field(
        default=False, description="Serve /metrics without authentication (default: it needs a token like /mcp)."
    )
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = Field(
        default=10.0,
        description="On SIGTERM over HTTP: stop accepting, let running calls finish this long, then kill and "
        "remove what is left and exit 0.",
    )
    audit_log_path: Path | None = Field(
        default=None, description="Append-only JSON Lines audit log; records also always go to stderr."
    )
    files_collect_seconds: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] = Field(
        default=2.0,
        description="How long looking at the files a program left may take (hashing included); beyond it the "
        "result lists what was seen and says files_complete false.",
    )
    reaper_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    pool_size: Annotated[int, Field(ge=0, le=64)] = Field(
        default=2, description="Sandboxes kept started ahead of demand per language; 0 disables the pool."
    )
    pool_max_age_seconds: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=300.0, description="Idle pool members older than this are replaced."
    )
    pool_idle_start_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=5.0,
        description="The pool fills lazily: at start-up only python gets one sandbox; each call of a "
        "language that ends lets its pool grow by one, up to pool_size; every language fills to "
        "pool_size once no call has started or ended for this long. 0 fills every language at start-up.",
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
    sandbox_uid_base: Annotated[int, Field(ge=1000, le=MAX_SANDBOX_UID)] = Field(
        default=1_000_000_000,
        description="First uid (and gid) that sandboxes run as; each live sandbox gets one of its own.",
    )
    sandbox_uid_count: Annotated[int, Field(ge=64, le=MAX_SANDBOX_UID)] = Field(
        default=1_000_000,
        description="How many uids from sandbox_uid_base sandboxes may use (more than can ever be live at once).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _uid_range_fits(self) -> Self:
        if self.sandbox_uid_base + self.sandbox_uid_count - 1 > MAX_SANDBOX_UID:
            raise ValueError(
                f"sandbox_uid_base + sandbox_uid_count - 1 must be at most {MAX_SANDBOX_UID} "
                "(uids above it are unsafe for many programs); lower one of them"
            )
        return self

    @model_validator(mode="after")
    def _jwt_settings_together(self) -> Self:
        jwt = {"auth_jwt_issuer": self.auth_jwt_issuer, "auth_jwt_audience": self.auth_jwt_audience}
        jwt["auth_jwks_url"] = self.auth_jwks_url
        given = [name for name, value in jwt.items() if value]
        if given and len(given) != len(jwt):
            missing = sorted(set(jwt) - set(given))
            raise ValueError(f"JWT authentication needs all of {', '.join(jwt)}; {', '.join(missing)} missing")
        return self

    @property
    def jwt_configured(self) -> bool:
        return self.auth_jwks_url is not None

    @property
    def auth_configured(self) -> bool:
        """Whether the HTTP transport can authenticate anyone (a tokens file or a JWT issuer)."""
        return self.auth_tokens_file is not None or self.jwt_configured

    def principal_concurrency(self) -> int:
        """Executions one principal may have running or queued at once."""
        if self.max_concurrent_executions_per_principal is not None:
            return self.max_concurrent_executions_per_principal
        return max(1, self.max_concurrent_executions // 2)

    def max_body_bytes(self) -> int:
        """The largest HTTP request body: twice the code and stdin caps (JSON escapes), the files cap
        as base64, and 1 MiB for the rest, for the most generous language."""
        if self.http_max_body_bytes is not None:
            return self.http_max_body_bytes
        languages = [None, *self.language_limits]
        return max(
            2 * (policy.max_code_bytes + policy.max_stdin_bytes) + -(-policy.max_input_bytes * 4 // 3) + MIB
            for policy in (self.policy(language) for language in languages)
        )

    @model_validator(mode="after")
    def _every_policy_is_valid(self) -> Self:
        if self.profile not in BUILTIN_PROFILES and self.profile not in self.profiles:
            known = sorted({*BUILTIN_PROFILES, *self.profiles})
            raise ValueError(f"unknown profile {self.profile!r}; known: {', '.join(known)}")
        base = {field: getattr(self, field) for field in LIMIT_FIELDS}
        checks: list[tuple[str, Callable[[], object]]] = [("the selected profile", self.policy)]
        checks += [(f"language_limits[{lang!r}]", partial(self.policy, lang)) for lang in self.language_limits]
        # Profiles not selected today are checked too: selecting one later must not be a surprise.
        checks += [
            (f"profile {name!r}", partial(LimitPolicy.model_validate, base | overrides))
            for name, overrides in self.profiles.items()
        ]
        for where, check in checks:
            try:
                check()
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                field = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{where}: {field + ': ' if field else ''}{first['msg']}") from exc
        return self

    def policy(self, language: str | None = None) -> LimitPolicy:
        """The limits for ``language``: these settings, then the profile, then the language's overrides."""
        values = {name: getattr(self, name) for name in LIMIT_FIELDS}
        values |= self.profiles.get(self.profile, BUILTIN_PROFILES.get(self.profile, {}))
        if language is not None:
            values |= self.language_limits.get(language, {})
        return LimitPolicy.model_validate(values)

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

        Raises ConfigurationError with a readable message when the file or a value is wrong.
        """
        values: dict[str, Any] | None = None
        if config_file is not None:
            try:
                values = tomllib.loads(config_file.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigurationError(f"cannot read config file {config_file}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigurationError(f"config file {config_file} is not valid TOML: {exc}") from exc
        token = _config_file.set(values)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigurationError(
                f"invalid configuration ({problems}); fix the {ENV_PREFIX}* environment variables or the --config file."
            ) from exc
        finally:
            _config_file.reset(token)
