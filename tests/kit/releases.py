"""Phantom cases repackaged as the public releases that the importers read."""
from __future__ import annotations

import shutil
from pathlib import Path


def as_covid19ctseg_release(phantom_raw: Path, release: Path) -> list[str]:
    """Repackage phantom cases under the public release's folder and file names."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in (phantom_raw / "labelsTr").glob("*.nii.gz"))
    (release / "COVID-19-CT-Seg_20cases").mkdir(parents=True)
    (release / "Lung_and_Infection_Mask").mkdir()
    for number, case in enumerate(cases, start=1):
        shutil.copy(phantom_raw / "imagesTr" / f"{case}_0000.nii.gz",
                    release / "COVID-19-CT-Seg_20cases" / f"coronacases_org_{number:03d}.nii.gz")
        shutil.copy(phantom_raw / "labelsTr" / f"{case}.nii.gz",
                    release / "Lung_and_Infection_Mask" / f"coronacases_{number:03d}.nii.gz")
    return cases
