"""How `select` turns per-token logprobs of each choice into a decision (SGLang's three methods).

Each method is called with keyword arguments and returns a `ChoicesDecision`; a user may pass any
object with the same call signature as `choices_method`. The token logprob lists hold
`[logprob, token_id, text]` triples of the CHOICE's tokens only (the prompt's tokens are cut off
after token healing, see `sgl.backends.native`), so no prompt token dilutes a short choice's mean.

    >>> d = token_length_normalized(choices=["a", "b"], normalized_prompt_logprobs=[-2.0, -0.5],
    ...                             input_token_logprobs=[[[-2.0, 1, "a"]], [[-0.5, 2, "b"]]],
    ...                             output_token_logprobs=[[], []])
    >>> d.decision
    'b'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

Triple = list[Any]  # [logprob | None, token_id, text | None]


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


def mean_logprob(tokens: list[Triple]) -> float:
    """Mean of the known logprobs (a None, e.g. a sequence's first token, is skipped)."""
    values = [t[0] for t in tokens if t[0] is not None]
    return sum(values) / len(values) if values else float("-inf")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first index wins ties


class ChoicesSamplingMethod:
    name = "base"
    requires_unconditional_logprobs = False

    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[Triple]], output_token_logprobs: list[list[Triple]],
                 unconditional_token_logprobs: Optional[list[list[Triple]]] = None) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean logprob per token (the default)."""

    name = "token_length_normalized"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = _argmax(normalized_prompt_logprobs)
        return ChoicesDecision(choices[best], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
        })


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Walk the choices token by token, keeping those with the best logprob at each position.

    A choice shorter than the longest one is padded with its own mean logprob, so a choice that is a
    prefix of another competes fairly with it.
    """

    name = "greedy_token_selection"

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        width = max(len(t) for t in input_token_logprobs)
        matrix: list[list[float]] = []  # [num_choices, width]
        for toks in input_token_logprobs:
            row = [t[0] if t[0] is not None else 0.0 for t in toks]
            pad = sum(row) / len(row) if row else float("-inf")
            matrix.append(row + [pad] * (width - len(row)))
        remaining = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        return ChoicesDecision(choices[remaining[0]], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "greedy_logprob_matrix": matrix,
        })


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Mean over the choice's tokens of logprob(token | prompt) - logprob(token | no prompt).

    Favours choices the prompt makes more likely than they are a priori (a calibration against
    choices that are simply common strings).
    """

    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            diffs = [(c[0] or 0.0) - (u[0] or 0.0) for c, u in zip(cond, uncond)]
            scores.append(sum(diffs) / len(diffs) if diffs else float("-inf"))
        best = _argmax(scores)
        return ChoicesDecision(choices[best], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "unconditional_token_logprobs": unconditional_token_logprobs,
            "normalized_unconditional_prompt_logprobs": scores,
        })


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

_BY_NAME = {m.name: m for m in (token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized)}


def resolve_choices_method(method: Any) -> ChoicesSamplingMethod:
    """A method object, or one of the three names as a string."""
    if method is None:
        return token_length_normalized
    if isinstance(method, str):
        if method not in _BY_NAME:
            raise ValueError(f"select: choices_method must be one of {', '.join(_BY_NAME)} (got {method!r})")
        return _BY_NAME[method]
    if not callable(method):
        raise ValueError(f"select: choices_method must be callable (got {method!r})")
    return method
