"""data_prep.pacs: talk to a hospital DICOM server (PACS) over DICOMweb or DIMSE.

:mod:`data_prep.pacs.server` describes a server from one URL-like string and opens a connection with
one interface for both protocols (echo, find, retrieve, store); :mod:`data_prep.pacs.pull` fills a
local, resumable archive folder from it; :mod:`data_prep.pacs.links` reads and writes the private
link table between pseudonyms and the original UIDs. Like the rest of data_prep, no torch.
"""
