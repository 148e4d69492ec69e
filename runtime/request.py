"""One generation request for every front end, checked once. Numpy-free.

The HTTP server (OpenAI's completions body; a chat route renders its messages into `prompt`
and shares the rest), the Triton model (its named inputs and vLLM-style
`sampling_parameters`) and library callers all build a `GenerationRequest`; building one
checks every field that does not depend on the artifact. `Engine.submit` adds the checks that
do (the prompt's tokens fit the cache and lie in the vocabulary, max_tokens within the
context, stop strings need a tokenizer). A bad field raises `FieldError` with the field's
canonical name (the OpenAI API's JSON name); each front end names it its own way.

Limits (docs/RELIABILITY.md): at most MAX_STOP stop strings of at most MAX_STOP_CHARS
characters together (held-back text and stop-string matching cost grow with them), text
that is valid Unicode (a JSON `\\ud800` escape decodes to a lone surrogate, which no
tokenizer takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tidar_runtime.errors import FieldError
from tidar_runtime.sampling import SamplingParams

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 1024  # characters of a request's stop strings together


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. `prompt`: text (needs the artifact's tokenizer) or token ids; `stop`:
    stop strings (the text ends before the first one); `stop_tokens`: None means the engine's
    (the artifact's end-of-sequence token); `stream` / `include_usage`: how a front end answers."""

    prompt: str | tuple[int, ...]
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] | None = None
    stream: bool = False
    include_usage: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "prompt", _prompt(self.prompt))
        set_(self, "max_tokens", integer("max_tokens", self.max_tokens, 1))
        if not isinstance(self.params, SamplingParams):
            raise FieldError("params", "must be SamplingParams")
        set_(self, "stop", _stop(self.stop))
        if self.stop_tokens is not None:
            ids = (self.stop_tokens,) if isinstance(self.stop_tokens, int) else self.stop_tokens
            set_(self, "stop_tokens", tuple(integer("stop_tokens", t, 0) for t in _sequence("stop_tokens", ids)))
        set_(self, "stream", boolean("stream", self.stream))
        set_(self, "include_usage", boolean("stream_options.include_usage", self.include_usage))


def integer(name: str, value, lo: int, hi: int | None = None) -> int:
    """`value` as an int in lo..hi (a bool or a float is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu":  # a numpy integer
            value = int(value)
        else:
            raise FieldError(name, f"must be an integer, got {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        raise FieldError(name, f"must be an integer >= {lo}, got {_show(value)}" if hi is None
                         else f"must be an integer in {lo}..{hi}, got {_show(value)}")
    return value


def boolean(name: str, value) -> bool:
    """`value` if it is true or false (None counts as false: an absent optional field)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(name, f"must be true or false, got {_show(value)}")
    return value


def text(name: str, value: str) -> str:
    """`value` if it is valid Unicode: a lone surrogate (a JSON "\\ud800") cannot be tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(name, f"is not valid Unicode text (a lone surrogate at character {e.start})") from None
    return value


def _sequence(name: str, value) -> Sequence:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        raise FieldError(name, f"must be a list, got {_show(value)}")
    return value


def _prompt(value):
    if isinstance(value, str):
        if not value:
            raise FieldError("prompt", "must be a non-empty string or a list of token ids")
        return text("prompt", value)
    if hasattr(value, "tolist"):  # a numpy array of ids
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(value)  # ids: types and range are checked against the vocabulary by the engine
    raise FieldError("prompt", f"must be a non-empty string or a list of token ids, got {_show(value)}")


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stop = (value,) if isinstance(value, str) else tuple(_sequence("stop", value))
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise FieldError("stop", f"must be a string or a list of at most {MAX_STOP} strings")
    if any(not s for s in stop):
        raise FieldError("stop", "strings must be non-empty")
    if sum(len(s) for s in stop) > MAX_STOP_CHARS:
        raise FieldError("stop", f"strings must have at most {MAX_STOP_CHARS} characters together, got "
                         f"{sum(len(s) for s in stop)}")
    return tuple(text("stop", s) for s in stop)


def _show(value) -> str:
    return repr(value)[:40]
