"""Settings of the OpenAI-compatible HTTP server (``tidellm serve``), separate from the engine's.

Like the engine configs, every field documents itself and the CLI builds its flags from these fields.
A field may name an environment variable in ``metadata["env"]``: the flag then *defaults* to that
variable's value (and says so in ``--help``), so a setting is read from one place, never silently from two.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidellm.config.engine import _f

API_KEY_ENV = "TIDELLM_API_KEY"
TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # see entrypoints/openai/tool_parsers


@dataclass
class ServerConfig:
    host: str = _f(
        "127.0.0.1",
        "Address to listen on. The default only accepts local connections; use 0.0.0.0 to serve the network.",
    )
    port: int = _f(8000, "TCP port to listen on.")
    served_model_name: str | None = _f(
        None,
        "Model name clients send in the 'model' field and that /v1/models lists (default: the model argument).",
    )
    api_key: str | None = _f(
        None,
        "Require 'Authorization: Bearer KEY' on /v1/* and /tokenize, /detokenize (default: $TIDELLM_API_KEY, "
        "unset = no auth).",
        env=API_KEY_ENV,
    )
    chat_template: str | None = _f(
        None, "Chat template: a Jinja file path or the template text; overrides the model's own template."
    )
    tool_call_parser: str | None = _f(
        None,
        "How tool calls are read from the model's reply on /v1/chat/completions: hermes (<tool_call>{...}"
        '</tool_call>: Qwen2.5, Hermes) or llama3_json ({"name": ..., "parameters": ...}: Llama 3.1+). '
        "Default: detected from the chat template (hermes when it shows neither).",
        choices=TOOL_CALL_PARSERS,
    )
    log_level: str = _f("INFO", "Log level of tidellm and the engine process: debug, info, warning or error.")
    access_log: bool = _f(False, "Log one line per HTTP request.")
    shutdown_timeout: float = _f(
        30.0, "On SIGTERM, seconds to let in-flight requests finish before they are cancelled."
    )
    engine_startup_timeout: float = _f(
        600.0, "Seconds to wait for the engine process to load the model and report ready."
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (got {self.port}).")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 (got {self.shutdown_timeout}).")
        if self.engine_startup_timeout <= 0:
            raise ValueError(f"engine_startup_timeout must be > 0 (got {self.engine_startup_timeout}).")
        self.log_level = self.log_level.upper()
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(
                f"log_level must be debug, info, warning or error (got {self.log_level.lower()!r})."
            )
        if self.api_key == "":
            self.api_key = None
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)} (got {self.tool_call_parser!r})."
            )
