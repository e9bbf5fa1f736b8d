"""Run a flow from the command line: a failed run prints its cause in one line and exits 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from modelrepo import RepositoryError
from tasks.errors import PipelineError


def run(label: str, flow: Callable[..., Any], args: argparse.Namespace) -> int:
    """Call `flow` with the parsed arguments, whose names are the flow's parameters."""
    try:
        result = flow(**vars(args))
    except (PipelineError, RepositoryError, ValueError) as e:
        print(f"{label} failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else is a bug or an environment problem: still one line, with its type
        print(f"{label} failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(result)
    return 0
