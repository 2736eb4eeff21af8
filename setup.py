from setuptools import find_packages, setup

setup(
    name="covnet",
    version="0.1.0",
    description="Self-configuring 3D segmentation of lungs and COVID-19 infection in chest CT, "
                "with student-teacher self-training on unlabelled CTs",
    packages=find_packages(include=["covnet", "covnet.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "SimpleITK", "batchgenerators", "batchgeneratorsv2", "numpy", "scipy", "acvl-utils", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": [
        "covnet_make_phantoms=covnet.cli.make_phantoms:entry",
        "covnet_import_covid19ctseg=covnet.cli.import_covid19ctseg:entry",
        "covnet_import_unlabelled=covnet.cli.import_unlabelled:entry",
        "covnet_evaluate=covnet.cli.evaluate:entry",
        "covnet_plan_and_preprocess=covnet.cli.plan_and_preprocess:entry",
        "covnet_train=covnet.cli.train:entry",
        "covnet_predict=covnet.cli.predict:entry",
        "covnet_selftrain=covnet.cli.selftrain:entry",
    ]},
)
