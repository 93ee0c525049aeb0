"""Server configuration: one frozen dataclass whose defaults argparse reads.

Every knob has its default here and only here. The CLI (`sgl serve`), `sgl.Engine(**kwargs)` and
`sgl.Runtime(**kwargs)` all build a `ServerArgs`; keyword names are the CLI flags with `_` for `-`.

    >>> args = ServerArgs(model_path="default", chunked_prefill_size=256)
    >>> args.chunked_prefill_size
    256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sgl.runtime.protocol import PRIORITY_CLASSES

SCHEDULE_POLICIES = ("fcfs", "lpm", "priority")
GRAMMAR_BACKENDS = ("outlines", "xgrammar", "llguidance", "none")
WEIGHT_FORMATS = ("auto", "fp32", "native")  # runtime/models/loader.py: what auto picks
QUANTIZE_TYPES = ("q8_0", "q4_0")  # --quantize for Hugging Face folders (round-to-nearest per 32-block)
# runtime/speculative/: the drafters built so far; EAGLE3 is EAGLE's drafter with an EAGLE-3 head (SGLang's name)
SPECULATIVE_ALGORITHMS = ("NGRAM", "DRAFT", "MEDUSA", "EAGLE", "EAGLE3")
SPECULATIVE_ALIASES = {"STANDALONE": "DRAFT"}  # SGLang's name for a separate draft model
MODEL_DRAFTERS = ("DRAFT", "MEDUSA", "EAGLE", "EAGLE3")  # the algorithms with weights of their own
PREEMPTION_MODES = ("swap", "recompute")
DISAGGREGATION_MODES = ("prefill", "decode")
CPU_ACT_QUANTS = ("q16", "none", "q8")  # activations of the native CPU kernels (sgl.kernels.cpu.ACT_QUANT)
KV_CACHE_DTYPES = ("auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16")  # runtime/executor/kv_cache.py
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")  # == sgl.runtime.router.policy.POLICIES
# field -> the values its CLI flag accepts (argparse choices)
_CHOICES = {"schedule_policy": SCHEDULE_POLICIES, "grammar_backend": GRAMMAR_BACKENDS, "weight_format": WEIGHT_FORMATS,
            "preemption_mode": PREEMPTION_MODES, "router_policy": ROUTER_POLICIES, "quantize": QUANTIZE_TYPES,
            "speculative_algorithm": (*SPECULATIVE_ALGORITHMS, *SPECULATIVE_ALIASES),
            "disaggregation_mode": DISAGGREGATION_MODES, "cpu_act_quant": CPU_ACT_QUANTS,
            "kv_cache_dtype": KV_CACHE_DTYPES}


def _physical_cores() -> int:
    # NOTE: hyper-threads do not help a memory-bound GEMV; count cores, not logical CPUs.
    try:
        with open("/proc/cpuinfo") as f:
            pairs = set()
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
            if pairs:
                return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerArgs:
    # Model
    model_path: str = "default"
    tokenizer_path: Optional[str] = None
    served_model_name: Optional[str] = None
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    context_length: Optional[int] = None
    device: str = "auto"
    weight_format: str = "auto"  # auto = native (GGUF blocks in the CPU kernels) when built and quantized, else fp32
    quantize: Optional[str] = None  # q8_0 | q4_0: quantize a Hugging Face folder at load and run native
    # Several models (runtime/model_pool.py): `--model-path` repeated (NAME=PATH or PATH) fills model_paths
    model_paths: Optional[list[str]] = None  # all model specs when more than one is served
    models: Optional[str] = None  # JSON file: [{"name", "model_path", <per-model ServerArgs fields>...}]
    model_memory_budget: Optional[float] = None  # GB for resident models (weights + KV); None = all stay loaded
    model_fair_wait: float = 5.0  # s a request waits for memory before the busy models it waits for drain
    router_config: Optional[str] = None  # JSON file of the `model: "auto"` router (runtime/model_router.py)
    cpu_act_quant: str = "q16"  # native CPU kernels: q16 = int16 activations per block (fast, greedy = fp32), none = exact fp32, q8 = llama.cpp's
    # Native CPU kernels: no packed copies of block weights (q8: the layers' and the lm_head's, q16: the lm_head's;
    # the same bits, a batch-1 step ~1.3x faster, the weights' bytes once more in memory)
    disable_cpu_weight_packing: bool = False
    # Memory and batching
    max_total_tokens: Optional[int] = None  # KV pool slots; None = from mem_fraction_static
    # KV pool element type. auto = fp16 for native GGUF weights on the CPU (half the KV memory and attention
    # bytes; llama.cpp's default f16 KV), else the model dtype. fp16/bf16 under fp32 activations: stored
    # rounded to nearest, widened exactly when read (runtime/executor/kv_cache.py)
    kv_cache_dtype: str = "auto"
    mem_fraction_static: float = 0.25  # fraction of free memory for the KV pool when unset
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096  # per-step token budget for prefill work
    chunked_prefill_size: int = 512  # -1 disables chunking
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    # Priority classes and preemption (runtime/scheduler/fair_share.py, preemption.py; runtime/cache/host_pool.py)
    priority_weights: str = "realtime=10,standard=5,batch=1"  # admitted prefill tokens per class follow these
    preemption_mode: str = "swap"  # swap: KV to the host tier and back (no recompute); recompute: drop and redo
    disable_latency_preemption: bool = False  # realtime arrivals wait for room instead of preempting
    swap_space: float = 1.0  # GB of host memory for swapped KV (allocated lazily: pages only when used)
    swap_dir: Optional[str] = None  # back the host tier with a memory-mapped file in this directory
    hierarchical_cache: bool = False  # radix-tree leaves LRU would evict are demoted to host memory instead
    host_cache_tokens: int = 32768  # --hierarchical-cache: host-tier KV slots for demoted prefixes
    # Constrained decoding
    grammar_backend: str = "llguidance"
    grammar_compile_timeout: float = 30.0
    grammar_cache_max_bytes: int = 64 * 1024 * 1024  # compiled grammars kept (estimated bytes, LRU)
    json_whitespace: str = "compact"
    # --json-strict: reject JSON-schema keywords a grammar cannot enforce exactly; default: semantic guards
    # check them per value and backtrack on a violation (grammars/guards.py)
    json_strict: bool = False
    grammar_backtrack_budget: int = 256  # output tokens guard rollbacks may discard; past it: abort naming the keyword
    disable_jump_forward: bool = False
    grammar_budget: bool = True  # --no-grammar-budget: constrained outputs may end on length unparsed
    # Execution
    num_threads: Optional[int] = None  # torch CPU threads; None = one per physical core
    random_seed: int = 0
    tp_size: int = 1  # tensor-parallel ranks (runtime/distributed/): one machine spawns them, torchrun spans machines
    disaggregation_mode: Optional[str] = None  # prefill | decode: this server's side of a PD pair (runtime/distributed/disagg.py)
    disaggregation_transfer_timeout: float = 30.0  # seconds an exported prompt KV waits for its decode server
    dist_timeout: float = 120.0  # seconds a tensor-parallel collective may wait before the group is declared dead
    dp_size: int = 1
    router_policy: str = "cache_aware"  # --dp-size > 1: the router's policy (runtime/router/policy.py)
    router_balance_threshold: int = 8  # --dp-size > 1: in-flight requests over the least loaded before balancing
    speculative_algorithm: Optional[str] = None  # NGRAM | DRAFT | MEDUSA | EAGLE (runtime/speculative/); None = off
    # DRAFT: a small model with the same tokenizer; MEDUSA, EAGLE: the head (None = the shipped one)
    speculative_draft_model_path: Optional[str] = None
    speculative_medusa_choices: Optional[str] = None  # MEDUSA: the static tree as JSON ([[0], [1], [0, 0]]); None = default
    speculative_num_draft_tokens: int = 4  # draft tokens verified per decoding request and step
    speculative_num_steps: Optional[int] = None  # EAGLE: head steps per draft (unset: num_draft_tokens for a chain, 4 for a tree)
    speculative_eagle_topk: int = 1  # EAGLE: children per expanded node and nodes expanded per level (1 = a chain)
    speculative_ngram_min_match_window_size: int = 2  # NGRAM: shortest suffix matched (1-grams mostly miss)
    speculative_ngram_max_match_window_size: int = 4  # NGRAM: longest suffix matched (tried first)
    speculative_ngram_max_bfs_breadth: int = 1  # NGRAM: continuations merged into one draft tree (1 = a chain)
    speculative_ngram_capacity: int = 0  # NGRAM: tokens of finished requests matched too (0 = own sequence only)
    # a CORPUS lane (runtime/speculative/ngram_corpus.py): text the model typically writes, after NGRAM's lane and
    # before a model drafter; a JSON-lines file of {"text": ...}, or "default" (the default model's); None = none
    speculative_ngram_corpus: Optional[str] = None
    # DRAFT, MEDUSA, EAGLE: NGRAM drafts first (the settings above); the model drafts where it finds no match
    speculative_ngram_first: bool = False
    speculative_max_batch: int = 4  # more decoding requests than this in a step: no drafts (compute-bound)
    # every decoding row drafts num_draft_tokens, whatever the measured verify cost (tests that need verify rows)
    speculative_always_draft: bool = False
    # LoRA (runtime/lora/): `name=path` or a bare path (named by its folder); more at run time via /load_lora_adapter
    lora_paths: Optional[list[str]] = None
    max_loras_per_batch: int = 8  # distinct adapters in one batch (requests over it wait)
    max_lora_rank: Optional[int] = None  # adapters of a higher rank are refused; None = any
    max_loaded_loras: Optional[int] = None  # adapters resident in memory (LRU-evicted, reloaded on use); None = all
    # Server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = dataclasses.field(default=None, repr=False)  # NOTE: repr=False: never in logs
    allow_unauthenticated: bool = False  # a non-loopback --host without --api-key(s) is refused unless set
    cors_allow_origins: Optional[str] = None  # comma-separated origins ("*" = any); None = no CORS headers
    allowed_path_roots: Optional[str] = None  # comma-separated dirs admin load routes may read; None = none
    enable_metrics: bool = False
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16  # largest `n` a request may ask for
    # Cost limits per HTTP request (runtime/limits.py; each over-limit request is a 400 naming the field)
    max_request_new_tokens: int = 65536  # sum of max_new_tokens over prompts x n
    max_prompt_tokens: Optional[int] = None  # per prompt; None = the context window
    max_batch_size: int = 256  # prompts x n
    max_stop_strings: int = 32
    max_stop_string_chars: int = 256
    max_logit_bias: int = 1024
    max_grammar_bytes: int = 64 * 1024  # regex / json_schema / ebnf source
    grammar_max_size: int = 10_000  # counted repetitions / maxLength / maxItems multiplied out
    disable_web_console: bool = False  # the playground + dashboard page at `/` (runtime/server/console/)
    # Tenancy and health (runtime/tenancy/, runtime/server/tenancy_routes.py, runtime/server/health.py)
    api_keys: Optional[str] = None  # JSON file {"<key>": {"name", "class", "daily_token_budget", ...}}
    usage_db: Optional[str] = None  # SQLite file of usage per key per day; None = in memory (lost on restart)
    usage_timezone: str = "UTC"  # budgets reset at midnight here (IANA name)
    price_input: float = 0.0  # per 1K uncached prompt tokens; any price set adds `cost` to meta_info / usage
    price_output: float = 0.0  # per 1K completion tokens
    price_cached: Optional[float] = None  # per 1K prompt tokens from the prefix cache; None = price_input
    max_queue_depth: int = 1024  # waiting requests; at it, new requests get 503 + Retry-After
    health_latency_deadline: float = 0.5  # seconds for /health/ready's 1-token generation
    log_level: str = "info"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(f"grammar_backend must be one of {GRAMMAR_BACKENDS}, got {self.grammar_backend!r}")
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise ValueError("chunked_prefill_size must be -1 (disabled) or positive")
        self.priority_weight_map  # noqa: B018 - validates the spec
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GB, got {self.swap_space}")
        if self.host_cache_tokens < 1:
            raise ValueError(f"host_cache_tokens must be positive, got {self.host_cache_tokens}")
        if self.swap_dir is not None and not os.path.isdir(self.swap_dir):
            raise ValueError(f"swap_dir: no such directory {self.swap_dir!r}")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be positive")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.cpu_act_quant not in CPU_ACT_QUANTS:
            raise ValueError(f"cpu_act_quant must be one of {CPU_ACT_QUANTS}, got {self.cpu_act_quant!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_TYPES:
            raise ValueError(f"quantize must be one of {QUANTIZE_TYPES} (or unset), got {self.quantize!r}")
        if self.quantize is not None and self.weight_format == "fp32":
            raise ValueError("quantize needs weight_format auto or native (quantized weights run native)")
        if self.grammar_backtrack_budget < 0:
            raise ValueError("grammar_backtrack_budget must be >= 0")
        if self.json_whitespace not in ("compact", "flexible"):
            raise ValueError("json_whitespace must be 'compact' or 'flexible'")
        for name in ("max_request_new_tokens", "max_batch_size", "max_stop_strings", "max_stop_string_chars",
                     "max_logit_bias", "max_grammar_bytes", "grammar_max_size", "grammar_cache_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive (or unset), got {self.max_prompt_tokens}")
        for name in ("price_input", "price_output", "price_cached"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative (a price per 1K tokens), got {getattr(self, name)}")
        if self.max_queue_depth < 1:
            raise ValueError(f"max_queue_depth must be positive, got {self.max_queue_depth}")
        if self.health_latency_deadline <= 0:
            raise ValueError(f"health_latency_deadline must be positive seconds, got {self.health_latency_deadline}")
        try:
            ZoneInfo(self.usage_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"usage_timezone must be an IANA time zone such as 'UTC' or 'Europe/Paris', "
                             f"got {self.usage_timezone!r}") from None
        if self.api_keys is not None and not os.path.isfile(self.api_keys):
            raise ValueError(f"api_keys: no such file {self.api_keys!r} (a JSON object of keys, see README)")
        if self.speculative_algorithm in SPECULATIVE_ALIASES:  # NOTE: frozen: the alias becomes its canonical name
            object.__setattr__(self, "speculative_algorithm", SPECULATIVE_ALIASES[self.speculative_algorithm])
        if self.speculative_algorithm is not None and self.speculative_algorithm not in SPECULATIVE_ALGORITHMS:
            raise ValueError(f"speculative_algorithm must be one of {SPECULATIVE_ALGORITHMS} (or unset), "
                             f"got {self.speculative_algorithm!r}")
        if self.speculative_algorithm == "DRAFT" and self.speculative_draft_model_path is None:
            raise ValueError("speculative_algorithm DRAFT needs speculative_draft_model_path")
        if self.speculative_algorithm == "EAGLE3" and self.speculative_draft_model_path is None:
            raise ValueError("speculative_algorithm EAGLE3 needs speculative_draft_model_path (an EAGLE-3 head's "
                             "folder; the default model's shipped head is EAGLE's)")
        if self.speculative_algorithm == "EAGLE3" and self.tp_size > 1:
            raise ValueError("speculative_algorithm EAGLE3 reads the target's intermediate states, which tp_size > 1 "
                             "does not hand over (EAGLE, MEDUSA, NGRAM and DRAFT run under it)")
        if self.speculative_draft_model_path is not None and self.speculative_algorithm not in MODEL_DRAFTERS:
            raise ValueError("speculative_draft_model_path goes with speculative_algorithm DRAFT, MEDUSA, EAGLE or "
                             "EAGLE3")
        if self.speculative_medusa_choices is not None:
            if self.speculative_algorithm != "MEDUSA":
                raise ValueError("speculative_medusa_choices goes with speculative_algorithm MEDUSA")
            try:
                choices = json.loads(self.speculative_medusa_choices)
                ok = isinstance(choices, list) and choices and all(
                    isinstance(c, list) and c and all(isinstance(i, int) and i >= 0 for i in c) for c in choices)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError("speculative_medusa_choices must be a JSON list of non-empty lists of top-k "
                                 f"indices such as [[0], [1], [0, 0]], got {self.speculative_medusa_choices!r}")
        if not 1 <= self.speculative_eagle_topk <= 16:
            raise ValueError(f"speculative_eagle_topk must be 1..16, got {self.speculative_eagle_topk}")
        if self.speculative_num_steps is not None and self.speculative_num_steps < 1:
            raise ValueError(f"speculative_num_steps must be positive, got {self.speculative_num_steps}")
        if self.speculative_num_draft_tokens < 1:
            raise ValueError(f"speculative_num_draft_tokens must be positive, got {self.speculative_num_draft_tokens}")
        if not 1 <= self.speculative_ngram_min_match_window_size <= self.speculative_ngram_max_match_window_size:
            raise ValueError("need 1 <= speculative_ngram_min_match_window_size <= "
                             "speculative_ngram_max_match_window_size")
        if self.speculative_ngram_max_bfs_breadth < 1 or self.speculative_ngram_capacity < 0:
            raise ValueError("speculative_ngram_max_bfs_breadth must be >= 1 and speculative_ngram_capacity >= 0")
        if self.speculative_ngram_first and self.speculative_algorithm not in MODEL_DRAFTERS:
            raise ValueError("speculative_ngram_first goes with speculative_algorithm DRAFT, MEDUSA, EAGLE or EAGLE3 "
                             f"(it puts NGRAM in front of a model drafter), got {self.speculative_algorithm!r}")
        if self.speculative_ngram_corpus is not None and self.speculative_algorithm is None:
            raise ValueError("speculative_ngram_corpus needs a speculative_algorithm (its CORPUS lane drafts before "
                             "a model drafter, after NGRAM)")
        if self.speculative_max_batch < 0:
            raise ValueError(f"speculative_max_batch must be >= 0, got {self.speculative_max_batch}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1 (the number of tensor-parallel ranks), got {self.tp_size}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be positive seconds, got {self.dist_timeout}")
        if self.disaggregation_mode not in (None, *DISAGGREGATION_MODES):
            raise ValueError(f"disaggregation_mode must be one of {DISAGGREGATION_MODES} (or unset), "
                             f"got {self.disaggregation_mode!r}")
        if self.disaggregation_transfer_timeout <= 0:
            raise ValueError(f"disaggregation_transfer_timeout must be positive seconds, "
                             f"got {self.disaggregation_transfer_timeout}")
        if self.tp_size > 1 and self.dp_size > 1:
            raise ValueError("tp_size > 1 with dp_size > 1 is not supported: use one or the other")
        if self.tp_size > 1 and self.lora_paths:
            raise ValueError(f"lora_paths with tp_size > 1 is not supported: adapters are not split over the ranks "
                             f"(got tp_size {self.tp_size}); serve LoRA adapters at tp_size 1, or dp_size > 1")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1 (the number of engine replicas), got {self.dp_size}")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES}, got {self.router_policy!r}")
        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        for name in ("max_lora_rank", "max_loaded_loras"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if (self.model_paths or self.models) and self.dp_size > 1:
            raise ValueError("several models (--model-path repeated / --models) run in one process; --dp-size must be 1")
        if self.model_fair_wait < 0:
            raise ValueError(f"model_fair_wait must be >= 0 seconds, got {self.model_fair_wait}")
        if self.model_memory_budget is not None and self.model_memory_budget <= 0:
            raise ValueError(f"model_memory_budget must be positive GB (or unset), got {self.model_memory_budget}")
        if self.router_balance_threshold < 0:
            raise ValueError(f"router_balance_threshold must be >= 0, got {self.router_balance_threshold}")

    @property
    def resolved_num_threads(self) -> int:
        return self.num_threads or _physical_cores()

    @property
    def priority_weight_map(self) -> dict[str, float]:
        """`realtime=10,standard=5,batch=1` as {class: weight}; a class left out keeps weight 1."""
        out = {c: 1.0 for c in PRIORITY_CLASSES}
        for part in filter(None, (p.strip() for p in self.priority_weights.split(","))):
            name, sep, value = part.partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not sep or name.strip() not in PRIORITY_CLASSES or not weight > 0:
                raise ValueError(f"priority_weights: {part!r} is not <class>=<positive weight> with class one of "
                                 f"{PRIORITY_CLASSES} (e.g. realtime=10,standard=5,batch=1)")
            out[name.strip()] = weight
        return out

    @property
    def chunk_size(self) -> Optional[int]:
        """The prefill chunk size in tokens, or None when chunking is disabled."""
        return None if self.chunked_prefill_size == -1 else self.chunked_prefill_size

    def replace(self, **changes: Any) -> "ServerArgs":
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag-name` per field; defaults and types come from the dataclass."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.type in ("bool", bool):
                # NOTE: a flag that defaults to True needs a --no- form to be turned off.
                action = argparse.BooleanOptionalAction if default else "store_true"
                parser.add_argument(flag, action=action, default=default)
            elif f.name == "lora_paths":
                parser.add_argument(flag, nargs="*", default=default)
            elif f.name == "model_path":  # repeatable: several models on one server (from_cli_args splits)
                parser.add_argument(flag, action="append", default=None,
                                    help="a model (NAME=PATH or PATH); repeat to serve several (default: default)")
            elif f.name == "model_paths":  # the same as repeating --model-path (both may be combined)
                parser.add_argument(flag, nargs="*", default=None, help="several models: NAME=PATH or PATH each")
            else:
                conv = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
                kwargs: dict[str, Any] = {"type": conv, "default": default}
                if f.name in _CHOICES:
                    kwargs["choices"] = _CHOICES[f.name]
                parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "ServerArgs":
        values = {f.name: getattr(ns, f.name, None) for f in fields(cls) if f.name not in ("model_path", "model_paths")}
        paths = list(getattr(ns, "model_path", None) or []) + list(getattr(ns, "model_paths", None) or [])
        values.update(split_model_paths(paths or None, values.get("served_model_name")))
        return cls(**values)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        """Build from keyword arguments, naming any unknown one (a typo should not pass silently)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)


def split_model_paths(paths: Any, served_model_name: Optional[str] = None) -> dict[str, Any]:
    """`--model-path` values (a str, a list, or None) -> ServerArgs fields. One bare path stays exactly as
    before; one NAME=PATH serves PATH under NAME; several fill model_paths (model_path = the first's path)."""
    from sgl.runtime.model_names import parse_model_spec

    if paths is None:
        return {"model_path": "default"}
    if isinstance(paths, str):
        paths = [paths]
    if len(paths) == 1:
        spec = parse_model_spec(paths[0])
        if spec.name == spec.model_path:
            return {"model_path": spec.model_path}
        return {"model_path": spec.model_path, "served_model_name": served_model_name or spec.name}
    return {"model_path": parse_model_spec(paths[0]).model_path, "model_paths": list(paths)}
