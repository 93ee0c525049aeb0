"""JSON out: strict JSON even when a logprob is -inf (a token the grammar or a filter ruled out).

Python's json writes `-Infinity`/`NaN`, which strict parsers reject, and Starlette's JSONResponse
raises on them. We follow OpenAI's convention: -inf becomes -9999.0; NaN and +inf become null.

    >>> dumps({"lp": float("-inf")})
    b'{"lp":-9999.0}'
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse

NEG_INF_LOGPROB = -9999.0


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return NEG_INF_LOGPROB if obj == -math.inf else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    try:  # fast path: almost every response is finite
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)
