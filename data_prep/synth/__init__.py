"""Synthetic breast DCE-MRI DICOM archives: the demo input and test fixture."""
