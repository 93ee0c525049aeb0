"""`sgl.Runtime`: the in-process engine as a DSL backend (no HTTP, no subprocess).

    >>> rt = sgl.Runtime(model_path="default", num_threads=1)      # doctest: +SKIP
    >>> sgl.set_default_backend(rt)                                  # doctest: +SKIP

Requests go to the engine as `GenerateRequest`s built from the same native bodies the HTTP backend
sends, so both backends behave identically. The engine (and torch) is imported only here, lazily.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from sgl.backends.base import UnsupportedFeatureError
from sgl.backends.native import Body, NativeBackend, Response
from sgl.chat_template import ChatTemplate, template_for_model_path


class Runtime(NativeBackend):
    """Run programs on an in-process `sgl.runtime.engine.Engine`.

    `server_args` are `ServerArgs` fields (num_threads=1, max_total_tokens=8192, lora_paths=[...], ...). Pass an
    existing engine with `engine=` to share it. Several models: `model_path=["small=default", "big=PATH"]`
    (with `model_memory_budget=` GB, as the server's flags); `gen/select(model="big")` then picks one.
    """

    def __init__(self, model_path: Any = "default", *, engine: Any = None, **server_args: Any) -> None:
        super().__init__()
        if engine is None:
            from sgl.runtime.engine import Engine  # NOTE: lazy: `import sgl` must not import torch

            engine = Engine(model_path=model_path, **server_args)
        self.engine = engine
        self._template: Optional[ChatTemplate] = None

    def get_chat_template(self) -> ChatTemplate:
        if self._template is None:
            tok = self.engine.tokenizer
            if getattr(tok, "chat_template", None):
                self._template = ChatTemplate(
                    lambda messages: _without_template_bos(tok, tok.apply_chat_template(messages, add_generation_prompt=False)),
                    name=f"{self.engine.model_path} (tokenizer)")
            else:
                self._template = template_for_model_path(str(self.engine.model_path))
        return self._template

    def _generate(self, bodies: list[Body]) -> list[Response]:
        from sgl.runtime.protocol import normalize_generate_input

        reqs, shapes, models = [], [], []
        for body in bodies:
            model = self._route(body)
            rs, batched = normalize_generate_input(body)
            reqs.extend(rs)
            models.extend([model] * len(rs))
            shapes.append((len(rs), batched))
        # one submission: the scheduler(s) batch them together
        outs = self.engine.submit_and_wait(reqs, models) if self._multi else self.engine.submit_and_wait(reqs)
        grouped: list[Response] = []
        i = 0
        for count, batched in shapes:
            grouped.append(outs[i:i + count] if batched else outs[i])
            i += count
        return grouped

    @property
    def _multi(self) -> bool:
        return hasattr(self.engine, "pool")  # several models (sgl.runtime.multi_engine.MultiEngine)

    def _route(self, body: Body) -> Optional[str]:
        """The body's `model` field as the server takes it: on one model, a LoRA adapter ("base:adapter" or a
        bare adapter name) becomes the body's `lora_path` (its own lora_path wins), and any other name must be
        the served one (or None/"auto"). On several models: returned for the engine to route."""
        model = body.pop("model", None)
        if self._multi:
            return model
        from sgl.runtime.model_names import resolve_model_adapter

        served = self.engine.server_args.served_model_name or self.engine.server_args.model_path
        if model is None or model in ("auto", served):
            return None
        _, adapter = resolve_model_adapter(model, [served], {served: self.engine.lora_names()}, check=False)
        if adapter is None:
            raise UnsupportedFeatureError(
                f"gen/select model={model!r}: this in-process Runtime serves only {served!r} (adapters: "
                f"{', '.join(self.engine.lora_names()) or 'none'}); serve several models with "
                "sgl.Runtime(model_path=['small=default', 'big=...'])")
        if body.get("lora_path") is None:
            body["lora_path"] = adapter
        return None

    def _generate_stream(self, body: Body) -> Iterator[dict[str, Any]]:
        body = dict(body)
        model = self._route(body)
        opts = {k: body[k] for k in ("return_logprob", "logprob_start_len", "top_logprobs_num",
                                     "return_text_in_logprobs", "lora_path") if k in body}
        if self._multi:
            opts["model"] = model
        for chunk in self.engine.generate(body["text"], body.get("sampling_params"), stream=True, **opts):
            yield chunk

    def flush_cache(self) -> bool:
        return bool(self.engine.flush_cache())

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def get_model_info(self) -> dict[str, Any]:
        return self.engine.get_model_info()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _without_template_bos(tok: Any, text: str) -> str:
    """The engine encodes the program's text with special tokens: drop a BOS the template wrote itself
    (Gemma, Llama 3) when the tokenizer adds one, so the prompt starts with exactly one."""
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and tok.encode("a")[:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text
