"""Sequence mode (``sequence: true``): one sample per patient, the patient's scans in time order.

The manifest stays one row per scan; here its rows become patient sequences:

* :func:`require_scan_times` / :func:`check_sequences` — the rules a longitudinal manifest
  must follow (every scan has a finite ``scan_time``; no two scans of a patient share one;
  only the patient's latest scan carries a label). The per-patient split rule is the
  manifest's own (:func:`~data_modules.manifest.validate_manifest`).
* :func:`latest_scans` — a loader's rows, each patient's scans sorted by time and cut to the
  latest ``max_scans``.
* :class:`SequenceDataset` — wraps the per-scan :class:`~data_modules.dataset.CTEHRDataset`
  (so the RAM cache, the disk cache, augmentation and skip handling are the single-scan
  ones: each scan's volume is cached once) and stacks a patient's scans, LEFT-padded to
  ``max_scans`` so the latest scan is always at index ``S - 1``.
* :class:`SequenceCollator` — the collate, which also counts the scans left out of a
  sequence.

A sample: ``image [S, 1, D, H, W]`` (zeros at padding), ``ehr [S, F]`` (normalised, NaN =
missing, 0 at padding), ``ehr_missing [S, F]`` (True at padding), ``scan_mask [S]`` (True =
a real scan), ``scan_times [S]`` (days relative to the latest scan: <= 0, the latest 0,
padding 0), ``label`` (the latest scan's), ``patient_id``, ``scan_id`` and ``cohort`` of the
latest scan. Every index of the dataset is a patient, so a sampler (Lightning's
``DistributedSampler`` in training, the unrepeated one in evaluation) and
:class:`~data_modules.streaming.ShardedStream` shard *patients* across ranks and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from data_modules.cell_values import time_values
from data_modules.dataset import BatchCollator, CTEHRDataset
from data_modules.manifest import ManifestError, RowProblems

log = logging.getLogger(__name__)

LABEL_RULE = "in sequence mode the label belongs to the patient's latest scan"


def _times(column: pd.Series) -> np.ndarray:
    """``scan_time`` as float64 days (NaN where missing or not usable)."""
    return time_values(column)  # numbers (days) or ISO dates (days since 1970-01-01)


def require_scan_times(df: pd.DataFrame, source: str, on_bad_sample: str) -> None:
    """The raw manifest has a ``scan_time`` column and, under ``on_bad_sample='raise'``, a
    finite number in every row (checked before the manifest's own checks, so the first bad
    row is named with its row number in the file and a fix that fits sequence mode).

    Under ``'skip'`` rows with a non-numeric value are dropped by the manifest check and
    rows without a value by :func:`check_sequences`, each counted.
    """
    if "scan_time" not in df.columns:
        raise ManifestError(
            f"manifest {source} has no scan_time column; sequence mode orders each patient's "
            "scans by scan_time (days, any origin): add it, or set sequence: false"
        )
    if on_bad_sample != "raise":
        return
    times = _times(df["scan_time"])
    bad = np.flatnonzero(~np.isfinite(times))
    if len(bad):
        i = int(bad[0])
        raise ManifestError(
            f"manifest {source}: row {i} (scan_id={df['scan_id'].iloc[i]!r}, patient_id="
            f"{df['patient_id'].iloc[i]!r}): scan_time {df['scan_time'].iloc[i]!r} is missing "
            f"or not a finite number ({len(bad)} such row(s)); sequence mode orders a patient's "
            "scans by scan_time (days): give every scan one (or set on_bad_sample: skip to drop "
            "such rows, or sequence: false)"
        )


def check_sequences(df: pd.DataFrame, source: str, problems: RowProblems) -> pd.DataFrame:
    """The validated manifest's rules for sequences; returns the rows to use.

    A row without a ``scan_time`` (only left under ``on_bad_sample='skip'``) is dropped and
    counted. Two scans of a patient at the same ``scan_time``, or a label on a scan that is
    not its patient's latest, stop with a :class:`ManifestError` naming the scans: they are
    table-level faults (the order, or which label belongs to the sequence, is unknown).
    """
    times = _times(df["scan_time"])
    missing = ~np.isfinite(times)
    for i in np.flatnonzero(missing):
        problems.add(
            f"manifest {source}: scan_id={df['scan_id'].iloc[i]!r}: no scan_time (sequence mode "
            "orders a patient's scans by it); row dropped"
        )
    df = df[~missing].reset_index(drop=True)
    df["scan_time"] = times[~missing]

    same = df.duplicated(["patient_id", "scan_time"], keep=False).to_numpy()
    if same.any():
        first = df[same].iloc[0]
        clash = df[
            (df["patient_id"] == first["patient_id"]) & (df["scan_time"] == first["scan_time"])
        ]
        n_pat = df.loc[same, "patient_id"].nunique()
        raise ManifestError(
            f"manifest {source}: patient {first['patient_id']!r} has scans "
            f"{clash['scan_id'].tolist()} (rows {clash.index.tolist()}) at the same scan_time "
            f"{first['scan_time']:g} ({n_pat} such patient(s)); sequence mode needs one scan per "
            "time point: correct the scan_time, or keep one of them (e.g. drop a second series "
            "of the same study)"
        )

    latest = df.groupby("patient_id", sort=False)["scan_time"].transform("max").to_numpy()
    early_label = (df["label"].notna().to_numpy()) & (df["scan_time"].to_numpy() < latest)
    if early_label.any():
        pid = df["patient_id"][early_label].iloc[0]
        rows = df[(df["patient_id"] == pid)]
        labelled = rows[rows["label"].notna() & (rows["scan_time"] < rows["scan_time"].max())]
        last = rows.loc[rows["scan_time"].idxmax()]
        raise ManifestError(
            f"manifest {source}: scan(s) {labelled['scan_id'].tolist()} (rows "
            f"{labelled.index.tolist()}) of patient {pid!r} carry a label but are not the "
            f"patient's latest scan ({last['scan_id']!r}, scan_time {last['scan_time']:g}); "
            f"{LABEL_RULE} ({int(early_label.sum())} such row(s)): put the label on the latest "
            "scan only and leave the earlier scans' label empty (e.g. a patient-level diagnosis "
            "copied to every scan), or set sequence: false"
        )
    return df


def latest_scans(rows: pd.DataFrame, max_scans: int) -> pd.DataFrame:
    """``rows`` grouped by patient (in order of first appearance), each patient's scans in
    time order, only the latest ``max_scans`` kept."""
    first = {pid: k for k, pid in enumerate(pd.unique(rows["patient_id"]))}
    order = np.lexsort((rows["scan_time"].to_numpy(), rows["patient_id"].map(first).to_numpy()))
    rows = rows.iloc[order]
    return rows.groupby("patient_id", sort=False).tail(max_scans).reset_index(drop=True)


def latest_scan_ids(rows: pd.DataFrame) -> dict[str, str]:
    """``{patient_id: scan_id of the latest scan}`` of ``rows``."""
    last = rows.loc[rows.groupby("patient_id", sort=False)["scan_time"].idxmax()]
    return dict(zip(last["patient_id"], last["scan_id"], strict=True))


class SequenceDataset(Dataset):
    """One sample per patient: the patient's scans of ``scans`` stacked in time order.

    Args:
        scans: the per-scan dataset of the split (its rows from :func:`latest_scans`).
        max_scans: ``S``, the length every sequence is left-padded to.
        expected_latest: ``{patient_id: scan_id}`` of each patient's latest scan *before*
            unreadable volumes were dropped at setup (RAM-cache fill); a patient whose latest
            scan is gone is left out (counted in ``problems``). Default: ``scans``' own.
        problems: where setup-time drops are counted.
        name: the split's name, for messages.

    Skip rule (``on_bad_sample: skip``): an earlier scan that cannot be read is left out of
    its sequence (the sequence is one scan shorter; counted); when the latest scan cannot be
    read the whole sequence is skipped (counted), because the label and the time origin
    belong to it.
    """

    def __init__(
        self,
        scans: CTEHRDataset,
        max_scans: int,
        expected_latest: dict[str, str] | None = None,
        problems: RowProblems | None = None,
        name: str = "data",
    ):
        self.scans = scans
        self.max_scans = max_scans
        table = scans.table
        times = table["scan_time"].to_numpy(dtype="float64")
        groups = table.groupby("patient_id", sort=False).indices
        expected = expected_latest if expected_latest is not None else latest_scan_ids(table)
        self.groups: list[np.ndarray] = []
        dropped = []
        for pid, latest_id in expected.items():
            idx = groups.get(pid)
            if idx is not None:
                idx = idx[np.argsort(times[idx], kind="stable")][-max_scans:]
            if idx is None or table["scan_id"].iloc[idx[-1]] != latest_id:
                dropped.append(
                    f"{name} split: patient {pid!r} left out: its latest scan {latest_id!r} "
                    "could not be read (sequence mode: the label and the time origin belong to it)"
                )
                continue
            self.groups.append(idx)
        if dropped and problems is not None:
            for reason in dropped:
                problems.add(reason)
            log.warning("%s split: %d patient sequence(s) left out: %s", name, len(dropped),
                        "; ".join(dropped[:5]))  # fmt: skip
        if not self.groups:
            raise ValueError(f"the {name!r} split has no patient with a readable latest scan")
        self.times = times
        #: one row per sample (the patient's latest scan), as ``CTEHRDataset.table`` is
        self.table = table.iloc[[int(g[-1]) for g in self.groups]].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, p: int) -> dict[str, Any]:
        idx = self.groups[p]
        pid = self.table["patient_id"].iloc[p]
        samples, left_out = [], []
        for i in idx:
            s = self.scans[int(i)]
            if "skipped" in s:
                left_out.append(f"{s['skipped']}; left out of patient {pid!r}'s sequence")
            else:
                samples.append((int(i), s))
        if not samples or samples[-1][0] != int(idx[-1]):
            reason = (
                f"patient {pid!r}: sequence skipped, its latest scan "
                f"{self.table['scan_id'].iloc[p]!r} could not be read"
            )
            return {"skipped": reason, "skipped_scans": left_out}
        return self.stack(samples, left_out)

    def stack(self, samples: list[tuple[int, dict]], left_out: list[str]) -> dict[str, Any]:
        """The real scans placed at the end of ``S`` slots (the latest at ``S - 1``)."""
        S, n = self.max_scans, len(samples)
        first = samples[0][1]
        image = torch.zeros((S, *first["image"].shape), dtype=first["image"].dtype)
        ehr = torch.zeros((S, *first["ehr"].shape), dtype=first["ehr"].dtype)
        ehr_missing = torch.ones((S, *first["ehr"].shape), dtype=torch.bool)
        scan_mask = torch.zeros(S, dtype=torch.bool)
        t = self.times[[i for i, _ in samples]]
        scan_times = torch.zeros(S, dtype=torch.float32)
        scan_times[S - n :] = torch.from_numpy((t - t[-1]).astype(np.float32))
        for k, (_, s) in enumerate(samples, start=S - n):
            image[k], ehr[k], ehr_missing[k] = s["image"], s["ehr"], s["ehr_missing"]
            scan_mask[k] = True
        latest = samples[-1][1]
        out = {
            "image": image,
            "ehr": ehr,
            "ehr_missing": ehr_missing,
            "scan_mask": scan_mask,
            "scan_times": scan_times,
            "label": latest["label"],
            "patient_id": latest["patient_id"],
            "scan_id": latest["scan_id"],
            "cohort": latest["cohort"],
        }
        if left_out:
            out["skipped_scans"] = left_out
        return out


class SequenceCollator(BatchCollator):
    """:class:`~data_modules.dataset.BatchCollator` for patient sequences: also lists the
    scans left out of a sequence under ``"skipped"`` (so the loader's skip report counts
    every unreadable scan and every skipped sequence).

    The task's ``hook`` (e.g. JEPA's masks) is written for single-scan batches; it is applied
    only when it declares ``supports_sequences = True``, otherwise left out (with a warning).
    """

    def __init__(self, hook: Callable[[dict], dict] | None = None):
        supported = getattr(hook, "supports_sequences", False)
        if hook is not None and not supported:
            log.warning(
                "sequence mode: the task's collate_hook %s is for single scans (it does not "
                "declare supports_sequences = True); sequence batches are collated without it",
                type(hook).__name__,
            )
        super().__init__(hook if supported else None)

    def __call__(self, samples: list[dict | None]) -> dict:
        left_out = [r for s in samples if s is not None for r in s.pop("skipped_scans", ())]
        batch = super().__call__(samples)
        if left_out:
            batch["skipped"] = left_out + batch.get("skipped", [])
        return batch
