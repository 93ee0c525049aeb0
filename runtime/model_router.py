"""`model: "auto"`: pick the cheapest served model whose rules admit the request.

A request is described by `RouteFeatures` (its prompt text or token ids, requested max new tokens, the kind
of constraint); each model has a `ModelRule`: a cost per 1K tokens and optional limits. The router keeps the
models whose limits admit the request and picks the one with the lowest expected cost
`cost_per_1k * (prompt_tokens + max_new_tokens) / 1000` (ties: the order models are served in).

`--router-config FILE` (JSON):

    {"models": {"small": {"cost_per_1k": 0.1, "max_prompt_tokens": 1024, "max_new_tokens": 256,
                          "constraints": ["none", "regex", "json_schema"], "max_score": 0.5},
                "big":   {"cost_per_1k": 1.0}},
     "classifier": {"keywords": {"prove": 0.6, "step by step": 0.5, "analyze": 0.4}}}

Rule fields (all optional but cost_per_1k): `max_prompt_tokens`, `max_new_tokens`, `constraints` (a list of
"none" | "regex" | "json_schema" | "ebnf"), `min_score` / `max_score` (bounds on the classifier's score).
The classifier scores a prompt in [0, 1]: the sum of the weights of the keywords it contains
(case-insensitive), capped at 1. Models the file does not name are not candidates for "auto".

Default rule set (no --router-config): costs are the models' sizes in GB (file size before a first load,
measured weights + KV after). The most expensive model admits everything (the fallback); every other model
admits prompts up to 1024 tokens, up to 256 new tokens, and no ebnf grammar. So short, plain or
regex/JSON-constrained requests go to the smallest model, long or grammar-heavy ones to the largest.

No torch here (the HTTP layer routes).

    >>> r = ModelRouter({"small": ModelRule(0.1, max_prompt_tokens=8), "big": ModelRule(1.0)})
    >>> r.choose(RouteFeatures(prompt_tokens={"small": 3, "big": 3}, max_new_tokens=16)).model
    'small'
    >>> r.choose(RouteFeatures(prompt_tokens={"small": 30, "big": 30}, max_new_tokens=16)).model
    'big'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from sgl.runtime.protocol import RequestError

CONSTRAINT_KINDS = ("none", "regex", "json_schema", "ebnf")
DEFAULT_SMALL_MAX_PROMPT = 1024
DEFAULT_SMALL_MAX_NEW = 256


@dataclass(frozen=True)
class ModelRule:
    cost_per_1k: float
    max_prompt_tokens: Optional[int] = None
    max_new_tokens: Optional[int] = None
    constraints: Optional[frozenset[str]] = None  # None = every kind
    min_score: Optional[float] = None
    max_score: Optional[float] = None

    def rejects(self, prompt_tokens: int, f: "RouteFeatures", score: Optional[float]) -> Optional[str]:
        """Why this rule does not admit the request, or None when it does."""
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return f"prompt {prompt_tokens} > {self.max_prompt_tokens} tokens"
        if self.max_new_tokens is not None and f.max_new_tokens > self.max_new_tokens:
            return f"max_new_tokens {f.max_new_tokens} > {self.max_new_tokens}"
        if self.constraints is not None and f.constraint not in self.constraints:
            return f"constraint {f.constraint} not in {sorted(self.constraints)}"
        if score is not None and self.min_score is not None and score < self.min_score:
            return f"score {score:.2f} < {self.min_score}"
        if score is not None and self.max_score is not None and score > self.max_score:
            return f"score {score:.2f} > {self.max_score}"
        return None


@dataclass(frozen=True)
class RouteFeatures:
    prompt_tokens: Mapping[str, int]  # per candidate model (tokenizers differ)
    max_new_tokens: int
    constraint: str = "none"  # one of CONSTRAINT_KINDS
    text: str = ""  # for the classifier


@dataclass(frozen=True)
class KeywordClassifier:
    keywords: Mapping[str, float] = field(default_factory=dict)

    def score(self, text: str) -> float:
        low = text.lower()
        return min(1.0, sum(w for k, w in self.keywords.items() if k.lower() in low))


@dataclass(frozen=True)
class RouteDecision:
    model: str
    cost: float
    score: Optional[float]
    rejected: dict[str, str]  # model -> why it was not admitted

    def as_meta(self) -> dict[str, Any]:
        return {"model": self.model, "estimated_cost": round(self.cost, 6), "score": self.score,
                "rejected": self.rejected}


class ModelRouter:
    def __init__(self, rules: Mapping[str, ModelRule], classifier: Optional[KeywordClassifier] = None) -> None:
        if not rules:
            raise ValueError("router: no model rules")
        self.rules = dict(rules)  # insertion order = tie-break order
        self.classifier = classifier

    @classmethod
    def default(cls, served: Sequence[str], sizes_gb: Mapping[str, float]) -> "ModelRouter":
        """The default rule set (module docstring): costs = sizes; the largest takes everything."""
        largest = max(served, key=lambda n: (sizes_gb[n], -served.index(n)))
        rules = {}
        for name in served:
            if name == largest:
                rules[name] = ModelRule(cost_per_1k=sizes_gb[name])
            else:
                rules[name] = ModelRule(cost_per_1k=sizes_gb[name], max_prompt_tokens=DEFAULT_SMALL_MAX_PROMPT,
                                        max_new_tokens=DEFAULT_SMALL_MAX_NEW,
                                        constraints=frozenset({"none", "regex", "json_schema"}))
        return cls(rules)

    @classmethod
    def from_dict(cls, data: Any, served: Sequence[str]) -> "ModelRouter":
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
            raise ValueError('router_config: a JSON object {"models": {"<name>": {"cost_per_1k": ...}, ...}} is needed')
        rules: dict[str, ModelRule] = {}
        for name, raw in data["models"].items():
            where = f"router_config.models.{name}"
            if name not in served:
                raise ValueError(f"{where}: not a served model (served: {', '.join(served)})")
            if not isinstance(raw, dict) or not isinstance(raw.get("cost_per_1k"), (int, float)):
                raise ValueError(f"{where}: an object with a numeric cost_per_1k is needed")
            unknown = set(raw) - {"cost_per_1k", "max_prompt_tokens", "max_new_tokens", "constraints",
                                  "min_score", "max_score"}
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            kinds = raw.get("constraints")
            if kinds is not None and (not isinstance(kinds, list) or not set(kinds) <= set(CONSTRAINT_KINDS)):
                raise ValueError(f"{where}.constraints: a list of {CONSTRAINT_KINDS}")
            rules[name] = ModelRule(float(raw["cost_per_1k"]), raw.get("max_prompt_tokens"), raw.get("max_new_tokens"),
                                    frozenset(kinds) if kinds is not None else None, raw.get("min_score"),
                                    raw.get("max_score"))
        keywords = (data.get("classifier") or {}).get("keywords")
        if keywords is not None and not (isinstance(keywords, dict)
                                         and all(isinstance(w, (int, float)) for w in keywords.values())):
            raise ValueError("router_config.classifier.keywords: an object of keyword -> weight")
        return cls(rules, KeywordClassifier(keywords) if keywords else None)

    @classmethod
    def from_file(cls, path: str, served: Sequence[str]) -> "ModelRouter":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"router_config: cannot read {path!r}: {exc}") from None
        return cls.from_dict(data, served)

    def choose(self, f: RouteFeatures) -> RouteDecision:
        """The cheapest admitting model; RequestError (a 400 on field `model`) when none admits the request."""
        score = self.classifier.score(f.text) if self.classifier is not None else None
        best: Optional[tuple[float, str]] = None
        rejected: dict[str, str] = {}
        for name, rule in self.rules.items():
            prompt = f.prompt_tokens[name]
            why = rule.rejects(prompt, f, score)
            if why is not None:
                rejected[name] = why
                continue
            cost = rule.cost_per_1k * (prompt + f.max_new_tokens) / 1000
            if best is None or cost < best[0]:
                best = (cost, name)
        if best is None:
            reasons = "; ".join(f"{n}: {w}" for n, w in rejected.items())
            raise RequestError(f"model: 'auto' found no served model that admits this request ({reasons})")
        return RouteDecision(best[1], best[0], score, rejected)
