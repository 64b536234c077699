"""Synthetic breast DCE-MRI DICOM archives: the demo input, test fixture and localisation benchmark.

>>> from data_prep.synth import synthesize_archive
>>> summary = synthesize_archive("demo_archive", cases=40, positive_fraction=0.2, seed=0)  # doctest: +SKIP
"""

from data_prep.synth.archive import ArchiveSummary, lesion_mask_image, synthesize_archive
from data_prep.synth.phantom import Case, PhantomConfig, synthesize_case

__all__ = ["ArchiveSummary", "Case", "PhantomConfig", "lesion_mask_image", "synthesize_archive", "synthesize_case"]
