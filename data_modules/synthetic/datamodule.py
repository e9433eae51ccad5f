"""The synthetic cohort as a :class:`~data_modules.ct_ehr.CTEHRDataModule`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd

from data_modules.cohort_files import reject_fixed
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.synthetic.cohort import ensure_cohort
from data_modules.synthetic.spec import CohortSpec, ExternalShift, external_site, feature_names


class SyntheticCohortDataModule(CTEHRDataModule):
    """:class:`CTEHRDataModule` over a synthetic cohort, generated into ``root`` on first use.

    Args:
        root: cohort folder; generated when absent or empty, reused when its settings match.
        n_patients / n_external: internal and external cohort sizes (patients).
        labeled_fraction: share of internal training patients that carry a label.
        n_ehr_features: EHR vector length (>= 10).
        seed: cohort seed (the cohort is a deterministic function of the settings).
        label_weights: share of the label logit's variance from (shared, image-only,
            EHR-only) causes.
        structure: ``"shared"`` (image and EHR share causes) or ``"independent"`` (no
            shared cause: each modality has its own; see the module docstring).
        ehr_missing_rate: probability that an EHR value is missing (age never is).
        external_shift: strength 0..1 of each aspect of the external site's shift (HU
            offset, noise, voxel spacing, EHR coding, prevalence).
        scans_per_patient: (min, max) scans per patient, a uniform whole number; the
            default ``(1, 1)`` is the one-scan cohort. Only the latest scan carries a label.
        scan_interval_days: (min, max) days between consecutive scans, uniform.
        growth_signal: 0..1, the share of patients whose nodule's volume doubling time
            follows its label (malignant 100–400 days, benign stable or 600–3000 days); the
            others' follows a label-independent mixture, so 0 leaves growth uninformative.
            The nodule at the latest scan does not depend on it.
        image_signal: which part of the image carries the label: ``"both"`` (the nodule
            and the diffuse findings follow the causes), ``"local"`` (the nodule only; the
            findings follow causes of their own) or ``"global"`` (the findings only; the
            nodule is drawn from causes of its own). The "Pretext Matters" knob.
        generate_workers: processes that generate the cohort on first use (default
            :func:`~data_modules.cohort_files.default_workers`; the files do not depend on
            it). Not the loaders' ``num_workers``.
        **kwargs: every other :class:`CTEHRDataModule` argument (``image_size``,
            ``batch_size``, preprocessing ``hu_window`` / ``preprocess``, train-time
            ``augment``, disk ``cache_dir``, ``streaming``, ``label_fraction`` ...): the
            synthetic cohort is the place to try them. Its EHR features and its split
            column are fixed by the settings above: ``ehr_columns``, ``ehr_table``,
            ``ehr_join`` and the split fractions/seed must keep their defaults.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        n_patients: int = 400,
        n_external: int = 150,
        labeled_fraction: float = 0.25,
        n_ehr_features: int = 32,
        seed: int = 0,
        label_weights: tuple[float, float, float] = (0.7, 0.2, 0.1),
        structure: Literal["shared", "independent"] = "shared",
        ehr_missing_rate: float = 0.15,
        external_shift: ExternalShift | None = None,
        scans_per_patient: tuple[int, int] = (1, 1),
        scan_interval_days: tuple[float, float] = (90.0, 540.0),
        growth_signal: float = 0.0,
        image_signal: Literal["both", "local", "global"] = "both",
        generate_workers: int | None = None,
        **kwargs: Any,
    ):
        self.root = root
        self.generate_workers = generate_workers
        self.spec = CohortSpec(
            n_patients=n_patients,
            n_external=n_external,
            labeled_fraction=labeled_fraction,
            n_ehr_features=n_ehr_features,
            label_weights=tuple(label_weights),
            seed=seed,
            structure=structure,
            ehr_missing_rate=ehr_missing_rate,
            external=external_site(external_shift or ExternalShift()),
            scans_per_patient=tuple(scans_per_patient),
            scan_interval_days=tuple(scan_interval_days),
            growth_signal=growth_signal,
            image_signal=image_signal,
        )
        # The loader / preprocessing / label-fraction arguments are CTEHRDataModule's own
        # (jsonargparse reads them through this call, so the CLI and YAML accept them).
        reject_fixed(kwargs, CTEHRDataModule, "synthetic")
        if kwargs.get("roi_space") is None:  # the CLI passes None when a YAML leaves it out
            kwargs["roi_space"] = "ras_mm"  # the generator writes world RAS mm
        super().__init__(manifest=str(Path(root) / "manifest.parquet"), **kwargs)

    @property
    def ehr_feature_names(self) -> list[str]:
        return feature_names(self.spec.n_ehr_features)

    def latents(self) -> pd.DataFrame:
        """The generator's per-scan causes, nodule and findings (``latents.parquet``), indexed
        by ``scan_id``: ground truth for audits of what an encoder captured."""
        path = Path(self.root) / "latents.parquet"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: run prepare_data() (or generate the cohort) first"
            )
        return pd.read_parquet(path).set_index("scan_id")

    def prepare_data(self) -> None:
        ensure_cohort(self.root, self.spec, workers=self.generate_workers)

    def setup(self, stage: str | None = None) -> None:
        # A no-op when present; covers setup() without prepare_data().
        ensure_cohort(self.root, self.spec, workers=self.generate_workers)
        super().setup(stage)
