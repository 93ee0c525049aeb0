"""`sgl.OpenAI`: any OpenAI-compatible chat endpoint (OpenAI itself, `sgl serve`, SGLang, vLLM).

    >>> sgl.set_default_backend(sgl.OpenAI("default", base_url="http://127.0.0.1:30000/v1"))  # doctest: +SKIP

What a chat API can and cannot do for a DSL program, said up front:
- `gen` must come right after `sgl.assistant_begin()` / inside `sgl.assistant(...)`: the API takes
  finished messages and writes one whole assistant turn (it cannot continue partial text).
- `json_schema` goes as `response_format`. `regex`, `ebnf`, `dtype`, `top_k`, `min_p`,
  `min_new_tokens`, `ignore_eos`, `repetition_penalty` and `select` need an endpoint that accepts
  SGLang's extra body fields (ours and SGLang's do: `extra_fields=True`, the default when a
  `base_url` is given); otherwise they raise UnsupportedFeatureError instead of being ignored.
- No prefix caching control (`prefill` is a no-op) and no prompt logprobs.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional

from sgl.backends.base import Backend, GenResult, Prompt, UnsupportedFeatureError
from sgl.chat_template import CHATML, ChatTemplate
from sgl.choices import ChoicesDecision, ChoicesSamplingMethod
from sgl.sampling import GenParams

_EXTRA = ("top_k", "min_p", "min_new_tokens", "ignore_eos", "repetition_penalty", "stop_token_ids", "regex", "ebnf")


class OpenAI(Backend):
    is_chat_model = True

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 extra_fields: Optional[bool] = None, **client_kwargs: Any) -> None:
        import openai  # NOTE: lazy: the SDK is only needed by this backend

        self.model = model
        self.extra_fields = (base_url is not None) if extra_fields is None else extra_fields
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", **client_kwargs)
        self._template = ChatTemplate.from_jinja(CHATML, name="chatml (display only)")

    def get_chat_template(self) -> ChatTemplate:
        # The API applies the model's real template server-side; this only renders s.text().
        return self._template

    def _request(self, prompt: Prompt, params: GenParams) -> dict[str, Any]:
        if prompt.role != "assistant" or prompt.role_text:
            raise UnsupportedFeatureError(
                "OpenAI backend: gen must come right after sgl.assistant_begin() (or inside sgl.assistant(...)); "
                "a chat API writes a whole assistant turn and cannot continue partial text")
        sp = params.to_sampling_params()
        model = params.model or self.model
        if params.lora_path is not None:  # an adapter as OpenAI-style servers (ours, vLLM) name it
            model = f"{model}:{params.lora_path}"
        kw: dict[str, Any] = {"model": model, "messages": prompt.messages}
        for ours, theirs in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                             ("n", "n"), ("stop", "stop"), ("frequency_penalty", "frequency_penalty"),
                             ("presence_penalty", "presence_penalty"), ("sampling_seed", "seed")):
            if ours in sp:
                kw[theirs] = sp[ours]
        if params.return_logprob:
            kw["logprobs"] = True
            if params.top_logprobs_num:
                kw["top_logprobs"] = params.top_logprobs_num
        if "prediction" in sp:  # OpenAI's Predicted Outputs
            kw["prediction"] = {"type": "content", "content": sp["prediction"]}
        if "json_schema" in sp:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": json.loads(sp["json_schema"])}}
        extra = {k: sp[k] for k in _EXTRA if k in sp}
        if extra:
            if not self.extra_fields:
                raise UnsupportedFeatureError(f"OpenAI backend: {', '.join(sorted(extra))} need an endpoint that "
                                              "accepts SGLang's extra fields (pass extra_fields=True if it does)")
            kw["extra_body"] = extra
        return kw

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        resp = self.client.chat.completions.create(**self._request(prompt, params))
        texts = [c.message.content or "" for c in resp.choices]
        metas = [_meta(resp, c) for c in resp.choices]
        return GenResult(texts, metas) if len(texts) > 1 else GenResult(texts[0], metas[0])

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[GenResult]:
        text, finish = "", None
        for chunk in self.client.chat.completions.create(**self._request(prompt, params), stream=True):
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            yield GenResult(text, {"id": chunk.id, "finish_reason": _finish(finish)})

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: ChoicesSamplingMethod, model: Optional[str] = None,
               lora_path: Optional[str] = None) -> ChoicesDecision:
        """A chat API returns no prompt logprobs, so choices cannot be scored; with extra fields the
        endpoint generates under a regex that admits exactly the choices (greedy)."""
        if not self.extra_fields:
            raise UnsupportedFeatureError("OpenAI backend: select needs prompt logprobs, which chat APIs do not "
                                          "return; use an endpoint with SGLang's extra fields (regex) or "
                                          "sgl.RuntimeEndpoint")
        regex = "(" + "|".join(re.escape(c) for c in choices) + ")"
        res = self.generate(prompt, GenParams(regex=regex, temperature=temperature, max_new_tokens=64, model=model,
                                                  lora_path=lora_path))
        text = res.text if isinstance(res.text, str) else res.text[0]
        if text not in choices:
            raise UnsupportedFeatureError(f"OpenAI backend: the endpoint ignored the choice regex (got {text!r})")
        return ChoicesDecision(text, {"method": "constrained generation", **(res.meta_info or {})})


def _finish(reason: Optional[str]) -> Optional[dict[str, Any]]:
    if reason is None:
        return None
    return {"type": "length"} if reason == "length" else {"type": reason}


def _meta(resp: Any, choice: Any) -> dict[str, Any]:
    usage = getattr(resp, "usage", None)
    return {"id": resp.id, "finish_reason": _finish(choice.finish_reason),
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None)}
