"""A follower rank: `python -m sgl.runtime.distributed.worker SPEC.json` (ServerArgs as JSON; RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment). Also `sgl serve --tp-size N` under torchrun
on ranks other than 0 (run_worker). Exit code 0 after rank 0's stop, 1 when the group failed."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

logger = logging.getLogger("sgl.distributed")


def _exit_with_parent(parent: int) -> None:
    """A spawned follower must not outlive rank 0 (e.g. SIGKILLed, so it never sent stop)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            logger.error("tensor-parallel rank %s: rank 0 (pid %d) is gone; exiting", os.environ.get("RANK"), parent)
            os._exit(1)


def run_worker(args: Any) -> int:
    import torch

    from sgl.runtime.distributed.driver import run_follower
    from sgl.runtime.distributed.errors import TensorParallelError
    from sgl.runtime.distributed.group import TPGroup
    from sgl.runtime.distributed.launch import threads_per_rank
    from sgl.runtime.distributed.sharding import ShardPlan, shard_model
    from sgl.runtime.models.loader import load_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != args.tp_size:
        logger.error("WORLD_SIZE=%d but --tp-size %d", world, args.tp_size)
        return 1
    if "SGL_TP_PARENT_PID" in os.environ:
        threading.Thread(target=_exit_with_parent, args=(int(os.environ["SGL_TP_PARENT_PID"]),), daemon=True).start()
    torch.set_num_threads(threads_per_rank(args))  # the same share as rank 0 (launch.py)
    torch.manual_seed(args.random_seed)
    loaded = load_model(args.model_path, dtype=args.dtype, device="cpu", show_progress=False,
                        weight_format=args.weight_format, quantize=args.quantize)
    group = None
    try:
        group = TPGroup.init(rank, world, args.dist_timeout)
        local = shard_model(loaded.model, ShardPlan.for_model(loaded.config, rank, world), group)
        run_follower(loaded.model, local, group)
    except TensorParallelError as e:
        logger.error("%s; rank %d exits", e, rank)
        return 1
    finally:
        if group is not None:
            group.destroy()
    return 0


def main(argv: list[str]) -> int:
    from sgl.runtime.config import ServerArgs
    from sgl.runtime.server.launch import configure_logging

    with open(argv[0]) as f:
        args = ServerArgs(**json.load(f))
    configure_logging(args.log_level)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
