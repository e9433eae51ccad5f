"""Everything that touches files: manifests, CT volumes, EHR tables, the synthetic cohort.

Import the submodules directly (``data_modules.ct_ehr``, ``data_modules.synthetic``); the
package itself imports nothing so ``python -m data_modules.synthetic`` runs cleanly.
"""
