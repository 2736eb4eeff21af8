"""Converters from public datasets and plain CT folders into covnet's raw format."""
from __future__ import annotations

from covnet.runtime.log import logger

log = logger("covnet.importers")


def warn(message: str) -> None:
    """One ``warning: …`` line on stderr: importers go on after a doubtful input, but say so."""
    log.warning(message)
