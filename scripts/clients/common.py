"""What the Python client runners share: reading the job, timing, and printing one JSON result.

Standard library only: the runners execute in the clients' own virtual environments (``.venv-optimum``,
``.venv-genai``), which do not have flexi-export installed. ``check_clients.py`` writes the job (prompts, the
PyTorch model's greedy tokens, tokenizer texts) and compares what the runner reports; a runner only drives its
client and reports what the client produced.

Job (JSON)::

    {"cases": [{"name": "single", "input_ids": [[...]], "attention_mask": [[...]], "greedy": [[...]]}, ...],
     "new_tokens": 16, "pad_token_id": 0, "eos_token_id": [2],
     "texts": ["...", ...],            # encoded by the client's tokenizer (where it exposes one)
     "threads": 2}

Result (the last line of stdout)::

    {"client": ..., "versions": {...}, "loads": bool, "load_seconds": float,
     "cases": [{"name": ..., "tokens": [[...]]}],             # new tokens only, at most new_tokens per row
     "tokenizer": {"encode": [[...] per text], "decode": [str per case row]} | null,
     "notes": [...], "error": str | null, "seconds": float}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_args(description: str) -> argparse.Namespace:
    """``BUNDLE JOB`` (the bundle folder, the job file written by ``check_clients.py --write-job``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle", type=Path, help="bundle folder written by `flexi-export export`")
    parser.add_argument("job", type=Path, help="job JSON (check_clients.py --write-job BUNDLE JOB)")
    parser.add_argument("--work", type=Path, default=None, help="folder for files the client writes (mobile)")
    return parser.parse_args()


def load_job(path: Path) -> dict[str, Any]:
    """The job dictionary."""
    return json.loads(path.read_text())


def new_result(client: str) -> dict[str, Any]:
    """An empty result: not loaded, no cases, no error yet."""
    return {
        "client": client,
        "versions": {},
        "loads": False,
        "load_seconds": None,
        "cases": [],
        "tokenizer": None,
        "notes": [],
        "error": None,
        "seconds": None,
    }


def run(client: str, body: Callable[[dict[str, Any]], None]) -> int:
    """Run ``body(result)`` (it fills ``result`` as it goes), catch any failure into ``result["error"]`` with
    the traceback on stderr, and print the result as one JSON line. Exit status 0 when there was no error."""
    result = new_result(client)
    start = time.perf_counter()
    try:
        body(result)
    except Exception as exc:  # the client's failure is the finding: report it, do not crash the table
        traceback.print_exc(file=sys.stderr)
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
    result["seconds"] = round(time.perf_counter() - start, 3)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0 if result["error"] is None else 1


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)
