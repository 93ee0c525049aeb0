"""Which served model a request runs on: its `model` field, or the model router for `model: "auto"`.

    state = route_chat(get_state(request), body)      # a ServerState narrowed to one model (runner.py)
    state.route_decision                               # the router's choice and reasons (auto only)

The router (runtime/model_router.py) sees each candidate's own prompt token count: chat prompts are rendered
with each model's chat template and counted with its tokenizer. One model served: the field is not checked
(as before), "auto" included.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from sgl.runtime.model_names import AUTO_MODEL
from sgl.runtime.model_router import RouteFeatures
from sgl.runtime.protocol import GenerateRequest, RequestError, SamplingParams
from sgl.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest, chat_messages, constraint_fields
from sgl.runtime.server.runner import ServerState


def _multi(state: ServerState) -> bool:
    return getattr(state.engine, "pool", None) is not None


def _constraint(keys: Sequence[str]) -> str:
    for kind in ("ebnf", "json_schema", "regex"):  # the most demanding first
        if kind in keys:
            return kind
    return "none"


def _route(state: ServerState, count: Any, max_new: int, constraint: str, text: str) -> ServerState:
    """count(handle) -> the prompt's tokens for that model."""
    engine = state.engine
    router = engine.router()
    tokens = {name: count(engine.handle(name)) for name in router.rules}
    decision = router.choose(RouteFeatures(tokens, max_new, constraint, text))
    view = state.for_model(decision.model)
    view.route_decision = decision.as_meta()
    return view


def route_chat(state: ServerState, body: ChatCompletionRequest) -> ServerState:
    if body.model != AUTO_MODEL or not _multi(state):
        return state.for_model(body.model)
    messages = chat_messages(body)
    text = "\n".join(str(m.get("content", "")) for m in messages)

    def count(handle: Any) -> int:
        try:
            prompt = handle.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception:  # this model's template rejects the messages: count the plain text
            prompt = text
        return len(handle.tokenizer.encode(prompt, add_special_tokens=False))

    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _route(state, count, max_new if max_new is not None else SamplingParams().max_new_tokens,
                  _constraint(list(constraint_fields(body))), text)


def route_completion(state: ServerState, body: CompletionRequest) -> ServerState:
    if body.model != AUTO_MODEL or not _multi(state):
        return state.for_model(body.model)
    prompts: list[Union[str, list[int]]]
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]  # type: ignore[list-item]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    texts = [x for x in prompts if isinstance(x, str)]

    def count(handle: Any) -> int:
        return max((len(handle.tokenizer.encode(x)) if isinstance(x, str) else len(x)) for x in prompts)

    return _route(state, count, body.max_tokens if body.max_tokens is not None else 16,
                  _constraint(list(constraint_fields(body))), "\n".join(texts))


def route_generate(state: ServerState, model: Optional[str], reqs: list[GenerateRequest]) -> ServerState:
    """Native /generate: the body's optional `model` field (an extension of SGLang's API): a served model,
    "auto", or a LoRA adapter as the OpenAI routes take it ("base:adapter" / "adapter", for requests without
    their own `lora_path`)."""
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string (a served model name, or 'auto')")
    if model != AUTO_MODEL or not _multi(state):
        view = state.for_model(model)
        for r in reqs:  # `model: "base:adapter"` as the OpenAI routes take it; a request's own lora_path wins
            if r.lora_path is None:
                r.lora_path = view.adapter
        return view

    def count(handle: Any) -> int:
        return max(len(r.input_ids) if r.input_ids is not None else len(handle.tokenizer.encode(r.text or ""))
                   for r in reqs)

    kinds = [k for r in reqs for k in ("regex", "json_schema", "ebnf") if getattr(r.sampling_params, k) is not None]
    return _route(state, count, max(r.sampling_params.max_new_tokens for r in reqs), _constraint(kinds),
                  "\n".join(r.text or "" for r in reqs))


def tag_output(state: ServerState, out: dict[str, Any]) -> dict[str, Any]:
    """Several models served: name the model in `meta_info.model` (and the router's reasons in
    `meta_info.route` for "auto"). One model: `out` unchanged."""
    if _multi(state) and isinstance(out.get("meta_info"), dict):
        out["meta_info"]["model"] = state.model_name
        if state.route_decision is not None:
            out["meta_info"]["route"] = state.route_decision
    return out
