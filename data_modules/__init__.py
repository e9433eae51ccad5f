"""Everything that touches files: manifests, CT volumes, EHR tables, the generated cohorts.

Import the submodules directly (``data_modules.ct_ehr``, ``data_modules.synthetic``); the
package itself imports nothing so ``python -m data_modules.synthetic`` runs cleanly.

One job per module: ``manifest`` (the table and its checks), ``ehr_table`` / ``ehr_features``
(EHR features, joins, normalisation), ``splits`` and ``label_subsets`` (which rows each
loader sees), ``readers`` (NIfTI / DICOM) and ``transforms`` (the CT chain), ``dataset``
(samples, collate, skip reports), ``cache`` / ``streaming``, ``ct_ehr`` (the DataModule that
composes them), ``validate`` (the archive check), and the two generated cohorts
``synthetic/`` and ``lidc/`` with what they share in ``cohort_files``.
"""
