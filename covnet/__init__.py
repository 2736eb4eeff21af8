"""covnet: self-configuring segmentation of the lungs and COVID-19 infection in chest CT."""

# The one place the version is written: setup.py reads it from here, and the model manifest and the DICOM-SEG
# algorithm identification ask for it.
__version__ = "0.1.0"
