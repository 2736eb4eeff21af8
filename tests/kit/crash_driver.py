"""Run a covnet command with a fault injected, as a test's stand-in for kill -9 at a chosen moment.

    python crash_driver.py RULE COMMAND [ARGS...]

RULE is ``WHO@SUBSTRING#N``: at the N-th atomic rename (``os.replace``) in one process whose destination
contains SUBSTRING, the temporary file is complete but not yet renamed, and
- ``self``: that process kills itself with SIGKILL (a kill during a write);
- ``parent``: it kills its parent with SIGKILL and keeps working slowly (a kill with workers running: only
  covnet's parent watchdog can end it before the sleep does).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time

MODULES = {"covnet_make_phantoms": "make_phantoms", "covnet_import_covid19ctseg": "import_covid19ctseg",
           "covnet_import_unlabelled": "import_unlabelled", "covnet_evaluate": "evaluate",
           "covnet_plan_and_preprocess": "plan_and_preprocess", "covnet_train": "train", "covnet_predict": "predict",
           "covnet_selftrain": "selftrain"}


def install(rule: str) -> None:
    who, _, rest = rule.partition("@")
    substring, _, nth = rest.rpartition("#")
    nth = int(nth)
    real_replace = os.replace
    seen = {"count": 0}

    def replace(source, destination, *args, **kwargs):
        if substring in os.fspath(destination):
            seen["count"] += 1
            if seen["count"] == nth:
                if who == "self":
                    os.kill(os.getpid(), signal.SIGKILL)
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(30)
        return real_replace(source, destination, *args, **kwargs)

    os.replace = replace


def main() -> None:
    rule, command, *arguments = sys.argv[1:]
    install(rule)
    module = importlib.import_module(f"covnet.cli.{MODULES[command]}")
    sys.argv = [command, *arguments]
    module.entry()


if __name__ == "__main__":
    main()
