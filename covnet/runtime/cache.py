"""Where covnet keeps what it can make again: ``$XDG_CACHE_HOME/covnet/`` (``~/.cache/covnet/`` without it).

* ``models/<model id>/``: model archives installed by covnet_install_model (or a ``.zip`` given to --model).
* ``openvino/<key>/``: a network converted for OpenVINO, so that later runs read it instead of converting again.

Everything here can be deleted at any time; the next run makes it again.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/covnet``, or ``~/.cache/covnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "covnet"


def model_cache_dir() -> Path:
    """The installed model archives: ``<cache>/models``."""
    return cache_root() / "models"


def openvino_cache_dir() -> Path:
    """The networks converted for OpenVINO: ``<cache>/openvino``."""
    return cache_root() / "openvino"
