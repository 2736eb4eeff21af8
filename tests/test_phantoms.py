"""Synthetic chest-CT phantoms: anatomy, HU ranges, labels, spacing modes, determinism and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from covnet.cli import make_phantoms as cli
from covnet.cli.common import run_command
from covnet.dataset import image_path, label_path, validate_raw_dataset
from covnet.image.io import read_image
from covnet.phantoms.acquisition import profile_named
from covnet.phantoms.anatomy import draw_anatomy
from covnet.phantoms.generate import (
    INFECTION,
    SMALL_MAX_VOXELS,
    case_plan,
    cases_json,
    draw_scan,
    draw_infection,
    draw_spacing,
    generate_split,
    infection_fraction,
    make_phantom_case,
    make_phantom_dataset,
    patient_indices,
)
from covnet.workspace import Workspace

TINY_SPACING = (9.0, 8.0, 8.0)  # ~45x45x30 voxels: enough anatomy for unit tests, fast to render


@pytest.fixture(scope="module")
def labelled_cases():
    """The first four labelled cases of seed 0, default small size and mixed spacing."""
    return list(generate_split(0, 0, 4, "small", "mixed"))


def test_same_seed_gives_identical_arrays_and_other_seed_differs():
    first = make_phantom_case(11, spacing_zyx=TINY_SPACING)
    second = make_phantom_case(11, spacing_zyx=TINY_SPACING)
    other = make_phantom_case(12, spacing_zyx=TINY_SPACING)
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() == second[1].tobytes()
    assert first[2] == second[2]
    assert other[0].shape != first[0].shape or not np.array_equal(other[0], first[0])


def test_dtypes_values_and_geometry(labelled_cases):
    for _, image, label, geometry in labelled_cases:
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape == geometry.shape
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
        assert {1, 2} <= set(np.unique(label).tolist())
        assert np.prod(geometry.shape) <= SMALL_MAX_VOXELS
        assert all(abs(o) > 1.0 for o in geometry.origin)
        depth_mm, width_mm = geometry.shape[0] * geometry.spacing[0], geometry.shape[2] * geometry.spacing[2]
        assert 200 <= depth_mm <= 340 and 300 <= width_mm <= 400


def test_origins_and_shapes_vary_between_cases(labelled_cases):
    assert len({g.origin for *_, g in labelled_cases}) == len(labelled_cases)
    assert len({g.shape for *_, g in labelled_cases}) > 1


def test_infection_lies_inside_the_lungs():
    # Same patient, same scan, with and without infection: infected voxels must be lung in the clean scan.
    anatomy = draw_anatomy(np.random.default_rng(3))
    infected = make_phantom_case(np.random.default_rng(4), spacing_zyx=(5.0, 5.0, 5.0), infection_burden=0.25,
                                 anatomy=anatomy)
    clean = make_phantom_case(np.random.default_rng(4), spacing_zyx=(5.0, 5.0, 5.0), infection_burden=0.0,
                              anatomy=anatomy)
    assert infected[2] == clean[2]
    infection = infected[1] == 3
    assert infection.sum() > 0.1 * (clean[1] > 0).sum()
    assert np.isin(clean[1][infection], [1, 2]).all()
    assert (clean[1] == 3).sum() == 0
    assert np.array_equal(infected[1][~infection], clean[1][~infection])


def test_infection_hu_range(labelled_cases):
    values = np.concatenate([image[label == 3] for _, image, label, _ in labelled_cases])
    assert values.size > 100
    inside = (values >= -750) & (values <= -50)
    assert inside.mean() > 0.98
    assert values.min() >= -750 - 6 * 20 and values.max() <= -50 + 6 * 20  # noise is at most 20 HU std


def test_lung_and_air_hu(labelled_cases):
    for _, image, label, _ in labelled_cases:
        lung = np.isin(label, [1, 2])
        assert -880 <= np.median(image[lung]) <= -820
        corners = np.concatenate([image[:, :3, :3].ravel(), image[:, -3:, -3:].ravel()])
        assert abs(corners.mean() + 1000) < 6 and corners.std() < 25
        body_centre = image[:, image.shape[1] // 2 - 2: image.shape[1] // 2 + 2, image.shape[2] // 2]
        assert (body_centre > -200).mean() > 0.5  # mediastinum, not air, at the centre of the body
        assert image.max() > 300  # bone


def test_left_lung_at_larger_x(labelled_cases):
    for _, _, label, _ in labelled_cases:
        left_x = np.nonzero(label == 1)[2].mean()
        right_x = np.nonzero(label == 2)[2].mean()
        assert left_x > right_x + 10


def test_infection_burden_ranges_from_none_to_large(labelled_cases):
    burdens = [infection_fraction(label) for _, _, label, _ in labelled_cases]
    assert burdens[3] == 0.0
    assert burdens[1] > 0.15
    assert len(set(round(b, 4) for b in burdens)) >= 3


def test_mixed_spacing_has_fine_and_coarse_slices(labelled_cases):
    z_spacings = [g.spacing[0] for *_, g in labelled_cases]
    assert any(z <= 6.0 for z in z_spacings) and any(z >= 12.0 for z in z_spacings)
    for *_, g in labelled_cases:
        assert 4.5 <= g.spacing[1] == g.spacing[2] <= 5.5
    planned = [case_plan(7, 0, index, "clinical", "mixed")[1][0] for index in range(12)]
    assert min(planned) < 1.6 and max(planned) > 2.9 and all(1.0 <= z <= 5.0 for z in planned)


@pytest.mark.parametrize("size", ["small", "clinical"])
def test_isotropic_and_anisotropic_modes(size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        isotropic = draw_spacing(rng, size, "isotropic")
        assert max(isotropic) / min(isotropic) <= 1.1
        anisotropic = draw_spacing(rng, size, "anisotropic")
        assert anisotropic[0] >= 4 * max(anisotropic[1:])
        if size == "clinical":
            assert 0.7 <= anisotropic[1] <= 0.8 and anisotropic[0] <= 5.0


def test_scan_shapes_follow_spacing_and_size():
    anatomy = draw_anatomy(np.random.default_rng(5))
    clinical = draw_scan(np.random.default_rng(0), anatomy, "clinical", (1.25, 0.75, 0.75), 0.0).geometry
    assert clinical.shape[1:] == (512, 512) and 200 <= clinical.shape[0] * 1.25 <= 340
    for z_spacing in (4.0, 14.0, 22.0):
        small = draw_scan(np.random.default_rng(1), anatomy, "small", (z_spacing, 5.0, 5.0), 0.1).geometry
        assert np.prod(small.shape) <= SMALL_MAX_VOXELS and 60 <= small.shape[2] <= 80
        assert 200 <= small.shape[0] * z_spacing <= 340


def test_isotropic_case_renders(tmp_path):
    spacing = draw_spacing(np.random.default_rng(2), "small", "isotropic")
    image, label, geometry = make_phantom_case(2, spacing_zyx=spacing)
    assert geometry.spacing == spacing and {1, 2} <= set(np.unique(label).tolist())


def test_patients_are_sometimes_shared():
    patients = patient_indices(0, 20)
    assert patients[1] == patients[0] == 0
    assert len(set(patients)) < 20 and all(p <= i for i, p in enumerate(patients))
    assert patient_indices(0, 3) == [0, 1, 2]


def _run_cli(argv):
    return run_command("covnet_make_phantoms", cli.main, argv)


def test_cli_writes_a_valid_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    workspace = tmp_path / "ws"
    argv = ["--workspace", str(workspace), "--num-labelled", "4", "--num-unlabelled", "1", "--num-test", "1",
            "--seed", "3"]
    assert _run_cli(argv) == 0
    output = capsys.readouterr().out
    assert "labelled (imagesTr): 4 cases" in output and "spacing z" in output
    description, cases = validate_raw_dataset(workspace / "raw")
    assert cases == [f"phantom_{i:03d}" for i in range(4)]
    assert description.channel_names == {"0": "CT"} and description.num_training == 4
    assert description.group_of("phantom_001") == description.group_of("phantom_000")
    assert image_path(workspace / "raw/imagesUnlabelled", "unlabelled_000").is_file()
    test_label, _ = read_image(label_path(workspace / "raw/labelsTs", "test_000"))
    assert test_label.dtype == np.uint8
    image, geometry = read_image(image_path(workspace / "raw/imagesTr", "phantom_002"))
    assert image.dtype == np.int16 and geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    before = (workspace / "raw/dataset.json").read_text()
    assert _run_cli(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dataset.json" in error and "--overwrite" in error
    assert (workspace / "raw/dataset.json").read_text() == before

    # --overwrite replaces the phantoms but keeps real CTs a user imported into the pool.
    (workspace / "raw/imagesUnlabelled/mosmed_0001_0000.nii.gz").write_bytes(b"a user's CT")
    assert _run_cli(["--workspace", str(workspace), "--num-labelled", "4", "--num-unlabelled", "0",
                     "--num-test", "0", "--seed", "4", "--overwrite"]) == 0
    assert json.loads((workspace / "raw/dataset.json").read_text())["numTraining"] == 4
    assert not list((workspace / "raw").glob("images*/unlabelled_*")) and not list((workspace / "raw").glob("*Ts/*"))
    assert (workspace / "raw/imagesUnlabelled/mosmed_0001_0000.nii.gz").read_bytes() == b"a user's CT"


def test_labelled_cases_do_not_depend_on_other_split_counts(tmp_path):
    from covnet.phantoms.generate import make_phantom_dataset
    make_phantom_dataset(tmp_path / "a", num_labelled=2, num_unlabelled=0, num_test=0, seed=9)
    make_phantom_dataset(tmp_path / "b", num_labelled=2, num_unlabelled=2, num_test=1, seed=9)
    for case in ("phantom_000", "phantom_001"):
        first, _ = read_image(image_path(tmp_path / "a/raw/imagesTr", case))
        second, _ = read_image(image_path(tmp_path / "b/raw/imagesTr", case))
        assert np.array_equal(first, second)


def test_acquisition_profiles_change_the_scan_not_the_anatomy(tmp_path):
    """A second scanner sees the same patients differently: thicker slices, a calibration offset, more noise,
    fainter lesions; the default profile is the original phantom, and the pool's truth can be kept."""
    standard, shifted = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    make_phantom_dataset(standard, num_labelled=2, num_unlabelled=2, num_test=0, seed=5, pool_truth=True)
    make_phantom_dataset(shifted, num_labelled=2, num_unlabelled=2, num_test=0, seed=5,
                         unlabelled_profile=profile_named("low_dose_soft"), pool_truth=True)
    for case in ("phantom_000", "phantom_001"):      # labelled split: same profile, same bytes
        assert (standard.images_tr / f"{case}_0000.nii.gz").read_bytes() == \
            (shifted.images_tr / f"{case}_0000.nii.gz").read_bytes()
    for index in range(2):
        scans = {}
        for name, workspace in (("standard", standard), ("shifted", shifted)):
            image, geometry = read_image(workspace.images_unlabelled / f"unlabelled_{index:03d}_0000.nii.gz")
            truth, truth_geometry = read_image(workspace.labels_unlabelled / f"unlabelled_{index:03d}.nii.gz")
            assert truth_geometry == geometry and set(np.unique(truth)) <= {0, 1, 2, 3}
            scans[name] = image.astype(float), truth, float(np.prod(geometry.spacing)) / 1000
        (image, truth, ml), (reference, reference_truth, reference_ml) = scans["shifted"], scans["standard"]
        assert read_image(shifted.images_unlabelled / f"unlabelled_{index:03d}_0000.nii.gz")[1].spacing[0] >= 12
        air, reference_air = image[:, :3, :3], reference[:, :3, :3]     # a corner outside the body
        assert abs(np.median(air) - np.median(reference_air) - 50) < 10
        assert air.std() > 1.5 * reference_air.std()
        lungs, reference_lungs = np.count_nonzero(truth) * ml, np.count_nonzero(reference_truth) * reference_ml
        assert abs(lungs / reference_lungs - 1) < 0.2                  # the same patient's lungs
    image, truth, _ = scans["shifted"]                                 # case 1 is heavily infected
    reference, reference_truth, _ = scans["standard"]
    assert np.median(image[truth == 3]) - 50 < np.median(reference[reference_truth == 3])   # fainter lesions


def test_varied_lesions_give_each_patient_one_disease_stage_and_the_cohort_every_stage():
    """``varied_lesions``: a case's lesions share one density (within the profile's spread), cases differ in it
    from faint ground glass below the standard floor to consolidation, and the lesion voxels follow."""
    profile = profile_named("varied_lesions")
    stages = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        infection = draw_infection(rng, draw_anatomy(rng), 0.1, profile)
        densities = [blob.base_hu for blob in infection.blobs]
        assert max(densities) - min(densities) <= 2 * profile.lesion_stage_spread_hu
        assert infection.floor_hu == profile.lesion_floor_hu < -720
        stages.append(float(np.mean(densities)))
    assert min(stages) < -650 and max(stages) > -300
    lesion_hu = {}
    for seed in range(40):
        image, label, _ = make_phantom_case(seed, spacing_zyx=TINY_SPACING, infection_burden=0.2, profile=profile)
        lesion_hu[seed] = float(np.median(image[label == INFECTION]))
    assert min(lesion_hu.values()) < -650 and max(lesion_hu.values()) > -350


def test_distinct_patients_make_every_labelled_case_its_own_group(tmp_path):
    paired = make_phantom_dataset(Workspace(tmp_path / "a"), num_labelled=4, num_unlabelled=0, num_test=0, seed=1)
    distinct = make_phantom_dataset(Workspace(tmp_path / "b"), num_labelled=4, num_unlabelled=0, num_test=0, seed=1,
                                    distinct_patients=True)
    assert paired.group_of("phantom_001") == paired.group_of("phantom_000")     # case 1 rescans patient 0
    assert len({distinct.group_of(f"phantom_{index:03d}") for index in range(4)}) == 4


def test_a_burden_range_infects_every_case_within_it(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    make_phantom_dataset(workspace, num_labelled=5, num_unlabelled=0, num_test=0, seed=2, burden_range=(0.05, 0.3))
    for index in range(5):                       # case 3 would be clean by default
        label, _ = read_image(workspace.labels_tr / f"phantom_{index:03d}.nii.gz")
        assert 0.02 < infection_fraction(label) < 0.4       # blobs are cut by the lung edge: a loose range


def test_flags_about_a_split_of_no_cases_are_ignored_with_a_warning(tmp_path, capsys):
    assert _run_cli(["--workspace", str(tmp_path / "ws"), "--num-labelled", "1", "--num-unlabelled", "0",
                     "--num-test", "0", "--unlabelled-profile", "low_dose_soft", "--pool-truth",
                     "--test-profile", "varied_lesions"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: --unlabelled-profile is ignored: --num-unlabelled 0 makes no such cases",
                        "warning: --pool-truth is ignored: --num-unlabelled 0 makes no such cases",
                        "warning: --test-profile is ignored: --num-test 0 makes no such cases"]


# --- The cohort profile (issue 32) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort_workspace(tmp_path_factory):
    """A small cohort dataset: 4 labelled cases from 2 sites, 14 pool cases, 2 test cases."""
    workspace = Workspace(tmp_path_factory.mktemp("cohort"))
    make_phantom_dataset(workspace, num_labelled=4, num_unlabelled=14, num_test=2, seed=5,
                         profile=profile_named("cohort"), pool_truth=True, labelled_strata=2)
    return workspace


def _cohort_records(workspace) -> dict:
    return json.loads(cases_json(workspace).read_text())


def test_cohort_same_seed_gives_identical_files_other_seed_differs(tmp_path, cohort_workspace):
    again, other = Workspace(tmp_path / "again"), Workspace(tmp_path / "other")
    for workspace, seed in ((again, 5), (other, 6)):
        make_phantom_dataset(workspace, num_labelled=4, num_unlabelled=14, num_test=2, seed=seed,
                             profile=profile_named("cohort"), pool_truth=True, labelled_strata=2)
    files = sorted(p.relative_to(cohort_workspace.root) for p in cohort_workspace.raw.rglob("*") if p.is_file())
    assert len(files) == 4 + 4 + 14 + 14 + 2 + 2 + 2  # images, labels, pool (+truth), test, both JSONs
    for name in files:
        assert (again.root / name).read_bytes() == (cohort_workspace.root / name).read_bytes(), name
    first = cohort_workspace.images_unlabelled / "unlabelled_000_0000.nii.gz"
    assert (other.images_unlabelled / first.name).read_bytes() != first.read_bytes()


def test_cohort_covers_every_source_of_variation(cohort_workspace):
    records = _cohort_records(cohort_workspace)
    assert len(records) == 20
    rows = list(records.values())
    assert len({p for row in rows for p in row["patterns"]}) >= 4
    assert len({row["stage"] for row in rows}) >= 3
    severities = [row["severity"] for row in rows]
    assert min(severities) < 0.05 and max(severities) > 0.3
    assert any(row["confounders"] for row in rows)
    assert {"hu", "windowed_0_255"} <= {row["intensity"] for row in rows}
    assert {"soft", "sharp"} <= {row["kernel"] for row in rows}
    assert len({row["thickness_mm"] for row in rows}) >= 3
    assert any(row["fov"] != "full" for row in rows) and any(row["fov"] == "full" for row in rows)
    assert any(row["contrast"] for row in rows) and any(not row["bilateral"] or row["diffuse"] for row in rows)


def test_cohort_severity_reaches_both_extremes():
    # Over many patients, the stage-dependent severity spans < 5 % to > 75 % of the lungs.
    from covnet.phantoms.lesions import draw_disease
    rng = np.random.default_rng(0)
    anatomy = draw_anatomy(rng)
    severities = [draw_disease(rng, anatomy).severity for _ in range(400)]
    assert min(severities) < 0.05 and max(severities) > 0.75


def test_cohort_labels_valid_and_confounders_not_infection(cohort_workspace):
    records = _cohort_records(cohort_workspace)
    for labels_dir in (cohort_workspace.labels_tr, cohort_workspace.labels_unlabelled):
        for path in sorted(labels_dir.glob("*.nii.gz")):
            label, _ = read_image(path)
            image, _ = read_image(path.parent.parent / path.parent.name.replace("labels", "images")
                                  / path.name.replace(".nii.gz", "_0000.nii.gz"))
            record = records[path.name[:-len(".nii.gz")]]
            assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
            assert record["lungs_present"] and set(record["lungs_present"]) <= {1, 2}
            if record["intensity"] == "windowed_0_255":  # restored to HU as the importer does: 256 levels
                assert len(np.unique(image)) <= 256 and image.max() <= 250
            else:
                assert image.min() < -900 and len(np.unique(image)) > 256
            fraction = np.count_nonzero(label == 3) / max(np.count_nonzero(label), 1)
            assert abs(fraction - record["severity"]) < 1e-3


def test_cohort_confounders_are_never_labelled_infection():
    from covnet.phantoms.cohort import SITES, draw_cohort_scan, render_cohort
    from covnet.phantoms.lesions import Disease, draw_disease
    rng = np.random.default_rng(2)
    anatomy = draw_anatomy(rng)
    disease = draw_disease(rng, anatomy)
    scan = draw_cohort_scan(rng, anatomy, "small", SITES[1])
    healthy = Disease(disease.stage, 0.0, True, False, (), disease.field, ())
    confounded = Disease(disease.stage, 0.0, True, False, (), disease.field,
                         ("pleural_effusion", "dependent_atelectasis", "emphysema", "fibrotic_bands"))
    clean_image, clean_label = render_cohort(anatomy, healthy, scan)
    image, label = render_cohort(anatomy, confounded, scan)
    assert (label == 3).sum() == 0 and not np.array_equal(image, clean_image)
    assert 0 < (label > 0).sum() < (clean_label > 0).sum()  # effusion fluid is not lung


def test_labelled_strata_restrict_the_labelled_sites(cohort_workspace):
    rows = _cohort_records(cohort_workspace).values()
    labelled = {row["site"] for row in rows if row["split"] == "labelled"}
    pool = {row["site"] for row in rows if row["split"] != "labelled"}
    assert len(labelled) <= 2 and len(pool) >= 4
    from covnet.phantoms.cohort import SITES, site_choices
    assert labelled <= {SITES[i].name for i in site_choices(5, 2)}


def test_labelled_strata_needs_the_cohort_profile(tmp_path):
    code = run_command("covnet_make_phantoms", cli.main, ["--workspace", str(tmp_path), "--num-labelled", "2",
                                                         "--labelled-strata", "1"])
    assert code != 0


def test_cohort_cli_writes_cases_json(tmp_path):
    code = run_command("covnet_make_phantoms", cli.main, ["--workspace", str(tmp_path), "--num-labelled", "2",
                                                         "--num-unlabelled", "0", "--num-test", "1",
                                                         "--profile", "cohort", "--labelled-strata", "1"])
    assert code == 0
    records = json.loads(cases_json(Workspace(tmp_path)).read_text())
    assert sorted(records) == ["phantom_000", "phantom_001", "test_000"]
    assert len({records["phantom_000"]["site"], records["phantom_001"]["site"]}) == 1
