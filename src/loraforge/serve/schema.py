"""What a request to the server may hold, how its body is read, and the OpenAI error shape.

A body is read in this order, each step a 400 with an OpenAI error body that names the problem:
UTF-8 text (as RFC 8259 and OpenAI ask) -> nesting at most `MAX_JSON_DEPTH`, checked on the bytes before
parsing (Python's parser recurses once per level: 100,000 `[` were a RecursionError and a 500) -> JSON
without NaN/Infinity -> no lone surrogates (`"\\ud800"` parses to a string no tokenizer can take) -> the
request schema. The schemas are strict where OpenAI is: `max_tokens: true` or `stream: "yes"` are refused,
not coerced; an integer is a valid float, and `null` means the default, as in OpenAI's schema.

OpenAI parameters the server cannot honour are refused (400, `code: "unsupported_parameter"`, `param`
naming it) rather than silently ignored, unless they hold their neutral value (`n: 1`, `tools: []`,
`presence_penalty: 0`, `response_format: {"type": "text"}`...), which some clients always send. Fields
OpenAI does not define, and ones that do not change the answer (`user`, `store`, `metadata`), are ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MAX_JSON_DEPTH = 32  # a chat request nests 5 deep ({messages: [{content: [{text}]}]}); 32 leaves room
MAX_STOPS = 4  # OpenAI's limit
# Longer stop strings are refused: each decode step searches the new text plus the longest stop's length
# (engine.find_stop), so the length bounds the work per token; no real stop sequence is this long.
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions' `logprobs` allows 5)

# Parameter -> whether its value asks for nothing (then it is accepted and ignored). Anything else is refused.
_UNSUPPORTED: dict[str, Any] = {
    "n": lambda v: not isinstance(v, int) or v <= 1,  # other values: the schema's own message
    "best_of": lambda v: v == 1,
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object. Text that came from the client is made encodable (a lone surrogate in a
    message would make the JSON response itself fail to encode)."""
    def clean(s: str | None) -> str | None:
        return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": clean(message), "type": type_, "param": clean(param), "code": code}}


# -------------------------------------------------------------------------------------------------------
# Schemas


def refuse_unsupported(data: Any) -> None:
    """An `APIError` (400) for the first OpenAI parameter in the body `data` that this server does not honour."""
    if not isinstance(data, dict):
        return
    for name, neutral in _UNSUPPORTED.items():
        value = data.get(name)
        if value is None or neutral(value):
            continue
        if name == "n":
            why = "n > 1 is not supported: send n requests (they are batched together on the server)."
        elif name == "response_format":
            why = "Only response_format {\"type\": \"text\"} is supported (no JSON mode or schemas)."
        elif name in ("tools", "functions", "tool_choice", "function_call"):
            why = f"{name} is not supported: this server does not call tools or functions."
        else:
            why = f"{name} is not supported by this server; leave it out."
        raise APIError(400, why, param=name, code="unsupported_parameter")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI clients send fields we do not use


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with no choices and the request's token counts


class Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # same seed and request: same answer

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's schema types these "... or null", null meaning the default; some clients send it
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop sequences given; at most {MAX_STOPS} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            longest = max(map(len, stops))
            raise ValueError(f"a stop sequence is {longest} characters long; at most {MAX_STOP_CHARS} are allowed")
        return stop

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's logprob comes with; None: no logprobs."""
        return None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):  # a field validator, so that `param` names it
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: an int, the number of alternatives

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


# -------------------------------------------------------------------------------------------------------
# Reading a body


def read_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The request `model` in the JSON body `raw`, or an `APIError` (400) that names what is wrong."""
    try:
        text = raw.decode("utf-8")  # strict: also makes the byte-level depth scan below exact
    except UnicodeDecodeError as e:
        raise APIError(400, f"The request body is not UTF-8 text (byte {e.start} is invalid).",
                       code="invalid_json") from None
    if _deeper_than(raw, MAX_JSON_DEPTH):
        raise APIError(400, f"The request body nests JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep.",
                       code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    except ValueError as e:  # NaN/Infinity, or a number of over 4,300 digits (Python's int conversion limit)
        raise APIError(400, f"The request body is not valid JSON: {str(e).split(';')[0]}.",
                       code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):  # only a \uD800-\uDFFF escape can make one: walk the data only then
        where = _first_surrogate(data, "")
        if where is not None:
            raise APIError(400, f"{where or 'The body'} holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF "
                                "escape), which is not text; send valid Unicode.", param=where or None,
                           code="invalid_unicode")
    refuse_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = _param(first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
        raise APIError(400, f"Invalid request: {param or 'body'}: {message} ({e.error_count()} error(s)).",
                       param=param or None, code="invalid_value") from None


# A JSON string, escapes included. An unterminated one runs to the end (the closing quote is optional), so
# that a body of unbalanced quotes is one linear pass rather than a retry from every quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.array([1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)], dtype=np.int64)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON text `raw` nests more than `limit` levels, found without parsing it: strings
    removed, then the running sum of +1 per opening and -1 per closing bracket (a regex and numpy: a 1 MiB
    body of brackets takes milliseconds). UTF-8 keeps every byte below 0x80 an ASCII character, so this is
    exact for the part of the body a parser reads before it finds an error."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # fewer openings than the limit: the usual request
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return len(brackets) > 0 and int(np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, np.uint8)]).max()) > limit


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _first_surrogate(value: Any, where: str) -> str | None:
    """The path (as in `param`) of the first string or key holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _first_surrogate(item, f"{where}.{i}" if where else str(i))) is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            key_text = key.encode("utf-8", "backslashreplace").decode("utf-8")  # a key may be the culprit
            path = f"{where}.{key_text}" if where else key_text
            if (found := _first_surrogate(key, path)) is not None or \
                    (found := _first_surrogate(item, path)) is not None:
                return found
    return None


def _param(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as OpenAI's `param` (`messages.0.content`), without the member tags
    pydantic adds inside a union (`str`, `list[TextPart]`, ...)."""
    tags = {"str", "int", "float", "bool"}
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in tags)))
