"""The last line of a tool's output: its result as one JSON object, also written to --json."""
from __future__ import annotations

import json
import os


def emit(result: dict, path: str | None, **dumps_kwargs) -> None:
    """Prints `result` as one JSON line and, with a `path`, writes the same line there (its
    directory created)."""
    line = json.dumps(result, **dumps_kwargs)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(line + "\n")
    print(line)
