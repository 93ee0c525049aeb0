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
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

SCHEDULE_POLICIES = ("fcfs", "lpm", "priority")
GRAMMAR_BACKENDS = ("outlines", "xgrammar", "llguidance", "none")


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
    # Memory and batching
    max_total_tokens: Optional[int] = None  # KV pool slots; None = from mem_fraction_static
    mem_fraction_static: float = 0.25  # fraction of free memory for the KV pool when unset
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096  # per-step token budget for prefill work
    chunked_prefill_size: int = 512  # -1 disables chunking
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    # Constrained decoding
    grammar_backend: str = "llguidance"
    grammar_compile_timeout: float = 30.0
    json_whitespace: str = "compact"
    json_strict: bool = True  # --no-json-strict: overlapping oneOf as anyOf, uniqueItems ignored (warned)
    disable_jump_forward: bool = False
    # Execution
    num_threads: Optional[int] = None  # torch CPU threads; None = one per physical core
    random_seed: int = 0
    tp_size: int = 1
    dp_size: int = 1
    speculative_algorithm: Optional[str] = None
    lora_paths: Optional[list[str]] = None
    # Server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    enable_metrics: bool = False
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16  # largest `n` a request may ask for
    log_level: str = "info"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(f"grammar_backend must be one of {GRAMMAR_BACKENDS}, got {self.grammar_backend!r}")
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise ValueError("chunked_prefill_size must be -1 (disabled) or positive")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be positive")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.json_whitespace not in ("compact", "flexible"):
            raise ValueError("json_whitespace must be 'compact' or 'flexible'")
        if self.tp_size != 1 or self.dp_size != 1:
            raise ValueError("tp_size and dp_size > 1 are not supported on this runtime yet")

    @property
    def resolved_num_threads(self) -> int:
        return self.num_threads or _physical_cores()

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
            else:
                conv = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
                kwargs: dict[str, Any] = {"type": conv, "default": default}
                if f.name == "schedule_policy":
                    kwargs["choices"] = SCHEDULE_POLICIES
                if f.name == "grammar_backend":
                    kwargs["choices"] = GRAMMAR_BACKENDS
                parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        """Build from keyword arguments, naming any unknown one (a typo should not pass silently)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

