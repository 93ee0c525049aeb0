"""The DSL's public functions: `function`, `gen`, `gen_int`, `gen_string`, `select`, roles, and the
backend helpers. Names and parameters are SGLang's.

    >>> import sgl
    >>> @sgl.function
    ... def classify(s, review):
    ...     s += sgl.user("Is this review positive or negative? " + review)
    ...     s += sgl.assistant(sgl.select("label", choices=["positive", "negative"]))
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from sgl.backends.base import Backend, resolve_backend, set_default_backend  # noqa: F401 (re-exported)
from sgl.choices import ChoicesSamplingMethod, token_length_normalized
from sgl.function import SglFunction
from sgl.ir import SglExpr, SglExprList, SglGen, SglRoleBegin, SglRoleEnd, SglSelect, as_expr
from sgl.sampling import GenParams, normalize_dtype, schema_to_str

Schema = Union[str, dict, type]


def function(func: Optional[Callable[..., Any]] = None) -> Any:
    """Decorate a program: `@sgl.function def prog(s, ...)`. Returns an SglFunction."""
    if func is None:
        return lambda f: SglFunction(f)
    return SglFunction(func)


def gen(
    name: Optional[str] = None,
    max_tokens: Optional[int] = None,
    min_tokens: Optional[int] = None,
    n: Optional[int] = None,
    stop: Optional[Union[str, list[str]]] = None,
    stop_token_ids: Optional[list[int]] = None,
    stop_regex: Optional[Union[str, list[str]]] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    presence_penalty: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    ignore_eos: Optional[bool] = None,
    sampling_seed: Optional[int] = None,
    return_logprob: Optional[bool] = None,
    logprob_start_len: Optional[int] = None,
    top_logprobs_num: Optional[int] = None,
    return_text_in_logprobs: Optional[bool] = None,
    dtype: Optional[Union[type, str]] = None,
    choices: Optional[list[str]] = None,
    choices_method: Optional[ChoicesSamplingMethod] = None,
    regex: Optional[str] = None,
    json_schema: Optional[Schema] = None,
    ebnf: Optional[str] = None,
    model: Optional[str] = None,
    lora_path: Optional[str] = None,
    prediction: Optional[str] = None,
) -> SglExpr:
    """Generate text into variable `name`. Unset parameters come from `.run(...)` defaults, then
    from the runtime's defaults (max_new_tokens 128, temperature 1.0, ...).

    Constraints (at most one): `dtype` (int/float/str/bool), `regex`, `json_schema` (a JSON string,
    a dict or a pydantic model class; `state.parsed(name)` then returns the parsed object), `ebnf`,
    or `choices` (which makes this a `select`). `model`: which served model runs this gen on a server
    that serves several (`sgl serve --model-path small=... --model-path big=...`; "auto" = the router), or a
    LoRA adapter as the OpenAI routes take it ("base:adapter" or a bare "adapter"). `lora_path`: a loaded
    LoRA adapter's name (SGLang's field), for this call only. `prediction`: the text you expect the output to be
    (OpenAI's Predicted Outputs; drafts for speculative decoding on a server that runs it: an edit that returns a
    document mostly unchanged comes back in fewer steps, and the same text).

        >>> sgl.gen("answer", max_tokens=32, stop="\\n")                # doctest: +SKIP
    """
    if choices is not None:
        return select(name, choices, temperature or 0.0, choices_method or token_length_normalized, model=model,
                      lora_path=lora_path)
    params = GenParams(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
        stop_regex=stop_regex, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, sampling_seed=sampling_seed,
        regex=regex, json_schema=schema_to_str(json_schema) if json_schema is not None else None, ebnf=ebnf,
        return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, model=model, lora_path=lora_path,
        dtype=normalize_dtype(dtype) if dtype is not None else None, prediction=prediction,
    )
    params.to_sampling_params()  # validate here: the error points at the gen call
    return SglGen(name, params, parse_as=json_schema)


def gen_int(name: Optional[str] = None, **kwargs: Any) -> SglExpr:
    """`gen(name, dtype=int, ...)`: an integer (as text; `state.parsed(name)` gives the int)."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, **kwargs: Any) -> SglExpr:
    """`gen(name, dtype=str, ...)`: a double-quoted string of word characters and spaces."""
    return gen(name, dtype=str, **kwargs)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None, temperature: float = 0.0,
           choices_method: Union[ChoicesSamplingMethod, str] = token_length_normalized,
           model: Optional[str] = None, lora_path: Optional[str] = None) -> SglExpr:
    """Append the choice the model finds most likely, and store it in variable `name`.

    `choices_method`: `sgl.token_length_normalized` (default: highest mean logprob per token),
    `sgl.greedy_token_selection`, or `sgl.unconditional_likelihood_normalized`. temperature > 0
    samples a choice with probability softmax(mean logprob / temperature). `model`, `lora_path`: as in `gen`
    (every choice is scored on that model / adapter).
    """
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("select: choices must be a non-empty list of strings")
    if model is not None and not isinstance(model, str):
        raise ValueError("select: model must be a served model name (a string)")
    if lora_path is not None and not isinstance(lora_path, str):
        raise ValueError("select: lora_path must be a loaded adapter's name (a string)")
    return SglSelect(name, choices, temperature, choices_method, model, lora_path)


def _role(role: str, expr: Any = None) -> SglExprList:
    inner = [] if expr is None else as_expr(expr).flatten()
    return SglExprList([SglRoleBegin(role), *inner, SglRoleEnd(role)])


def system(expr: Any = None) -> SglExprList:
    """A system turn: `s += sgl.system("You are terse.")` (rendered with the model's chat template)."""
    return _role("system", expr)


def user(expr: Any = None) -> SglExprList:
    """A user turn: `s += sgl.user("Hi" + sgl.gen(...))`."""
    return _role("user", expr)


def assistant(expr: Any = None) -> SglExprList:
    """An assistant turn: `s += sgl.assistant(sgl.gen("reply", max_tokens=64))`."""
    return _role("assistant", expr)


def system_begin() -> SglRoleBegin:
    return SglRoleBegin("system")


def system_end() -> SglRoleEnd:
    return SglRoleEnd("system")


def user_begin() -> SglRoleBegin:
    return SglRoleBegin("user")


def user_end() -> SglRoleEnd:
    return SglRoleEnd("user")


def assistant_begin() -> SglRoleBegin:
    return SglRoleBegin("assistant")


def assistant_end() -> SglRoleEnd:
    return SglRoleEnd("assistant")


def flush_cache(backend: Optional[Backend] = None) -> bool:
    """Empty the runtime's prefix cache (the default backend's unless given)."""
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Optional[Backend] = None) -> dict[str, Any]:
    return resolve_backend(backend).get_server_info()
