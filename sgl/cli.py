"""The `sgl` command.

    sgl serve --model-path default --port 30000           # the HTTP server (every ServerArgs flag)
    sgl generate "The capital of France is" --max-new-tokens 16 --temperature 0
    sgl generate "Name three colors" --chat --stream
    sgl router --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002 --port 30000

No torch at import time: each subcommand imports the runtime inside its function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence


def _server_args(ns: argparse.Namespace) -> Any:
    from sgl.runtime.config import ServerArgs

    return ServerArgs.from_cli_args(ns)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--min-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible sampling)")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--regex", default=None, help="constrain the output to this regex")
    g.add_argument("--json-schema", default=None, help="constrain the output to this JSON schema (a string)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--json", action="store_true", help="print the full result as JSON (text, ids, meta_info)")


def _sampling_params(ns: argparse.Namespace) -> dict[str, Any]:
    sp: dict[str, Any] = {"max_new_tokens": ns.max_new_tokens}
    for flag, key in (("min_new_tokens", "min_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                      ("top_k", "top_k"), ("min_p", "min_p"), ("seed", "sampling_seed"), ("stop", "stop"),
                      ("regex", "regex"), ("json_schema", "json_schema")):
        value = getattr(ns, flag)
        if value is not None:
            sp[key] = value
    if ns.ignore_eos:
        sp["ignore_eos"] = True
    return sp


def cmd_serve(ns: argparse.Namespace) -> int:
    from sgl.runtime.security import check_bind_policy

    args = ns.server_args
    try:  # NOTE: before any model loads; the router (--dp-size) listens on the same --host
        check_bind_policy(args.host, args.api_key, args.api_keys, args.allow_unauthenticated)
    except ValueError as exc:
        print(f"sgl serve: error: {exc}", file=sys.stderr)
        return 2
    if ns.server_args.dp_size > 1:  # N replica processes behind the router (runtime/router/launch.py)
        from sgl.runtime.router.launch import launch_dp

        launch_dp(ns.server_args)
        return 0
    if ns.server_args.tp_size > 1 and os.environ.get("RANK", "0") != "0":  # torchrun: ranks > 0 follow rank 0
        from sgl.runtime.distributed.worker import run_worker
        from sgl.runtime.server.launch import configure_logging

        configure_logging(ns.server_args.log_level)
        return run_worker(ns.server_args)
    from sgl.runtime.server.launch import launch_server

    return launch_server(ns.server_args)


def cmd_router(ns: argparse.Namespace) -> int:
    from sgl.runtime.router.launch import launch_router

    launch_router(ns.router_args)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from sgl.runtime.protocol import RequestError, SamplingParams

    try:
        SamplingParams.from_dict(_sampling_params(ns))  # fail before the model loads
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from sgl.runtime.engine import Engine  # NOTE: lazy: `sgl` imports no torch at import time

    engine = Engine(**dataclasses.asdict(ns.server_args))
    try:
        prompt = ns.prompt
        if ns.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True)
        try:
            if ns.stream:
                printed = ""
                out: dict[str, Any] = {}
                for out in engine.generate(prompt, _sampling_params(ns), stream=True):
                    text = out["text"]
                    sys.stdout.write(text[len(printed):] if text.startswith(printed) else "\n" + text)
                    sys.stdout.flush()
                    printed = text
                sys.stdout.write("\n")
            else:
                out = engine.generate(prompt, _sampling_params(ns))
                print(json.dumps(out, ensure_ascii=False, indent=2) if ns.json else out["text"])
        except RequestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    finally:
        engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sgl.runtime.config import ServerArgs

    parser = argparse.ArgumentParser(prog="sgl", description="Structured generation: server and offline engine.")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,router}")
    serve = sub.add_parser("serve", help="run the HTTP server (SGLang native API + OpenAI API)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ServerArgs.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="generate text for one prompt with the offline engine and print it",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("prompt")
    _add_sampling_flags(gen)
    ServerArgs.add_cli_args(gen)
    gen.set_defaults(func=cmd_generate)
    from sgl.runtime.router.config import RouterArgs

    rtr = sub.add_parser("router", help="a cache-aware router in front of running servers (ours or SGLang's)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    RouterArgs.add_cli_args(rtr)
    rtr.set_defaults(func=cmd_router)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "func", None) is None:
        parser.print_help()
        return 1
    try:
        if ns.func is cmd_router:
            from sgl.runtime.router.config import RouterArgs

            ns.router_args = RouterArgs.from_cli_args(ns)
        else:
            ns.server_args = _server_args(ns)
    except ValueError as exc:  # ServerArgs validation names the bad flag value
        parser.error(str(exc))
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
