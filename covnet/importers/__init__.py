"""Converters from public datasets and plain CT folders into covnet's raw format."""
from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One ``warning: …`` line on stderr: importers go on after a doubtful input, but say so."""
    print(f"warning: {message}", file=sys.stderr)
