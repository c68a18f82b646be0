"""Request bodies of the OpenAI- and Ollama-compatible endpoints, validated by pydantic.

Fields graftlm does not implement are declared where a client could reasonably send them, and
rejected (400) only when they ask for something other than the default; anything else unknown is
ignored, as the reference servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from graftlm.engine.sampling import SEED_END, SEED_MIN

MAX_STOP_STRINGS = 16
MAX_LISTED_ERRORS = 5


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def describe_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One line for pydantic's validation errors, and the first offending field."""
    if not errors:
        return "invalid request", None
    parts = [
        f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors[:MAX_LISTED_ERRORS]
    ]
    more = f" (and {len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > MAX_LISTED_ERRORS else ""
    return "invalid request: " + "; ".join(parts) + more, _location(tuple(errors[0].get("loc", ())))


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- OpenAI ------------------------------------------------------------------------------------


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """The {"role", "content"} dict a chat template expects ("developer" reads as "system")."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Lenient):
    include_usage: bool = False


class _OpenAISampling(_Lenient):
    model: str | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Counts and seeds are strict: `true` or "5" is a client bug to report, not a number to guess.
    max_tokens: int | None = Field(None, ge=0, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, strict=True)  # an extension (vLLM, llama.cpp)
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, strict=True)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    ignore_eos: bool = False  # an extension (vLLM): keep generating past end-of-sequence tokens
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not implemented: leave it out or empty")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        return _stop_list(value) or None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not implemented: leave it 0")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, strict=True)
    logprobs: Literal[False] | None = None  # log-probabilities are not implemented
    top_logprobs: Literal[0] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=0, strict=True)  # the OpenAI default for this endpoint
    best_of: int | None = Field(None, ge=1, le=1, strict=True, description="only one candidate per request")
    echo: Literal[False] = False
    suffix: None = None
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (batches of prompts are not supported)")
            return value[0]
        return value


# -- Ollama ------------------------------------------------------------------------------------


class OllamaOptions(_Lenient):
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context is full (as -2)
    temperature: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        return _stop_list(value) or None


class OllamaMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: None | list[str] = Field(None, max_length=0, description="images are not supported")


class _OllamaRequest(_Lenient):
    model: str
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    format: None = Field(None, description="structured output is not supported")


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: None | list[str] = Field(None, max_length=0, description="images are not supported")
    suffix: None = None
    template: None = None


class OllamaShowRequest(_Lenient):
    model: str | None = None
    name: str | None = None  # the older spelling
