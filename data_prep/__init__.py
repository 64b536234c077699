"""data_prep: DICOM archive -> NIfTI + de-identified JSON sidecars + MONAI datalists.

This package must never import torch or medimb (it runs on machines without them).
"""

__version__ = "0.1.0"
