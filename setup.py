import re
from pathlib import Path

from setuptools import find_packages, setup

# covnet/__init__.py holds the version once; it is read as text because the package cannot be imported before
# its dependencies are installed.
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "covnet" / "__init__.py").read_text(),
                    re.MULTILINE).group(1)

setup(
    name="covnet",
    version=VERSION,
    license="Apache-2.0",
    description="Self-configuring 3D segmentation of lungs and COVID-19 infection in chest CT, "
                "with student-teacher self-training on unlabelled CTs",
    packages=find_packages(include=["covnet", "covnet.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "SimpleITK", "batchgenerators", "batchgeneratorsv2", "numpy", "scipy", "acvl-utils", "tqdm", "matplotlib",
                      # DICOM-SEG output: highdicom writes Segmentation objects with coded segments and source
                      # references (it brings pydicom and pyjpegls; ~50 MB beside torch's ~750 MB).
                      "highdicom>=0.28"],
    extras_require={"test": ["pytest"],
                    # The network on a CPU, 1.5x faster than torch's bfloat16 (benchmarks/cpu_runtimes.py); ~180 MB.
                    "openvino": ["openvino>=2025.0"]},
    entry_points={"console_scripts": [
        "covnet_make_phantoms=covnet.cli.make_phantoms:entry",
        "covnet_import_covid19ctseg=covnet.cli.import_covid19ctseg:entry",
        "covnet_import_unlabelled=covnet.cli.import_unlabelled:entry",
        "covnet_evaluate=covnet.cli.evaluate:entry",
        "covnet_plan_and_preprocess=covnet.cli.plan_and_preprocess:entry",
        "covnet_train=covnet.cli.train:entry",
        "covnet_predict=covnet.cli.predict:entry",
        "covnet_selftrain=covnet.cli.selftrain:entry",
        "covnet_export_model=covnet.cli.export_model:entry",
        "covnet_install_model=covnet.cli.install_model:entry",
    ]},
)
