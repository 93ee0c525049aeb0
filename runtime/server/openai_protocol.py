"""OpenAI request models (`/v1/completions`, `/v1/chat/completions`) and their mapping onto our
`SamplingParams` names. Strict types: `"max_tokens": "5"` is a 400 naming `max_tokens`.

Extra body fields (SGLang's): `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `regex`,
`ebnf`, `json_schema`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `no_stop_trim`, `priority`,
`priority_class` (ours: realtime | standard | batch). OpenAI's `prediction` (Predicted Outputs) becomes
`sampling_params.prediction`: drafts for speculative decoding (runtime/speculative/prediction.py).
Unknown top-level fields are ignored, as OpenAI's server does for fields it does not know.

    >>> req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=3)
    >>> sampling_dict(req, max_new_tokens=8, choice_index=1)["sampling_seed"]
    4
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from sgl.runtime.protocol import RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class TextPart(_Strict):
    type: str
    text: Optional[str] = None


class Prediction(_Strict):
    """OpenAI's Predicted Outputs: text the output is expected to be (drafts for speculative decoding)."""

    type: Literal["content"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" or p.text is None for p in self.content):
            raise RequestError("prediction.content parts must be of type text, with a text")
        return "".join(p.text or "" for p in self.content)


class _SamplingFields(_Strict):
    model: Optional[str] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    # SGLang's extra body fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Optional[str] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    priority: Optional[int] = None
    priority_class: Optional[Literal["realtime", "standard", "batch"]] = None  # == protocol.PRIORITY_CLASSES
    prediction: Optional[Prediction] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = None  # top-k alternatives per position; 0 = the sampled token only
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None


def constraint_fields(req: _SamplingFields) -> dict[str, str]:
    """`response_format` / `regex` / `ebnf` / `json_schema` -> our sampling keys (strings)."""
    out: dict[str, str] = {}
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        out["json_schema"] = json.dumps({"type": "object"})
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise RequestError("response_format.json_schema.schema is required when type is json_schema")
        out["json_schema"] = json.dumps(rf.json_schema.schema_)
    for key in ("regex", "ebnf", "json_schema"):
        value = getattr(req, key)
        if value:
            if key in out:
                raise RequestError("give either response_format or json_schema, not both")
            out[key] = value
    return out


def sampling_dict(req: _SamplingFields, max_new_tokens: int, choice_index: int = 0) -> dict[str, Any]:
    """The `sampling_params` dict for choice `choice_index` of `req` (validated later by SamplingParams).

    With a `seed`, choice i uses seed + i: the n choices differ, and the same request is reproducible.
    """
    d: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    pairs = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
             ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
             ("repetition_penalty", "repetition_penalty"), ("min_tokens", "min_new_tokens"),
             ("ignore_eos", "ignore_eos"), ("stop_token_ids", "stop_token_ids"),
             ("skip_special_tokens", "skip_special_tokens"), ("no_stop_trim", "no_stop_trim"),
             ("logit_bias", "logit_bias"))
    for ours, theirs in pairs:
        value = getattr(req, ours)
        if value is not None:
            d[theirs] = value
    if req.stop is not None:
        d["stop"] = req.stop
    if req.seed is not None:
        d["sampling_seed"] = req.seed + choice_index
    if req.prediction is not None:
        d["prediction"] = req.prediction.text()
    d.update(constraint_fields(req))
    return d


def message_text(msg: ChatMessage) -> str:
    """A message's content as one string; only text parts are supported."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages: content parts of type {part.type!r} are not supported (only 'text')")
        texts.append(part.text)
    return "".join(texts)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise RequestError("messages must not be empty")
    if req.tools:
        raise RequestError("tools: function calling is not supported by this server")
    return [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
            for m in req.messages]
