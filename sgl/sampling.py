"""The DSL's sampling parameters: defined once, here, and mapped onto the runtime's names.

`GenParams` holds what one `gen` asks for; every field is optional (None = inherit from the
program's defaults given to `.run(...)`, then from the runtime's own defaults in
`sgl.runtime.protocol.SamplingParams`). Sampling fields carry the runtime's names so that the mapping
is the identity; `gen(max_tokens=...)` is the only spelling that differs (SGLang's DSL name).

    >>> p = GenParams(max_new_tokens=16, dtype="int")
    >>> p.to_sampling_params()["regex"]
    '[-+]?[0-9]+[ \\\\n]*'
    >>> GenParams(temperature=0.5).merged(GenParams(max_new_tokens=8, temperature=0)).temperature
    0.5
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

from sgl.runtime.protocol import RequestError, SamplingParams

# The regexes SGLang's frontend sends for `gen(dtype=...)`, kept identical for compatibility.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

_DTYPES: dict[str, tuple[str, list[str]]] = {  # dtype -> (regex, extra stop strings)
    "int": (REGEX_INT, [" ", "\n"]),
    "float": (REGEX_FLOAT, [" ", "\n"]),
    "str": (REGEX_STR, []),
    "bool": (REGEX_BOOL, []),
}

# Field kinds: "sampling" goes into the request's `sampling_params`; "request" is a top-level
# /generate key; "dsl" is consumed by the frontend.
_SAMPLING, _REQUEST, _DSL = "sampling", "request", "dsl"


def _opt(kind: str) -> Any:
    return field(default=None, metadata={"kind": kind})


@dataclass(frozen=True)
class GenParams:
    """What one `gen` asks of the model. None everywhere means "not set here"."""

    max_new_tokens: Optional[int] = _opt(_SAMPLING)
    min_new_tokens: Optional[int] = _opt(_SAMPLING)
    n: Optional[int] = _opt(_SAMPLING)
    stop: Optional[Union[str, list[str]]] = _opt(_SAMPLING)
    stop_token_ids: Optional[list[int]] = _opt(_SAMPLING)
    stop_regex: Optional[Union[str, list[str]]] = _opt(_SAMPLING)
    temperature: Optional[float] = _opt(_SAMPLING)
    top_p: Optional[float] = _opt(_SAMPLING)
    top_k: Optional[int] = _opt(_SAMPLING)
    min_p: Optional[float] = _opt(_SAMPLING)
    frequency_penalty: Optional[float] = _opt(_SAMPLING)
    presence_penalty: Optional[float] = _opt(_SAMPLING)
    repetition_penalty: Optional[float] = _opt(_SAMPLING)
    ignore_eos: Optional[bool] = _opt(_SAMPLING)
    sampling_seed: Optional[int] = _opt(_SAMPLING)
    regex: Optional[str] = _opt(_SAMPLING)
    json_schema: Optional[str] = _opt(_SAMPLING)  # always a JSON string here (see `schema_to_str`)
    ebnf: Optional[str] = _opt(_SAMPLING)
    prediction: Optional[str] = _opt(_SAMPLING)  # the expected output: drafts for speculative decoding
    return_logprob: Optional[bool] = _opt(_REQUEST)
    logprob_start_len: Optional[int] = _opt(_REQUEST)
    top_logprobs_num: Optional[int] = _opt(_REQUEST)
    return_text_in_logprobs: Optional[bool] = _opt(_REQUEST)
    model: Optional[str] = _opt(_REQUEST)  # a served model name (or "auto") of a multi-model server
    lora_path: Optional[str] = _opt(_REQUEST)  # a loaded LoRA adapter's name (SGLang's native field)
    dtype: Optional[str] = _opt(_DSL)  # "int" | "float" | "str" | "bool"

    def __post_init__(self) -> None:
        if self.dtype is not None:
            if self.dtype not in _DTYPES:  # callers pass it through `normalize_dtype` first
                raise RequestError(f"gen: dtype must be one of int, float, str, bool (got {self.dtype!r})")
            if self.regex is not None:
                raise RequestError("gen: set either dtype or regex, not both")

    @classmethod
    def names(cls, kind: Optional[str] = None) -> list[str]:
        return [f.name for f in fields(cls) if kind is None or f.metadata["kind"] == kind]

    def merged(self, defaults: "GenParams") -> "GenParams":
        """These params, with every unset field taken from `defaults`."""
        return replace(defaults, **{k: v for k, v in self._items() if v is not None})

    def with_extra_stop(self, stops: list[str]) -> "GenParams":
        """Append stop strings (the chat template's end-of-turn) to whatever stop is set."""
        stops = [s for s in stops if s]
        if not stops:
            return self
        cur = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return replace(self, stop=cur + [s for s in stops if s not in cur])

    def to_sampling_params(self) -> dict[str, Any]:
        """The `sampling_params` object of a native /generate request (only the fields set).

        Validated through the runtime's own `SamplingParams`, so a bad value raises `RequestError`
        naming the field at the `gen` call, before any request is sent.
        """
        out = {k: v for k, v in self._items(_SAMPLING) if v is not None}
        if self.dtype is not None:
            regex, extra_stop = _DTYPES[self.dtype]
            out["regex"] = regex
            if extra_stop:
                stop = out.get("stop") or []
                stop = [stop] if isinstance(stop, str) else list(stop)
                out["stop"] = stop + [s for s in extra_stop if s not in stop]
        SamplingParams.from_dict(out)
        return out

    def request_options(self) -> dict[str, Any]:
        """The top-level /generate keys (logprob options, model, lora_path) that are set."""
        return {k: v for k, v in self._items(_REQUEST) if v is not None}

    @property
    def is_greedy(self) -> bool:
        return self.temperature is not None and self.temperature < 1e-6

    def _items(self, kind: Optional[str] = None) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if kind is None or f.metadata["kind"] == kind]


def normalize_dtype(dtype: Any) -> str:
    """`int`, `"int"`, ... -> "int"; anything else is an error naming the allowed values."""
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    if name not in _DTYPES:
        raise RequestError(f"gen: dtype must be one of int, float, str, bool (got {dtype!r})")
    return name


def schema_to_str(schema: Any) -> str:
    """A JSON schema given as a string, a dict, or a pydantic model class -> a JSON string."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise RequestError(f"gen: json_schema must be a JSON string, a dict or a pydantic model class (got {type(schema).__name__})")


def parse_value(text: str, dtype: Optional[str] = None, schema: Any = None) -> Any:
    """Turn a generated string into the value its constraint describes.

    dtype int/float/bool/str -> the Python value; a JSON schema -> `json.loads` (or an instance when
    the schema was a pydantic model class). Raises ValueError when the text does not parse.

    >>> parse_value("42 ", "int"), parse_value('{"a": 1}', schema={"type": "object"})
    (42, {'a': 1})
    """
    if dtype == "int":
        return int(text.strip())
    if dtype == "float":
        return float(text.strip())
    if dtype == "bool":
        s = text.strip()
        if s not in ("True", "False"):
            raise ValueError(f"not a bool: {text!r}")
        return s == "True"
    if dtype == "str":
        return json.loads(text.strip())
    if schema is not None:
        if isinstance(schema, type) and hasattr(schema, "model_validate_json"):
            return schema.model_validate_json(text)
        return json.loads(text)
    return text
