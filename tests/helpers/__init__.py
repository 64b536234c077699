"""Support code shared by the tests: data writers, tiny models/configs and runners (no tests, no fixtures).

Imported as ``helpers.<module>``: pytest's default ``rootdir``/``prepend`` import mode puts ``tests/`` on
``sys.path`` for the test modules (``tests/`` has no ``__init__.py``), and ``conftest.py`` adds it once more
so a test module imported any other way finds the package too.

- :mod:`helpers.dicom` -- :func:`~helpers.dicom.write_dicom_series`, a tiny classic MR series.
- :mod:`helpers.nifti` -- the NIfTI volume writer and the datalist writer.
- :mod:`helpers.training` -- a tiny learnable MedMNIST-style ``.npz`` and tiny training configs.
- :mod:`helpers.explain` -- hand-built networks that follow the explain contract, test inputs, affines.
- :mod:`helpers.bundles` -- paths of the MONAI bundles and a runner of bundle commands.
"""
