"""Streaming: each scan exactly once per epoch over 2 simulated ranks x 2 workers, a new
shuffle per epoch (also with persistent workers), drop_last gives equal steps per rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.streaming import ShardedStream, StreamingLoader
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti

N, RANKS, WORKERS, BATCH = 23, 2, 2, 3


def _collate(items):
    return list(items)


def _epoch(rank: int, epoch: int, drop_last: bool, persistent=None) -> list[list[int]]:
    """The batches one simulated rank sees in ``epoch`` (its loader runs 2 real workers)."""
    if persistent is not None:
        loader = persistent
    else:
        stream = ShardedStream(list(range(N)), shuffle=True, seed=5, drop_last=drop_last,
                               batch_size=BATCH, num_workers=WORKERS, rank=rank, world_size=RANKS)  # fmt: skip
        loader = StreamingLoader(stream, batch_size=BATCH, num_workers=WORKERS, collate_fn=_collate,
                                 epoch_fn=lambda: epoch)  # fmt: skip
    return [b for b in loader]


@pytest.mark.parametrize("epoch", [0, 1])
def test_each_scan_exactly_once_per_epoch_over_ranks_and_workers(epoch):
    seen = Counter()
    for rank in range(RANKS):
        for batch in _epoch(rank, epoch, drop_last=False):
            seen.update(batch)
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}


def test_drop_last_gives_full_batches_and_equal_steps_per_rank():
    per_rank = [_epoch(rank, 0, drop_last=True) for rank in range(RANKS)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert all(len(b) == BATCH for batches in per_rank for b in batches)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    unit = RANKS * WORKERS * BATCH
    assert set(seen.values()) == {1} and len(seen) == N // unit * unit
    stream = ShardedStream(list(range(N)), drop_last=True, batch_size=BATCH, num_workers=WORKERS,
                           rank=0, world_size=RANKS)  # fmt: skip
    assert len(stream) == sum(len(b) for b in per_rank[0])  # what Lightning sizes epochs with


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_lengths_are_what_each_rank_yields(drop_last, workers):
    """Lightning ends an epoch after ``len(loader)`` batches: with several workers each ends
    on its own partial batch, which ``ceil(len(dataset) / batch_size)`` does not count."""
    for rank in range(RANKS):
        stream = ShardedStream(list(range(N)), drop_last=drop_last, batch_size=BATCH,
                               num_workers=workers, rank=rank, world_size=RANKS)  # fmt: skip
        loader = StreamingLoader(stream, batch_size=BATCH, num_workers=workers,
                                 collate_fn=_collate)  # fmt: skip
        batches = list(loader)
        assert len(loader) == len(batches)
        assert len(stream) == sum(len(b) for b in batches)


def test_loader_and_stream_must_agree_on_batch_size_and_workers():
    stream = ShardedStream(list(range(N)), batch_size=BATCH, num_workers=2)
    with pytest.raises(
        ValueError, match="num_workers=0 but the ShardedStream was built with num_workers=2"
    ):
        StreamingLoader(stream, batch_size=BATCH, num_workers=0)
    with pytest.raises(ValueError, match="batch_size=4 but"):
        StreamingLoader(stream, batch_size=4, num_workers=2)


def test_new_order_each_epoch_and_reproducible():
    def order(epoch):
        return [i for rank in range(RANKS) for b in _epoch(rank, epoch, False) for i in b]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1)) == list(range(N))


def test_persistent_workers_see_the_new_epoch():
    stream = ShardedStream(list(range(N)), shuffle=True, seed=1, rank=0, world_size=1,
                           batch_size=BATCH, num_workers=2)  # fmt: skip
    loader = StreamingLoader(stream, batch_size=BATCH, num_workers=2, collate_fn=_collate,
                             persistent_workers=True)  # fmt: skip
    epochs = [[i for b in loader for i in b] for _ in range(3)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream.epoch == 2


def test_datamodule_streams_from_init_args(tmp_path):
    rows = []
    for i in range(7):
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(centre_vox=(3 + i, 6, 5)), np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "split": "val" if i == 6 else "train"})
    manifest = write_manifest(tmp_path, rows)
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=2, num_workers=2, streaming=True,
                         drop_last=False)  # fmt: skip
    dm.setup("fit")
    assert dm._cache is None  # streaming holds nothing in RAM
    batches = list(dm.train_dataloader())
    ids = [s for b in batches for s in b["scan_id"]]
    assert sorted(ids) == [f"s{i}" for i in range(6)]
    assert all(
        b["image"].shape[1:] == (1, 8, 8, 8) and b["image"].dtype == torch.float32 for b in batches
    )
