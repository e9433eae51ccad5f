"""What a task needs of a data module, and what it uses only when the data module has it.

Any ``LightningDataModule`` (or plain dataloaders) trains every task if its batches are the
documented dicts: ``image`` ``[B, 1, D, H, W]`` float, ``ehr`` ``[B, F]`` float,
``ehr_missing`` ``[B, F]`` bool, ``label`` ``[B]`` float (NaN = unlabelled)
(:data:`BATCH_KEYS`), and for predictions the lists ``patient_id`` and ``scan_id``
(:data:`PREDICT_KEYS`; ``cohort`` too, when the data module names cohorts). That is the whole
requirement; the first batch of each loop is checked against it (:func:`check_batch`),
naming what is missing.
Through the CLI the data module must also say what the model is sized from, the attributes
``image_size`` and ``n_ehr_features`` (the CLI links them into the model).

Everything else is a capability (a :class:`typing.Protocol` below) that ``CTEHRDataModule``
has and a user's data module may lack. A task asks with :func:`has_capability`, which logs
one line the first time a capability is missing, and goes on without what it gives:

* :class:`TakesCollateHook` — a ``collate_hook`` attribute the loaders apply to each batch:
  JEPA's masks are drawn in the loader workers. Without it the task draws them itself,
  in the main process before each batch moves to the device (same masks, no worker overlap).
* :class:`SplitDatasets` — ``dataset(split)`` and ``batch_size``: the reference monitors
  (``ref/*`` at step 0, ``final/*`` at the end: the offline probe and rank of the image
  encoder) read whole splits. Without it they are skipped.
* :class:`NamesCohorts` — ``cohorts``: test metrics per cohort (internal / external).
  Without it one cohort, ``all``.
* :class:`CountsLabels` — ``labelled_counts()``: the checkpoint's message when the
  validation split holds no label says how many each split has. Without it, a shorter one.

The EHR normalisation a pretraining learnt travels through ``LightningDataModule``'s own
``state_dict`` / ``load_state_dict``, which every data module has (a plain one keeps nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch.utilities import rank_zero_info

BATCH_KEYS = ("image", "ehr", "ehr_missing", "label")
PREDICT_KEYS = ("patient_id", "scan_id")  # what a prediction row is keyed by


@runtime_checkable
class TakesCollateHook(Protocol):
    """Applies ``collate_hook`` (set by the task's callback) to each collated batch."""

    collate_hook: Callable[[dict], dict] | None


@runtime_checkable
class SplitDatasets(Protocol):
    """Hands out a split's dataset (``"train"``, ``"val"``, ``"test"``) and its batch size."""

    batch_size: int

    def dataset(self, split: str) -> Any: ...


@runtime_checkable
class NamesCohorts(Protocol):
    """The cohorts the test split holds (a batch's ``cohort`` values)."""

    cohorts: list[str]


@runtime_checkable
class CountsLabels(Protocol):
    """Labelled scans per split."""

    def labelled_counts(self) -> dict[str, int]: ...


_told: set[tuple[str, str]] = set()


def has_capability(datamodule: Any, capability: type, without: str) -> bool:
    """Whether ``datamodule`` has ``capability``; if not, say once per data module class and
    capability what the run does ``without`` it."""
    try:
        present = datamodule is not None and isinstance(datamodule, capability)
    except Exception:  # a property that needs setup() first: the attribute is there
        present = True
    if present:
        return True
    key = (type(datamodule).__name__, capability.__name__)
    if key not in _told:
        _told.add(key)
        rank_zero_info(
            f"data module {key[0]} has no {capability.__name__} "
            f"(see jepa_lightning/data_contract.py): {without}"
        )
    return False


def check_batch(batch: Any, where: str, predict: bool = False) -> None:
    """Refuse a batch that is not the documented dict, naming the missing keys (with
    ``predict``, the prediction keys too). An empty batch (every sample skipped as bad
    input) passes."""
    if isinstance(batch, dict) and not batch:
        return
    required = [*BATCH_KEYS, *PREDICT_KEYS] if predict else list(BATCH_KEYS)
    if not isinstance(batch, dict):
        raise TypeError(
            f"{where}: a batch must be a dict with the keys {required} "
            f"(jepa_lightning/data_contract.py); the data module yielded a {type(batch).__name__}"
        )
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(
            f"{where}: the batch has no {missing} (it has {sorted(batch)}); a data module's "
            f"batches carry {required} (jepa_lightning/data_contract.py)"
        )
