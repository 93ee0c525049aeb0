"""What the malloc tests share: run a probe script in a fresh interpreter and read the MB it retained."""

from __future__ import annotations

import subprocess
import sys


def retained_mb(script: str, mode: str) -> float:
    """`python -c script mode` in a fresh process (its own heap); the script prints the MB it kept resident."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())
