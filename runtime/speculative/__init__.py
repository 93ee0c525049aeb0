"""Speculative decoding: drafters propose tokens, the target verifies them all in one forward pass.

    drafter.propose(reqs, k) -> one draft per request (runtime/speculative/drafter.py)
    scheduler: a verify row [pending token] + draft, one KV slot each (runtime/scheduler/speculative_rows.py)
    runner: logits at every position; the sampler walks them in order (runtime/executor/verify.py)
    scheduler: appends the produced tokens, frees the rejected drafts' slots at once

One module per algorithm; `make_drafter` picks it from `--speculative-algorithm`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from sgl.runtime.config import ServerArgs
from sgl.runtime.speculative.drafter import Drafter


def make_drafter(args: ServerArgs, num_slots: Optional[int] = None,
                 target_vocab_size: Optional[int] = None, runner: Any = None) -> Optional[Drafter]:
    """The drafter `args.speculative_algorithm` names, or None when speculation is off.

    DRAFT loads its model here and gets a KV pool of `num_slots` (the target's pool size: every
    running request may need its whole sequence there); its vocabulary must be the target's.
    MEDUSA and EAGLE read the target's hidden states: they need the engine's ModelRunner (`runner`);
    MEDUSA loads its heads (the shipped ones for the default model when no path is given) and shares
    the runner's model's lm_head."""
    if args.speculative_algorithm is None:
        return None
    if args.speculative_algorithm == "NGRAM":
        return make_ngram_drafter(args)
    if args.speculative_algorithm == "DRAFT":
        if num_slots is None or target_vocab_size is None:
            raise ValueError("DRAFT needs the engine's pool size and vocabulary (Engine builds it)")
        from sgl.runtime.models.loader import load_model
        from sgl.runtime.speculative.draft_model import DraftModelDrafter

        assert args.speculative_draft_model_path is not None
        loaded = load_model(args.speculative_draft_model_path, dtype=args.dtype, device="cpu",
                            show_progress=False, weight_format=args.weight_format)
        if loaded.config.vocab_size != target_vocab_size:
            raise ValueError(f"the draft model's vocabulary has {loaded.config.vocab_size} tokens, the target's "
                             f"{target_vocab_size}: DRAFT needs a model with the same tokenizer")
        dtype = next(loaded.model.parameters()).dtype
        return DraftModelDrafter(loaded.model, loaded.config, num_slots, dtype)
    if args.speculative_algorithm == "MEDUSA":
        if runner is None:
            raise ValueError("MEDUSA needs the engine's model runner (Engine builds it)")
        from sgl.runtime.speculative.medusa import (DEFAULT_CHOICES, MedusaDrafter, draft_lm_head, load_medusa_heads,
                                                    shipped_heads_path)

        cfg = runner.config
        path = args.speculative_draft_model_path or shipped_heads_path(args.model_path)
        heads = load_medusa_heads(path, cfg.hidden_size, cfg.vocab_size)
        choices = json.loads(args.speculative_medusa_choices) if args.speculative_medusa_choices else DEFAULT_CHOICES
        drafter = MedusaDrafter(heads, draft_lm_head(heads, runner.model), choices)
        runner.capture_hidden = True
        runner.hidden_observer = drafter.observe
        return drafter
    if args.speculative_algorithm in ("EAGLE", "EAGLE3"):
        if runner is None:
            raise ValueError("EAGLE needs the engine's model runner (Engine builds it)")
        from sgl.runtime.speculative.eagle import make_eagle_drafter

        return make_eagle_drafter(args.speculative_draft_model_path, runner, args.speculative_num_steps,
                                  args.model_path, args.speculative_eagle_topk,
                                  eagle3=args.speculative_algorithm == "EAGLE3")
    raise ValueError(f"unknown speculative algorithm {args.speculative_algorithm!r}")


def make_ngram_drafter(args: ServerArgs) -> Drafter:
    """NGRAM with the `--speculative-ngram-*` settings (the algorithm, or the lane `--speculative-ngram-first` adds)."""
    from sgl.runtime.speculative.ngram import NgramDrafter

    return NgramDrafter(args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size,
                        args.speculative_ngram_max_bfs_breadth, args.speculative_ngram_capacity)


def make_corpus_drafter(args: ServerArgs, tokenizer: Any) -> Drafter:
    """The CORPUS lane of `--speculative-ngram-corpus` (NGRAM's match windows and breadth); `tokenizer` reads
    the file."""
    from sgl.runtime.speculative.ngram_corpus import CorpusDrafter, corpus_path, load_corpus

    if tokenizer is None:
        raise ValueError("speculative_ngram_corpus needs the engine's tokenizer (Engine builds the drafters)")
    seqs = load_corpus(corpus_path(args.speculative_ngram_corpus, args.model_path), tokenizer.encode_batch)
    return CorpusDrafter(seqs, args.speculative_ngram_min_match_window_size,
                         args.speculative_ngram_max_match_window_size, args.speculative_ngram_max_bfs_breadth)
