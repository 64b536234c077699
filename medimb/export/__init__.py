"""medimb.export: results as DICOM objects next to the source series, for the hospital PACS.

``medimb export-dicom`` reads a ``medimb explain`` folder (:mod:`.overlays`), finds each case's source
instances (:mod:`.sources`: the link table of ``medimb-prep convert --link-table`` and the local archive),
puts the maps on the source frames (:mod:`.geometry`) and writes a DICOM Parametric Map and Segmentation per
case and method (:mod:`.objects`, :mod:`.results`, highdicom). It reads DICOM headers with pydicom and imports
no torch. The objects carry the source patient's identity (PHI).
"""
