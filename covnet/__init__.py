"""covnet: self-configuring segmentation of the lungs and COVID-19 infection in chest CT.

The Python API (:mod:`covnet.api`): ``model = covnet.load_model(path)`` once, then ``model.segment(image)`` per CT.
It is imported on first use, so that ``import covnet`` stays cheap (no torch).
"""

# The one place the version is written: setup.py reads it from here, and the model manifest and the DICOM-SEG
# algorithm identification ask for it.
__version__ = "0.1.0"

_API_NAMES = ("load_model", "Model", "Segmentation")
__all__ = ["__version__", *_API_NAMES]


def __getattr__(name: str):
    if name in _API_NAMES:
        from covnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'covnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API_NAMES))
