"""The offline engine: load a model, run the scheduler loop in a background thread, take requests
from any number of threads or event loops.

    >>> eng = Engine(model_path="default", num_threads=1)            # doctest: +SKIP
    >>> eng.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})["text"]  # doctest: +SKIP
    ' Paris...'

The engine's other parts: how its pieces are sized and assembled (runtime/engine_setup.py), its LoRA
adapters (runtime/lora/engine_adapters.py), what it reports (runtime/engine_info.py). Several models in one
process: `Engine(model_path=[...])` is a MultiEngine (runtime/multi_engine.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

from sgl.runtime.config import ServerArgs, split_model_paths
from sgl.runtime.distributed.errors import TensorParallelError
from sgl.runtime.idle_memory import release_idle_memory
from sgl.runtime.metrics import record_grammar_compilation
from sgl.runtime.engine_io import (RequestSink, build_requests, finished_dict, validate_prompt_length)
from sgl.runtime.engine_info import EngineInfoMixin
from sgl.runtime.engine_setup import (LazyGrammar, default_pool_size, engine_kv_dtype, hierarchical_cache_mover,
                                      host_kv_tier, make_grammar_compiler)
from sgl.runtime.lora.adapter import AdapterError
from sgl.runtime.lora.engine_adapters import EngineLoraMixin
from sgl.runtime.malloc_policy import set_mmap_threshold
from sgl.runtime.protocol import GenerateRequest, RequestError, finish_reason_abort
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.speculative import make_drafter

logger = logging.getLogger("sgl.engine")

PromptArg = Union[str, list[str], None]


class Engine(EngineLoraMixin, EngineInfoMixin):
    def __new__(cls, model_path: Any = "default", **server_args: Any) -> Any:
        """Several models (a list of NAME=PATH / PATH, or a `models` file) make a MultiEngine
        (runtime/multi_engine.py: the same API plus `model=`); one model, an Engine."""
        if (not isinstance(model_path, str) and len(model_path) > 1) or server_args.get("models") \
                or server_args.get("model_paths"):
            from sgl.runtime.multi_engine import MultiEngine

            return MultiEngine(model_path, **server_args)  # NOTE: not an Engine, so __init__ is not run
        return super().__new__(cls)

    def __init__(self, model_path: Any = "default", **server_args: Any) -> None:
        # one `NAME=PATH` serves PATH under NAME, as `--model-path NAME=PATH` does
        server_args.update(split_model_paths(model_path, server_args.get("served_model_name")))
        model_path = server_args.pop("model_path")
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # only effective before torch starts its pool
        set_mmap_threshold()  # a prefill's large temporaries go back to the OS (runtime/malloc_policy.py)
        import torch

        from sgl.runtime.executor.model_runner import ModelRunner
        from sgl.runtime.models.loader import load_model

        self.server_args = args = ServerArgs.from_kwargs(model_path=model_path, **server_args)
        self.fatal_error: Optional[str] = None  # set when the engine can run no more steps (a TP rank died)
        self.on_fatal: Optional[Callable[[str], None]] = None  # the server stops itself here
        self._step_failures = 0  # consecutive scheduler steps that failed as a whole (two: fatal)
        self.tp = None  # tensor parallelism: rank 0's handle (runtime/distributed/launch.py)
        if args.tp_size > 1:
            from sgl.runtime.distributed.launch import TensorParallel, threads_per_rank

            self.tp = TensorParallel.spawn(args)  # NOTE: before loading: every rank loads at the same time
        torch.set_num_threads(args.resolved_num_threads if self.tp is None else threads_per_rank(args))
        torch.manual_seed(args.random_seed)
        t0 = time.monotonic()
        loaded = load_model(args.model_path, dtype=args.dtype, device="cpu", show_progress=args.show_progress,
                            weight_format=args.weight_format, quantize=args.quantize)
        self.weight_format = loaded.weight_format  # what auto resolved to: "fp32" or "native"
        if self.weight_format == "native":
            from sgl.kernels import cpu as cpu_kernels

            cpu_kernels.set_act_quant(args.cpu_act_quant)  # process-wide, as torch's thread count
            loaded.model.pack_weights = not args.disable_cpu_weight_packing  # read by runtime/models/fused_decode.py
        self.load_time = time.monotonic() - t0
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.model_path
        self.context_length = args.context_length or loaded.config.max_position_embeddings
        dtype = next(loaded.model.parameters()).dtype
        kv_dtype = engine_kv_dtype(args, dtype, native=self.weight_format == "native" and self.tp is None)
        pool_size = args.max_total_tokens or default_pool_size(loaded.config, args, kv_dtype)
        model, local_config = loaded.model, loaded.config
        if self.tp is not None:  # rank 0 keeps its shard and drives the others through each step
            model, local_config = self.tp.attach(loaded.model, pool_size, dtype, on_fatal=self._fatal,
                                                 keep_lm_head=args.speculative_algorithm in ("EAGLE", "MEDUSA"))
        runner = ModelRunner(model, local_config, pool_size, self.tokenizer.eos_token_ids, dtype=kv_dtype)
        mover, host_slots = host_kv_tier(runner.kv, args)  # runtime/engine_setup.py
        cache_mover = hierarchical_cache_mover(runner.kv, args)
        drafter = make_drafter(args, pool_size, loaded.config.vocab_size, runner=runner)  # None unless --speculative-algorithm
        if self.tp is not None:
            model.whole_lm_head = None  # the head drafters took their rows of it
        self.scheduler = Scheduler(args, runner, OutputProcessor(self.tokenizer), pool_size, self._on_output,
                                   drafter=drafter, mover=mover, host_pool_size=host_slots, cache_mover=cache_mover)
        if self.scheduler.spec is not None and self.tp is None and not args.speculative_always_draft:
            from sgl.runtime.speculative.verify_cost import ObservedCost, measure_verify_cost

            # NOTE: before the scheduler thread starts: the timing rows write K/V into a still empty pool
            self.scheduler.spec.cost = measure_verify_cost(model, runner.kv, args.speculative_num_draft_tokens,
                                                             loaded.config.vocab_size)
            self.scheduler.spec.observed = ObservedCost(self.scheduler.spec.cost)  # then corrected by real steps
            logger.info("speculative verify cost in decode steps: %s", self.scheduler.spec.cost.describe())
        self._model_dtype = dtype
        self._init_lora()  # runtime/lora/engine_adapters.py: the adapter pool, --lora-paths read now
        vocab_size = loaded.config.vocab_size  # (the lambda must not keep `loaded`, whose weights it would pin)
        self._grammar = LazyGrammar(lambda: make_grammar_compiler(args, self.tokenizer, vocab_size))
        self.disagg = None  # prefill/decode disaggregation: this engine's KV export/import (runtime/distributed/disagg.py)
        if args.disaggregation_mode is not None:
            from sgl.runtime.distributed.disagg import Disaggregation

            self.disagg = Disaggregation(self, args.disaggregation_mode, args.disaggregation_transfer_timeout)
        self._sinks: dict[str, RequestSink] = {}
        self._cancelled: set[str] = set()  # aborted before reaching the scheduler (e.g. compiling)
        self._commands: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._stopped = threading.Event()
        self._loop_error: Optional[BaseException] = None
        release_idle_memory()  # the loader's freed temporaries (the tokenizer's JSON parse: ~15 MB)
        self._thread = threading.Thread(target=self._loop, name="sgl-scheduler", daemon=True)
        self._thread.start()
        logger.info("engine ready: %s, KV pool %d tokens, %d thread(s), loaded in %.1fs",
                    self.model_path, pool_size, args.resolved_num_threads, self.load_time)

    # ---- the scheduler thread ------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                block = not self.scheduler.has_work
                while True:
                    cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                    try:
                        cmd()
                    except Exception:  # noqa: BLE001 - a bug in one command must not stop the scheduler thread
                        logger.exception("engine command %r failed", cmd)
                    block = False
            except queue.Empty:
                pass
            if not self.scheduler.has_work:
                continue
            try:
                self.scheduler.step()
                self._step_failures = 0
            except TensorParallelError as e:  # a rank is gone: no step can run again
                self._fatal(self.tp.diagnose(str(e)) if self.tp is not None else str(e))
            except Exception as e:  # noqa: BLE001
                # NOTE: one request's failure never gets here (the scheduler reruns a failed batch row by row
                # and fails only the rows that fail alone). Here every row failed: fail the running requests
                # (500) and keep serving; a second such step in a row means the engine is broken: stop loudly.
                self._step_failures += 1
                message = f"internal error: {type(e).__name__}: {e}"
                logger.exception("scheduler step failed (%d in a row)", self._step_failures)
                if self._step_failures >= 2:
                    self._fatal(f"the scheduler step failed twice in a row, last: {message}")
                else:
                    for req in list(self.scheduler.running):
                        self.scheduler.abort(req.rid, message, internal=True)
            if not self.scheduler.has_work:
                self.scheduler.check_integrity()
                self._release_idle_memory()

    def _fatal(self, message: str) -> None:
        """The engine cannot run another step (any thread): abort everything, stop, tell the server."""
        if self.fatal_error is not None:
            return
        self.fatal_error = message
        logger.critical("%s", message)
        if hasattr(self, "_commands"):  # (not while still loading: rank 0's rendezvous fails on its own)
            def stop() -> None:
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self.scheduler.abort(req.rid, f"engine stopped: {message}", internal=True)
                self._stopped.set()
            self._commands.put(stop)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run fn in the scheduler thread and wait for its result."""
        done: "queue.Queue[tuple[bool, Any]]" = queue.Queue()

        def run() -> None:
            try:
                done.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                done.put((False, e))

        self._commands.put(run)
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def _on_output(self, req: Req) -> None:
        sink = self._sinks.get(req.rid)
        if sink is None:
            return
        out = self.scheduler.output.build(req)
        if req.finished:
            del self._sinks[req.rid]
        sink.put(out, req.finished)

    # ---- submission ------------------------------------------------------------------------
    def _tokenize(self, r: GenerateRequest) -> list[int]:
        self._check_lora_path(r)
        ids = r.input_ids if r.input_ids is not None else self.tokenizer.encode(r.text or "")
        if not ids:
            raise RequestError("the prompt is empty: text must contain at least one token")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise RequestError(f"input_ids contains a token id outside the vocabulary [0, {self.model_config.vocab_size})")
        validate_prompt_length(len(ids), r.sampling_params.max_new_tokens, self.context_length)
        return ids

    @property
    def grammar(self) -> Any:
        """The grammar compiler (None with grammar_backend "none"), built on the first constrained request."""
        return self._grammar.get()

    @grammar.setter
    def grammar(self, compiler: Any) -> None:
        self._grammar.set(compiler)

    def _submit(self, reqs: list[GenerateRequest], sinks: list[RequestSink]) -> None:
        """Validate everything first (a bad request raises before any is queued), then queue."""
        if self.fatal_error is not None:
            raise RuntimeError(f"the engine stopped: {self.fatal_error}")
        prepared = []
        for r in reqs:
            ids = self._tokenize(r)
            constraint = r.sampling_params.constraint
            if constraint is not None:
                if self.grammar is None:
                    raise RequestError("constrained decoding (regex/json_schema/ebnf/choices) is not available: "
                                       "grammar_backend is 'none'")
                try:
                    self.grammar.validate(*constraint)
                except ValueError as e:  # GrammarError: names the keyword and the schema path
                    raise RequestError(f"sampling_params.{constraint[0]}: {e}") from e
            prepared.append((r, ids, constraint))
        for (r, ids, constraint), sink in zip(prepared, sinks):
            self._sinks[r.rid] = sink
            if constraint is None:
                self._commands.put(lambda r=r, ids=ids: self._add(r, ids, None))
            else:
                self._compile_then_add(r, ids, constraint)

    def _compile_then_add(self, r: GenerateRequest, ids: list[int], constraint: tuple[str, Any]) -> None:
        assert self.grammar is not None
        t0 = time.monotonic()
        fut = self.grammar.compile_async(*constraint)
        cache_hit = fut.done()

        def done(f: Any) -> None:
            try:
                matcher = f.result().matcher()
                if not cache_hit:
                    record_grammar_compilation(time.monotonic() - t0)
            except Exception as e:  # a compile error or timeout ends this request only
                message = f"grammar compilation failed: {e}"  # NOTE: `e` is unbound once the except block ends
                self._commands.put(lambda: self._fail(r, message))
                return
            self._commands.put(lambda: self._add(r, ids, matcher))

        fut.add_done_callback(done)

    def _add(self, r: GenerateRequest, ids: list[int], matcher: Any) -> None:
        if r.rid in self._cancelled:
            self._cancelled.discard(r.rid)
            self._fail(r, "aborted by the client")
            return
        req = Req.from_request(r, ids, self.scheduler.next_arrival())
        req.grammar = matcher
        if r.lora_path is not None:
            try:  # the reference is dropped by the scheduler when the request finishes
                req.lora = self.lora_pool.acquire(r.lora_path)
            except (AdapterError, OSError) as e:  # unloaded meanwhile, or its folder went away
                self._fail(r, str(e))
                return
        if matcher is not None and self.server_args.grammar_budget:
            matcher.set_token_budget(req.params.max_new_tokens)  # close the output within the budget
        if matcher is not None and hasattr(matcher, "set_backtrack_budget"):
            matcher.set_backtrack_budget(self.server_args.grammar_backtrack_budget)
        self.scheduler.add_request(req)

    def _fail(self, r: GenerateRequest, message: str) -> None:
        sink = self._sinks.pop(r.rid, None)
        if sink is not None:
            sink.put(finished_dict(r.rid, finish_reason_abort(message)), True)

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt: PromptArg = None, sampling_params: Any = None, input_ids: Any = None,
                 return_logprob: Any = False, logprob_start_len: Any = None, top_logprobs_num: Any = None,
                 return_text_in_logprobs: bool = False, stream: bool = False, rid: Any = None,
                 priority: Optional[int] = None, priority_class: Optional[str] = None,
                 lora_path: Any = None) -> Any:
        """Generate for one prompt (dict), a list of prompts or n > 1 (list), or stream cumulative dicts.

        `lora_path` names a loaded LoRA adapter (SGLang's semantics), one for all prompts or a list."""
        reqs, is_batch = build_requests(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                                        top_logprobs_num, return_text_in_logprobs, stream, rid, priority,
                                        priority_class, lora_path)
        if stream:
            if len(reqs) != 1:
                raise RequestError("stream=True takes a single prompt with n = 1")
            return self._stream_sync(reqs[0])
        outs = self.submit_and_wait(reqs)
        return outs if is_batch else outs[0]

    def submit_and_wait(self, reqs: list[GenerateRequest]) -> list[dict[str, Any]]:
        sinks = [RequestSink.threaded() for _ in reqs]
        self._submit(reqs, sinks)
        return [s.wait_final() for s in sinks]

    def _stream_sync(self, req: GenerateRequest) -> Iterator[dict[str, Any]]:
        sink = RequestSink.threaded()
        self._submit([req], [sink])
        finished = False
        try:
            for out, finished in sink.iter_sync():
                yield out
        finally:
            if not finished:
                self.abort(req.rid)

    async def async_generate(self, prompt: PromptArg = None, sampling_params: Any = None, input_ids: Any = None,
                             return_logprob: Any = False, logprob_start_len: Any = None,
                             top_logprobs_num: Any = None, return_text_in_logprobs: bool = False,
                             stream: bool = False, rid: Any = None, priority: Optional[int] = None,
                             priority_class: Optional[str] = None, lora_path: Any = None) -> Any:
        reqs, is_batch = build_requests(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                                        top_logprobs_num, return_text_in_logprobs, stream, rid, priority,
                                        priority_class, lora_path)
        if stream:
            if len(reqs) != 1:
                raise RequestError("stream=True takes a single prompt with n = 1")
            return self.stream_request(reqs[0])
        outs = await asyncio.gather(*[self._final_async(r) for r in reqs])
        return list(outs) if is_batch else outs[0]

    async def _final_async(self, req: GenerateRequest) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for out in self.stream_request(req):
            last = out
        return last

    async def stream_request(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """Cumulative outputs of one request; closing or cancelling the iterator aborts it."""
        sink = RequestSink.for_loop(asyncio.get_running_loop())
        if req.sampling_params.constraint is not None and self._grammar.peek() is None:
            await asyncio.to_thread(self._grammar.get)  # its one build (~1 s) must not stall the event loop
        self._submit([req], [sink])
        finished = False
        try:
            while not finished:
                out, finished = await sink.get_async()
                yield out
        finally:
            if not finished:
                self.abort(req.rid)

    def abort(self, rid: str) -> None:
        self._commands.put(lambda: self._abort(rid))

    def _abort(self, rid: str) -> None:
        if not self.scheduler.abort(rid) and rid in self._sinks:
            self._cancelled.add(rid)  # not queued yet: its grammar is still compiling

    def flush_cache(self) -> bool:
        """Drop every cached prefix and compiled grammar, as SGLang's /flush_cache does (its grammar backend's reset);
        only when idle. A grammar still compiling for a request keeps serving that request."""
        def flush() -> bool:
            flushed = self.scheduler.flush_cache()
            if flushed:  # NOTE: a command: no step follows while idle, so it gives the freed KV pages back itself
                self._release_idle_memory()
            return flushed
        flushed = bool(self._call(flush))
        compiler = self._grammar.peek()
        if flushed and compiler is not None:
            compiler.clear_cache()
        return flushed

    def _release_idle_memory(self) -> int:
        """On the scheduler thread, idle: the prefill scratch, the KV pages of freed slots, free heap pages
        (runtime/idle_memory.py)."""
        return release_idle_memory(self.scheduler.allocator, getattr(self.scheduler.runner, "kv", None))

    def check_integrity(self) -> None:
        self._call(self.scheduler.check_integrity)

    def wait_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while self._call(lambda: self.scheduler.has_work):
            if time.monotonic() > end:
                raise TimeoutError("engine did not become idle")
            time.sleep(0.01)

    def shutdown(self) -> None:
        if self._stopped.is_set():
            if self.tp is not None:  # stopped by a fatal error: the surviving ranks still go
                self.tp.shutdown()
            return
        try:
            self._call(lambda: [self.scheduler.abort(r.rid, "engine shut down")
                                for r in list(self.scheduler.running) + list(self.scheduler.waiting)], timeout=10)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self._stopped.set()
        self._thread.join(timeout=10)
        if hasattr(self.scheduler.runner, "close"):  # the grammar-mask worker thread
            self.scheduler.runner.close()
        grammar = self._grammar.peek()  # (never built just to be shut down)
        if grammar is not None and hasattr(grammar, "shutdown"):
            grammar.shutdown()
        if self.tp is not None:
            self.tp.shutdown()
        if self.disagg is not None:
            self.disagg.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

