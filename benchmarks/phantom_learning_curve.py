"""The supervised learning curve of a phantom profile: the calibration of the phantom world (issue 32).

    python benchmarks/phantom_learning_curve.py --root R --profiles cohort standard --sizes 4 8 16 64 \\
        --seeds 0 1 2 3 4 5 --held-out 24 --iterations 800 1600 3200 --workers 2

Per profile and seed: one dataset (``--sizes``' largest number of labelled phantoms, every one another patient,
and ``--held-out`` test phantoms of the same profile); the first n labelled cases train a model (true labels
only, fold ``all``, the continuation benchmark's cheap network and training settings: ``selftrain_experiment``'s
``Schedule``, ``--features``/``--patch``) for each n in ``--sizes`` and each budget in ``--iterations`` (to see
where the infection Dice stops rising), scored on the same held-out cases without mirroring. Reports infection
and lungs Dice (mean over (seed, case)), the per-case SD, the spread of the seed means ("folds"), and checks the
calibration targets from nnU-Net 3D on COVID-19-CT-Seg (Ma et al. 2021): 4 -> 16 labelled cases worth >= +0.08
infection Dice, per-case SD with 4 cases in 0.15-0.25, the 4-case infection Dice below 0.80.

``--real-ct DIR`` also scores every model's lungs on real scans (realism check): ``lung_crop_ct.nii.gz`` against
``lung_crop_mask.nii.gz``, and ``chest_ct_512x512x141.nii.gz`` against a threshold lung mask.

Resumable: a model with a held-out summary is skipped. One process per model, ``--workers`` at a time,
single-threaded. ``--smoke`` is a tiny run that proves the machinery (2 sizes, 1 seed, 30 iterations,
4 held-out cases); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_experiment import Schedule, score_on_held_out, training_settings, with_network  # noqa: E402
from selftrain_headroom import network_name, train_on  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "results" / "phantom_learning_curve"
REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"
TARGETS = "4 -> 16 cases >= +0.08 infection Dice; per-case SD at 4 in 0.15-0.25; 4-case infection Dice < 0.80"


def profile_root(root: Path, profile: str, strata: int | None) -> Path:
    return root / (profile if strata is None else f"{profile}_strata{strata}")


def data_workspace(root: Path, profile: str, strata: int | None, seed: int):
    from covnet.workspace import Workspace
    return Workspace(profile_root(root, profile, strata) / f"seed_{seed}" / "data")


def make_data(workspace, profile: str, strata: int | None, seed: int, labelled: int, held_out: int) -> None:
    from covnet.phantoms.acquisition import profile_named
    from covnet.phantoms.generate import make_phantom_dataset
    if workspace.dataset_json.is_file():
        have = (len(list(workspace.images_tr.glob("*.nii.gz"))), len(list(workspace.images_ts.glob("*.nii.gz"))))
        if have != (labelled, held_out):
            raise SystemExit(f"{workspace.root} holds {have[0]} labelled and {have[1]} held-out phantoms, not "
                             f"{labelled} and {held_out}: use another --root (or the same --sizes/--held-out)")
        return
    make_phantom_dataset(workspace, num_labelled=labelled, num_unlabelled=0, num_test=held_out, seed=3000 + seed,
                         spacing_mode="isotropic", overwrite=True, profile=profile_named(profile),
                         distinct_patients=True, labelled_strata=strata)


def curve_plan(root: Path, profile: str, strata: int | None, args):
    """The profile's plan, made once from seed 0's labelled cases, with the continuation benchmark's network."""
    from covnet.planning.planner import plan_dataset
    from covnet.planning.plans import Plan
    path = profile_root(root, profile, strata) / "plans.json"
    if not path.is_file():
        workspace = data_workspace(root, profile, strata, 0)
        make_data(workspace, profile, strata, 0, max(args.sizes), args.held_out)
        plan = plan_dataset(workspace, device="cpu", measure_cpu_time=False)
        with_network(plan, tuple(args.features), tuple(args.patch)).save(path)
    return Plan.load(path)


def prepare(root: Path, profile: str, strata: int | None, seed: int, args) -> None:
    from covnet.preprocessing.run import preprocess_dataset
    plan = curve_plan(root, profile, strata, args)
    workspace = data_workspace(root, profile, strata, seed)
    make_data(workspace, profile, strata, seed, max(args.sizes), args.held_out)
    plan.save(workspace.plans_json)
    preprocess_dataset(workspace, plan, num_processes=1)


def model_folder(root: Path, profile: str, strata: int | None, seed: int, size: int, iterations: int, args) -> Path:
    return (profile_root(root, profile, strata) / f"seed_{seed}" / network_name(tuple(args.features), tuple(args.patch))
            / f"labelled_{size}_it{iterations}")


def train_and_score(root: Path, profile: str, strata: int | None, seed: int, size: int, iterations: int,
                    args) -> tuple[str, float]:
    import torch

    from covnet.workspace import ModelFolder
    torch.set_num_threads(1)
    started = time.monotonic()
    folder = model_folder(root, profile, strata, seed, size, iterations, args)
    if not (folder / "test" / "summary.json").is_file():
        data = data_workspace(root, profile, strata, seed)
        plan = curve_plan(root, profile, strata, args)
        cases = sorted(path.stem for path in data.preprocessed_cases.glob("*.json"))[:size]
        per_epoch = min(Schedule().iterations_per_epoch, iterations)
        settings = dataclasses.replace(training_settings(Schedule(), seed, epochs=max(1, iterations // per_epoch)),
                                       iterations_per_epoch=per_epoch)
        train_on(plan, data, ModelFolder(folder), {case: data.preprocessed_cases for case in cases}, settings)
        score_on_held_out(data, [ModelFolder(folder).checkpoint("final")], folder / "test")
    if args.real_ct is not None and not (folder / "real_ct.json").is_file():
        (folder / "real_ct.json").write_text(json.dumps(real_ct_scores(folder, args.real_ct), indent=1) + "\n")
    return folder.name, time.monotonic() - started


# ------------------------------------------------------------------------------------------------ real scans
def threshold_lungs(image: np.ndarray) -> np.ndarray:
    """Air-density voxels (< -320 HU) inside the body: components not touching the image's in-plane border, the
    two largest kept, holes (vessels) filled slice by slice."""
    from scipy import ndimage
    components, count = ndimage.label(image < -320)
    border = np.unique(np.concatenate([components[:, 0].ravel(), components[:, -1].ravel(),
                                       components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
    sizes = ndimage.sum(np.ones_like(components), components, index=np.arange(1, count + 1))
    sizes[border[border > 0] - 1] = 0
    keep = np.argsort(sizes)[::-1][:2] + 1
    mask = np.isin(components, keep[sizes[keep - 1] > 0])
    return np.stack([ndimage.binary_fill_holes(slice_) for slice_ in mask])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def real_ct_scores(folder: Path, real_ct: Path) -> dict:
    """Lungs Dice of the model in ``folder`` on the real lung crop (expert mask) and chest CT (threshold mask)."""
    import torch

    from covnet.image.io import read_image
    from covnet.inference.predictor import InferenceSettings, Predictor
    from covnet.workspace import ModelFolder
    predictor = Predictor.from_files([ModelFolder(folder).checkpoint("final")], torch.device("cpu"),
                                     InferenceSettings(use_mirroring=False))
    scores = {}
    for name, image_file, reference in (("lung_crop", "lung_crop_ct.nii.gz", "lung_crop_mask.nii.gz"),
                                        ("chest_ct", "chest_ct_512x512x141.nii.gz", None)):
        image, geometry = read_image(real_ct / image_file)
        labels, _ = predictor.predict_image(image, geometry)
        truth = read_image(real_ct / reference)[0] > 0 if reference else threshold_lungs(image)
        scores[name] = {"lungs_dice": _dice(labels > 0, truth), "reference": reference or "threshold < -320 HU"}
    return scores


# ------------------------------------------------------------------------------------------------ report
def collect(root: Path, args) -> list[dict]:
    rows = []
    for profile in args.profiles:
        for seed in args.seeds:
            for size in args.sizes:
                for iterations in args.iterations:
                    folder = model_folder(root, profile, args.labelled_strata, seed, size, iterations, args)
                    summary = folder / "test" / "summary.json"
                    if not summary.is_file():
                        continue
                    real = folder / "real_ct.json"
                    rows.append({"profile": profile, "seed": seed, "labelled": size, "iterations": iterations,
                                 "per_case": json.loads(summary.read_text())["per_case"],
                                 "real_ct": json.loads(real.read_text()) if real.is_file() else None})
    return rows


def _values(rows: list[dict], structure: str) -> list[float]:
    values = [case[structure]["dice"] for row in rows for case in row["per_case"]]
    return [v for v in values if v is not None and not np.isnan(v)]


def curve(rows: list[dict]) -> list[dict]:
    """One line per (profile, iterations, labelled): means, per-case SD, seed-mean spread, real-scan Dice."""
    lines = []
    for key in sorted({(r["profile"], r["iterations"], r["labelled"]) for r in rows}):
        group = [r for r in rows if (r["profile"], r["iterations"], r["labelled"]) == key]
        infection = _values(group, "infection")
        seed_means = [float(np.mean(_values([r], "infection"))) for r in group if _values([r], "infection")]
        real = [r["real_ct"] for r in group if r["real_ct"]]
        lines.append({"profile": key[0], "iterations": key[1], "labelled": key[2], "seeds": len(group),
                      "cases": len(infection), "infection_dice": float(np.mean(infection)) if infection else None,
                      "infection_case_sd": float(np.std(infection, ddof=1)) if len(infection) > 1 else None,
                      "seed_mean_min": min(seed_means, default=None), "seed_mean_max": max(seed_means, default=None),
                      "lungs_dice": float(np.mean(_values(group, "lungs"))) if _values(group, "lungs") else None,
                      "real_lung_crop": float(np.mean([x["lung_crop"]["lungs_dice"] for x in real])) if real else None,
                      "real_chest_ct": float(np.mean([x["chest_ct"]["lungs_dice"] for x in real])) if real else None})
    return lines


def targets(lines: list[dict]) -> list[str]:
    """The three calibration checks per profile, at its largest iteration budget."""
    out = []
    for profile in sorted({line["profile"] for line in lines}):
        top = max(line["iterations"] for line in lines if line["profile"] == profile)
        at = {line["labelled"]: line for line in lines if line["profile"] == profile and line["iterations"] == top}
        if 4 not in at or at[4]["infection_dice"] is None:
            out.append(f"{profile}: no 4-case models yet")
            continue
        four = at[4]
        gain = None if 16 not in at else at[16]["infection_dice"] - four["infection_dice"]
        sd = four["infection_case_sd"]
        out.append(f"{profile} ({top} it): 4 -> 16 gain "
                   + ("n/a (no 16-case models)" if gain is None else f"{gain:+.3f} [{'met' if gain >= 0.08 else 'NOT met'}]")
                   + f"; per-case SD at 4 {sd if sd is None else round(sd, 3)} "
                   + f"[{'met' if sd is not None and 0.15 <= sd <= 0.25 else 'NOT met'}]"
                   + f"; 4-case infection Dice {four['infection_dice']:.3f} "
                   + f"[{'met' if four['infection_dice'] < 0.80 else 'NOT met'}]")
    return out


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(lines: list[dict], checks: list[str], note: str) -> str:
    text = [f"Phantom learning curve ({note}). Targets: {TARGETS}.", "",
            "| profile | iterations | labelled | seeds | cases | infection Dice | per-case SD | seed means | "
            "lungs Dice | real lung crop | real chest CT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        text.append(f"| {line['profile']} | {line['iterations']} | {line['labelled']} | {line['seeds']} | "
                    f"{line['cases']} | {_fmt(line['infection_dice'])} | {_fmt(line['infection_case_sd'])} | "
                    f"{_fmt(line['seed_mean_min'])}–{_fmt(line['seed_mean_max'])} | {_fmt(line['lungs_dice'])} | "
                    f"{_fmt(line['real_lung_crop'])} | {_fmt(line['real_chest_ct'])} |")
    return "\n".join(text + [""] + [f"- {check}" for check in checks]) + "\n"


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for profile, iterations in sorted({(line["profile"], line["iterations"]) for line in lines}):
        points = [line for line in lines if (line["profile"], line["iterations"]) == (profile, iterations)
                  and line["infection_dice"] is not None]
        axis.errorbar([p["labelled"] for p in points], [p["infection_dice"] for p in points],
                      yerr=[p["infection_case_sd"] or 0.0 for p in points], marker="o", capsize=3,
                      label=f"{profile}, {iterations} it")
    axis.errorbar([4, 16], [0.673, 0.777], yerr=[0.223, 0.187], fmt="k*", capsize=3,
                  label="nnU-Net 3D, COVID-19-CT-Seg (Ma et al.)")
    axis.set(xscale="log", xlabel="labelled cases", ylabel="infection Dice (mean ± per-case SD)", ylim=(0, 1))
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="data and models go here")
    parser.add_argument("--profiles", nargs="+", default=["cohort"])
    parser.add_argument("--labelled-strata", type=int, default=None, help="cohort: labelled cases from N sites")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--held-out", type=int, default=24)
    parser.add_argument("--iterations", type=int, nargs="+", default=[800],
                        help="training budgets (several: infection Dice against iterations, to find saturation)")
    parser.add_argument("--features", type=int, nargs="+", default=list(Schedule().features))
    parser.add_argument("--patch", type=int, nargs=3, default=list(Schedule().patch))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--real-ct", type=Path, default=None, help=f"score lungs on real scans (e.g. {REAL_CT})")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--smoke", action="store_true", help="2 sizes, 1 seed, 30 iterations, 4 held-out cases")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.seeds, args.iterations, args.held_out = [4, 8], [0], [30], 4
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if not args.report_only:
        for profile in args.profiles:
            for seed in args.seeds:      # data first, in this process: the jobs only read it
                prepare(args.root, profile, args.labelled_strata, seed, args)
        with ProcessPoolExecutor(args.workers) as pool:
            jobs = [pool.submit(train_and_score, args.root, profile, args.labelled_strata, seed, size, iterations,
                                args)
                    for profile in args.profiles for seed in args.seeds for iterations in args.iterations
                    for size in args.sizes]
            for job in jobs:
                name, seconds = job.result()
                print(f"{time.strftime('%H:%M:%S')} {name}: {seconds:.0f} s", flush=True)
    lines = curve(collect(args.root, args))
    checks = targets(lines)
    note = "SMOKE run, numbers mean nothing" if args.smoke else f"seeds {args.seeds}, {args.held_out} held-out"
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "curve"
    (args.output / f"{stem}.json").write_text(json.dumps({"note": note, "lines": lines, "checks": checks},
                                                         indent=1) + "\n")
    table = markdown(lines, checks, note)
    (args.output / f"{stem}.md").write_text(table)
    plot(lines, args.output / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
