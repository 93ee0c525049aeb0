"""One data-parallel replica: `python -m sgl.runtime.router.replica ARGS.json` (written by launch_dp)."""

from __future__ import annotations

import json
import os
import sys

from sgl.runtime.config import ServerArgs


def main(path: str) -> None:
    with open(path) as f:
        fields = json.load(f)
    os.unlink(path)
    from sgl.runtime.server.launch import launch_server

    launch_server(ServerArgs(**fields))


if __name__ == "__main__":
    main(sys.argv[1])
