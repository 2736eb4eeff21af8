"""The check's bookkeeping: a time budget, guarded steps, commands with deadlines, the JSON and the log.

Every step runs through ``Report.run_step``: its figures, its status (ok, failed, timeout, skipped) with a one-line
error, and its duration go into OUTDIR/gpu_check.json, which is rewritten (atomically) after each step, so a
run killed from outside still leaves what it measured. A step starts only when the budget holds its
estimated duration; a command gets at most what is left of the budget (minus a reserve for writing up), and
a command that runs out of time is killed with its whole process group (torchrun, data-loading workers).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

REPOSITORY = Path(__file__).resolve().parents[2]
# Seconds kept back from every command's deadline, to record the step and write the JSON.
RESERVE_S = 5.0


class StepTimeout(Exception):
    """A command ran out of the budget; the step is recorded as ``timeout``."""


class StepSkipped(Exception):
    """A step that cannot run (a step it needs failed, or the budget is spent); recorded as ``skipped``."""


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:400]


class Report:
    """OUTDIR/gpu_check.json and OUTDIR/gpu_check.log."""

    def __init__(self, out: Path, budget: Budget, header: dict, summarise=lambda steps: {}):
        """``summarise(steps)`` gives the ``goals`` entry, recomputed at every write."""
        self.out, self.budget, self.summarise = out, budget, summarise
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out / "gpu_check.json", out / "gpu_check.log"
        self.log_path.write_text("")
        self.data = {**header, "budget_s": budget.seconds, "elapsed_s": 0.0, "finished": False, "goals": {},
                     "steps": {}}
        self.write()

    def log(self, text: str) -> None:
        line = f"[{self.budget.elapsed:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed, 1)
        self.data["goals"] = self.summarise(self.data["steps"])
        temporary = self.json_path.with_name(self.json_path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(temporary, self.json_path)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def status(self, name: str) -> str | None:
        return self.data["steps"].get(name, {}).get("status")

    def run_step(self, name: str, estimate_s: float, body: Callable[[dict], None], exercised: str = "") -> bool:
        """Run ``body(record)``, which fills ``record["figures"]``, as step ``name`` unless the budget no longer
        holds ``estimate_s``; any exception stops this step only. True when it ended ok."""
        record = {"status": "running", "estimated_s": estimate_s, "started_s": round(self.budget.elapsed, 1),
                  "seconds": None, "error": None, "exercised": exercised, "figures": {}}
        self.data["steps"][name] = record
        started = time.monotonic()
        try:
            if self.budget.left - RESERVE_S < estimate_s:
                raise StepSkipped(f"budget: {self.budget.left:.0f} s left, the step needs about {estimate_s:.0f} s")
            self.log(f"== {name} (about {estimate_s:.0f} s; {self.budget.left:.0f} s left)")
            self.write()
            body(record)
            record["status"] = "ok"
        except StepSkipped as skipped:
            record["status"], record["error"] = "skipped", str(skipped)
        except StepTimeout as timeout:
            record["status"], record["error"] = "timeout", str(timeout)
        except Exception as error:  # noqa: BLE001 - a failing step is recorded and the next one runs
            record["status"], record["error"] = "failed", one_line(error)
            with open(self.log_path, "a") as log:
                log.write(traceback.format_exc())
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self.log(f"== {name}: {record['status']} in {record['seconds']} s"
                     + (f" ({record['error']})" if record["error"] else ""))
            self.write()
        return record["status"] == "ok"

    # ------------------------------------------------------------------------------------------ commands
    def command(self, argv: Sequence[str], *, env: dict, timeout_s: float | None = None, cwd: Path = REPOSITORY,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` with its output appended to the log; killed (whole process group) at the budget's end.
        ``check``: a non-zero exit is an error carrying the output's last line."""
        deadline = self.budget.left - RESERVE_S
        limit = deadline if timeout_s is None else min(timeout_s, deadline)
        if limit <= 0:
            raise StepTimeout(f"no budget left for {Path(argv[0]).name} {' '.join(map(str, argv[1:3]))}")
        self.log("$ " + " ".join(str(arg) for arg in argv))
        with open(self.log_path, "a") as log:
            process = subprocess.Popen([str(arg) for arg in argv], cwd=cwd, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, process_group=0)
            try:
                process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise StepTimeout(f"{' '.join(map(str, argv[:4]))} ... killed after {limit:.0f} s") from None
        completed = subprocess.CompletedProcess(argv, process.returncode)
        if check and process.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv[:4]))} ... exited {process.returncode}: "
                               f"{self.last_output_line()}")
        return completed

    def last_output_line(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip()[:300] if lines else ""


def python_command(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
