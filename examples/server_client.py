"""The same DSL programs against a running server: `sgl serve --model-path default` first.

    sgl serve --model-path default --port 30000 &
    python examples/server_client.py --url http://127.0.0.1:30000

Shows the native-API backend (`sgl.RuntimeEndpoint`: gen, select, regex, JSON schema, fork/join,
streaming) and the OpenAI-compatible backend (`sgl.OpenAI` on the server's /v1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import sgl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quickstart import chat_turn, classify, extract_person, phone_number, two_tips  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)

    ep = sgl.RuntimeEndpoint(args.url, api_key=args.api_key)
    print(f"server: {ep.model_info.get('model_path')} (chat template: {ep.get_chat_template().name})")
    sgl.set_default_backend(ep)
    greedy = {"temperature": 0}
    t0 = time.monotonic()

    st = chat_turn.run(question="What is the capital of France?", **greedy)
    print("chat:", st["answer"].strip())
    print("select:", classify.run(review="Great service and tasty food!", **greedy)["label"])
    print("regex:", phone_number.run(text="Reach me at 212-555-0187.", **greedy)["phone"])
    print("json:", extract_person.run(text="Alan Turing was born in London in 1912.", **greedy).parsed("person"))
    print("fork/join:", two_tips.run(topic="focus", **greedy)["tip"])

    print("stream: ", end="", flush=True)
    st = chat_turn.run(question="Name three colors.", stream=True, **greedy)
    for piece in st.text_iter("answer"):
        print(piece, end="", flush=True)
    print()

    oa = sgl.OpenAI("default", base_url=args.url + "/v1", api_key=args.api_key)
    st = chat_turn.run(question="What is 2 + 2?", backend=oa, **greedy)
    print("openai backend:", st["answer"].strip())

    print(f"[{time.monotonic() - t0:.1f}s, {ep.stats.completion_tokens} tokens generated over the native API, "
          f"{ep.stats.cache_hit_rate:.0%} of prompt tokens from the prefix cache]")
    ep.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
