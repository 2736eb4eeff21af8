"""The check's steps on the speed of covnet's training step (issue 31), run after ``training_speed_compile``:

``step_profile``: covnet's ``train_epoch`` on the 8 GB plan under torch.profiler (worker: ``stepprofile``).
``step_variants``: the step's variants (worker: ``variants``) in ``variants.VARIANTS``' order, on a GPU the eager
ones in one process and each compiled one in a process of its own (a compilation that crashes or hangs then costs
only itself); a variant the budget cannot hold any more is recorded as not run, with why.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check.runner import RESERVE_S, StepTimeout, python_command
from benchmarks.gpu_check.variants import COMPILED, EAGER

PROFILE_WORKER = "benchmarks.gpu_check.stepprofile"
VARIANTS_WORKER = "benchmarks.gpu_check.variants"


def _plan(check) -> Path:
    check.needs("clinical_data")
    return check.clinical / "preprocessed" / "plans.json"


def _patch_arguments(scale) -> list:
    return ["--patch-size", *scale.step_patch_size] if scale.step_patch_size else []


def step_profile(check, record: dict) -> None:
    plan, scale, out = _plan(check), check.scale, check.work / "step_profile.json"
    check.command(python_command("-m", PROFILE_WORKER, out, "--device", check.device, "--plan", plan, "--warm-up",
                                 scale.profile_warm_up, "--steps", scale.profile_steps, *_patch_arguments(scale)))
    record["figures"].update(json.loads(out.read_text()))


def variant_groups(scale) -> list[tuple[str, ...]]:
    """The worker processes' variants: on a GPU the eager ones, then each compiled one alone; else all in one."""
    return [EAGER, *((name,) for name in COMPILED)] if scale.compile_variants_apart else [EAGER + COMPILED]


def step_variants(check, record: dict) -> None:
    plan, scale, budget = _plan(check), check.scale, check.report.budget
    figures = record["figures"]
    figures.update(plan=str(plan), warm_up=scale.variant_warm_up, iterations=scale.variant_iterations,
                   patch_size=scale.step_patch_size, variants={})
    for index, group in enumerate(variant_groups(scale)):
        estimate = scale.estimates_s["step_variants" if index == 0 else "compile_variant"]
        if budget.left - RESERVE_S < estimate:
            not_run = f"budget: {budget.left:.0f} s left, about {estimate:.0f} s needed"
            figures["variants"].update({name: {"status": "not run", "reason": not_run} for name in group})
            continue
        out = check.work / f"variants_{index}.json"
        out.unlink(missing_ok=True)
        ended = None
        try:
            completed = check.command(python_command(
                "-m", VARIANTS_WORKER, out, "--device", check.device, "--plan", plan, "--warm-up",
                scale.variant_warm_up, "--iterations", scale.variant_iterations, "--max-seconds",
                scale.variant_max_seconds, *_patch_arguments(scale), *group), check=False)
            if completed.returncode != 0:
                ended = f"the worker exited {completed.returncode}: {check.report.last_output_line()}"
        except StepTimeout as timeout:
            ended = f"cut short by the budget ({timeout})"
        finished = json.loads(out.read_text())["variants"] if out.is_file() else {}
        for name in group:
            figures["variants"][name] = finished.get(name) or {"status": "not run", "reason": ended or "no record"}
        check.report.write()
    figures.update(variant_summary(figures["variants"]))


def variant_summary(variants: dict) -> dict:
    """Baseline and the fastest variant that ran, per 250 iterations."""
    timed = {name: variant["seconds_per_250_iterations"] for name, variant in variants.items()
             if variant.get("status") == "ran" and "seconds_per_250_iterations" in variant}
    if not timed:
        return {}
    fastest = min(timed, key=timed.get)
    summary = {"fastest": fastest, "fastest_250_iterations_s": timed[fastest]}
    if "baseline" in timed:
        summary.update(baseline_250_iterations_s=timed["baseline"],
                       fastest_speed_up=round(timed["baseline"] / timed[fastest], 3))
    return summary
