"""Protocol types shared by the engine, the HTTP server and the DSL backends. No torch here.

`SamplingParams` is THE definition of sampling parameters (SGLang's native names); the DSL, the
server and the engine all validate through it. `GenerateRequest` is one prompt's worth of work;
`normalize_generate_input` turns a `/generate` body (single or batched, `n` > 1) into a list of them.

    >>> sp = SamplingParams.from_dict({"max_new_tokens": 8, "temperature": 0})
    >>> sp.is_greedy
    True
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

GREEDY_EPS = 1e-6
MAX_STOP_STRINGS = 32
# Scheduling classes, most urgent first (runtime/scheduler/fair_share.py weighs them; API keys default them).
PRIORITY_CLASSES = ("realtime", "standard", "batch")


class RequestError(ValueError):
    """Bad input from a user: becomes HTTP 400 (the message names the field)."""


class InternalError(RuntimeError):
    """The engine failed a request by its own fault (a bug, a kernel error): becomes HTTP 500."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RequestError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    stop_regex: Optional[Union[str, list[str]]] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: Optional[dict[str, float]] = None
    sampling_seed: Optional[int] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    choices: Optional[list[str]] = None  # our extension: one of these strings exactly
    # the text (or token ids) the output is expected to be (OpenAI's Predicted Outputs): drafts for speculative
    # decoding (with or without --speculative-algorithm); the output is the same with or without it
    # (runtime/speculative/prediction.py)
    prediction: Optional[Union[str, list[int]]] = None

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "SamplingParams":
        """Build and validate; unknown keys are an error that names them."""
        d = dict(d or {})
        _check(isinstance(d, dict), "sampling_params must be an object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        _check(not unknown, f"unknown field(s) in sampling_params: {', '.join(unknown)}")
        for key in ("regex", "json_schema", "ebnf", "stop_regex"):
            if d.get(key) == "":
                d[key] = None  # SGLang: an empty string means unset
        sp = cls(**{k: v for k, v in d.items() if v is not None or k in ("stop", "logit_bias")})
        sp.validate()
        return sp

    def validate(self) -> None:
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
               "sampling_params.max_new_tokens must be a non-negative integer")
        _check(_is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
               "sampling_params.min_new_tokens must be a non-negative integer")
        _check(_is_int(self.n) and self.n >= 1, "sampling_params.n must be a positive integer")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               "sampling_params.temperature must be a non-negative number")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "sampling_params.top_p must be in (0, 1]")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
               "sampling_params.top_k must be -1 (all) or a positive integer")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "sampling_params.min_p must be in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, f"sampling_params.{name} must be a number in [-2, 2]")
        _check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
               "sampling_params.repetition_penalty must be a number in (0, 2]")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            _check(isinstance(getattr(self, name), bool), f"sampling_params.{name} must be a boolean")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            _check(isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop),
                   "sampling_params.stop must be a string or a list of strings")
            _check(len(self.stop) <= MAX_STOP_STRINGS, f"sampling_params.stop has more than {MAX_STOP_STRINGS} strings")
            self.stop = [s for s in self.stop if s]
        if self.stop_token_ids is not None:
            _check(isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                   "sampling_params.stop_token_ids must be a list of non-negative integers")
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "sampling_params.logit_bias must be an object of token id -> bias")
            for k, v in self.logit_bias.items():
                _check(str(k).lstrip("-").isdigit() and _is_num(v),
                       "sampling_params.logit_bias must map token ids to numbers")
        if self.sampling_seed is not None:
            _check(_is_int(self.sampling_seed), "sampling_params.sampling_seed must be an integer")
        constraints = [k for k in ("regex", "json_schema", "ebnf", "choices") if getattr(self, k) is not None]
        _check(len(constraints) <= 1,
               f"sampling_params: at most one of regex, json_schema, ebnf, choices may be set (got {', '.join(constraints)})")
        for k in ("regex", "json_schema", "ebnf"):
            v = getattr(self, k)
            _check(v is None or isinstance(v, str), f"sampling_params.{k} must be a string")
        _check(self.prediction is None or isinstance(self.prediction, str)
               or (isinstance(self.prediction, list) and all(_is_int(t) and t >= 0 for t in self.prediction)),
               "sampling_params.prediction must be a string or a list of non-negative token ids")
        if self.choices is not None:
            _check(isinstance(self.choices, list) and self.choices and all(isinstance(c, str) for c in self.choices),
                   "sampling_params.choices must be a non-empty list of strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def constraint(self) -> Optional[tuple[str, Any]]:
        """(kind, value) of the grammar constraint, if any: kind in regex/json_schema/ebnf/choices."""
        for k in ("regex", "json_schema", "ebnf", "choices"):
            v = getattr(self, k)
            if v is not None:
                return k, v
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateRequest:
    """One prompt to run. `input_ids` is filled by tokenization when only `text` is given."""

    rid: str
    text: Optional[str] = None
    input_ids: Optional[list[int]] = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only; else a prompt position
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    priority: int = 0
    priority_class: Optional[str] = None  # realtime | standard | batch; None = the API key's class or standard
    lora_path: Optional[str] = None


# Top-level /generate keys we understand; other top-level keys are ignored (SGLang's behaviour).
_INPUT_KEYS = ("text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
               "top_logprobs_num", "return_text_in_logprobs", "stream", "rid", "priority", "priority_class",
               "lora_path")


def _per_item(value: Any, i: int, batched: bool) -> Any:
    return value[i] if batched and isinstance(value, list) else value


def normalize_generate_input(body: dict[str, Any]) -> tuple[list[GenerateRequest], bool]:
    """Turn a `/generate` body into requests. Returns (requests, is_batch).

    A list `text` / `input_ids` or `n` > 1 makes a batch; with `n` > 1 each prompt is repeated n
    times in a row (SGLang's order). Raises `RequestError` naming the bad field.
    """
    _check(isinstance(body, dict), "request body must be a JSON object")
    text, input_ids = body.get("text"), body.get("input_ids")
    _check((text is None) != (input_ids is None), "exactly one of text or input_ids must be given")
    if text is not None:
        batched = isinstance(text, list)
        items = text if batched else [text]
        _check(all(isinstance(t, str) for t in items), "text must be a string or a list of strings")
        _check(len(items) > 0, "text must not be an empty list")
    else:
        _check(isinstance(input_ids, list) and len(input_ids) > 0, "input_ids must be a non-empty list")
        batched = isinstance(input_ids[0], list)
        items = input_ids if batched else [input_ids]
        for ids in items:
            _check(isinstance(ids, list) and len(ids) > 0 and all(_is_int(t) and t >= 0 for t in ids),
                   "input_ids must be a non-empty list of non-negative integers (or a list of such lists)")
    sp_raw = body.get("sampling_params") or {}
    if batched and isinstance(sp_raw, list):
        _check(len(sp_raw) == len(items), "sampling_params list must have one entry per prompt")
    else:
        _check(isinstance(sp_raw, dict), "sampling_params must be an object (or a list of objects for a batch)")
    lora = body.get("lora_path")
    if isinstance(lora, list):
        _check(batched and len(lora) == len(items), "lora_path list must have one entry (a name or null) per prompt")
    _check(all(x is None or isinstance(x, str) for x in (lora if isinstance(lora, list) else [lora])),
           "lora_path must be the name of a loaded adapter (or null), or a list of them for a batch")
    for key, typ in (("return_logprob", bool), ("return_text_in_logprobs", bool), ("stream", bool)):
        v = body.get(key, False)
        _check(isinstance(v, (bool, list)), f"{key} must be a boolean")
    rids = body.get("rid")
    reqs: list[GenerateRequest] = []
    for i, item in enumerate(items):
        sp = SamplingParams.from_dict(_per_item(sp_raw, i, batched))
        n = sp.n
        lp_start = _per_item(body.get("logprob_start_len", -1), i, batched)
        _check(_is_int(lp_start) and lp_start >= -1, "logprob_start_len must be an integer >= -1")
        top_n = _per_item(body.get("top_logprobs_num", 0), i, batched)
        _check(_is_int(top_n) and 0 <= top_n <= 20, "top_logprobs_num must be an integer in [0, 20]")
        prio = body.get("priority", 0)
        _check(prio is None or _is_int(prio), "priority must be an integer")
        pclass = body.get("priority_class")
        _check(pclass is None or pclass in PRIORITY_CLASSES,
               f"priority_class must be one of {', '.join(PRIORITY_CLASSES)} (got {pclass!r})")
        for j in range(n):
            rid = _per_item(rids, i, batched) if rids is not None else None
            if rid is not None:
                _check(isinstance(rid, str), "rid must be a string (or a list of strings for a batch)")
                rid = rid if n == 1 else f"{rid}-{j}"
            reqs.append(GenerateRequest(
                rid=rid or uuid.uuid4().hex,
                text=item if text is not None else None,
                input_ids=list(item) if input_ids is not None else None,
                sampling_params=sp,
                return_logprob=bool(_per_item(body.get("return_logprob", False), i, batched)),
                logprob_start_len=lp_start,
                top_logprobs_num=top_n,
                return_text_in_logprobs=bool(_per_item(body.get("return_text_in_logprobs", False), i, batched)),
                stream=bool(body.get("stream", False)),
                priority=prio or 0,
                priority_class=pclass,
                lora_path=_per_item(body.get("lora_path"), i, batched),
            ))
    return reqs, batched or len(reqs) > 1


def finish_reason_stop(matched: Union[int, str, None]) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def finish_reason_length(length: int) -> dict[str, Any]:
    return {"type": "length", "length": length}


def finish_reason_abort(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message}


def finish_reason_internal_error(message: str) -> dict[str, Any]:
    """An abort caused by a bug or a kernel failure, not by the request: the server answers 500 (SGLang's
    abort finish reasons carry a status_code the same way)."""
    return {"type": "abort", "message": message, "status_code": 500}


def internal_error_of(outputs: Any) -> Optional[str]:
    """The message of the first output (a dict or a list of them) that ended on an internal error, or None."""
    for out in outputs if isinstance(outputs, list) else [outputs]:
        reason = (out.get("meta_info") or {}).get("finish_reason") if isinstance(out, dict) else None
        if isinstance(reason, dict) and reason.get("status_code") == 500:
            return str(reason.get("message"))
    return None
