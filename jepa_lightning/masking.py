"""JEPA masks: 3-D multi-block image targets, EHR token targets, modality drop.

Everything here is a pure function of a ``torch.Generator`` and sizes, and runs inside the
DataLoader workers (via :class:`JEPAMaskCollator`), never on the training step.

Two properties the reference JEPA code gets wrong and these functions keep (tests check):

* block placement bounds include the last patch on every axis (``randint(0, g - b + 1)``);
* the context is equalised across a batch by *random subsampling* of each sample's
  complement, never by truncating a raster-ordered index list (which starves the last
  slices/rows of context).

Note on uniformity: with blocks placed wholly inside the grid, central positions are
covered by more placements than border ones, so the *marginal* probability of being
context is higher at the borders, symmetrically. What equalisation must not add is any
further positional bias: given a sample's complement, every member is equally likely to
be kept. Both properties are tested.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

Size3 = tuple[int, int, int]
JEPA_MODES = ("joint", "image_to_ehr", "ehr_to_image")


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=generator).item()


def sample_block_shape(
    grid: Size3,
    scale: tuple[float, float],
    aspect: tuple[float, float],
    z_scale: tuple[float, float],
    generator: torch.Generator,
) -> Size3:
    """Block extent ``(bd, bh, bw)`` in patches covering about ``scale`` of the grid.

    ``aspect`` is the in-plane h/w ratio; ``z_scale`` stretches the block along z
    independently, since CT slices are often thicker than in-plane pixels.
    """
    n_target = _uniform(*scale, generator) * math.prod(grid)
    a = _uniform(*aspect, generator)
    zs = _uniform(*z_scale, generator)
    side = (n_target / zs) ** (1 / 3)
    extent = (side * zs, side * math.sqrt(a), side / math.sqrt(a))
    return tuple(max(1, min(g, round(e))) for g, e in zip(grid, extent, strict=True))  # type: ignore[return-value]


def block_indices(grid: Size3, shape: Size3, generator: torch.Generator) -> torch.Tensor:
    """Raster indices of one block of ``shape`` placed uniformly inside ``grid``.

    Starts are drawn from ``[0, g - b]`` inclusive, so the last patch on each axis can be
    covered.
    """
    starts = [
        int(torch.randint(0, g - b + 1, (1,), generator=generator))
        for g, b in zip(grid, shape, strict=True)
    ]
    z, y, x = (torch.arange(s, s + b) for s, b in zip(starts, shape, strict=True))
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return (zz * grid[1] * grid[2] + yy * grid[2] + xx).reshape(-1)


def random_subset(index: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` members of ``index`` chosen uniformly without replacement, sorted."""
    if k > index.numel():
        raise ValueError(f"cannot keep {k} of {index.numel()} indices")
    pick = torch.randperm(index.numel(), generator=generator)[:k]
    return index[pick].sort().values


def multiblock_masks(
    batch_size: int,
    grid: Size3,
    generator: torch.Generator,
    n_blocks: int = 4,
    scale: tuple[float, float] = (0.15, 0.2),
    aspect: tuple[float, float] = (0.75, 1.5),
    z_scale: tuple[float, float] = (0.75, 1.5),
    min_context: int = 4,
    max_tries: int = 20,
    lesion: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image target and context indices for a batch.

    Returns ``targets [B, n_blocks * block_size]`` (blocks concatenated; one block shape per
    batch so lengths agree) and ``context [B, K]``: a uniform random subset, of the size of
    the smallest complement in the batch, of the complement of the union of target blocks.
    Target and context are disjoint by construction.

    ``lesion`` (raster indices of the patches that hold the lesion) makes the masks
    lesion-aware: the target blocks cover part of the lesion and leave part of it uncovered
    (block sets are redrawn until they do, up to ``max_tries`` times per sample), and the
    context keeps every uncovered lesion patch before it is filled up at random. Why: with
    uniform blocks the lesion is a target in few samples and, in a third of them on LIDC,
    absent from the context, so the objective is mostly about the label-independent
    background.
    """
    n = math.prod(grid)
    shape = sample_block_shape(grid, scale, aspect, z_scale, generator)
    in_lesion = torch.zeros(n, dtype=torch.bool)
    if lesion is not None:
        in_lesion[lesion] = True
    targets, complements = [], []
    for _ in range(batch_size):
        fallback = None
        for _try in range(max_tries):
            blocks = torch.cat([block_indices(grid, shape, generator) for _ in range(n_blocks)])
            covered = torch.zeros(n, dtype=torch.bool)
            covered[blocks] = True
            complement = (~covered).nonzero().squeeze(1)
            if complement.numel() < min_context:
                continue
            fallback = fallback or (blocks, complement)
            if lesion is None or ((covered & in_lesion).any() and (in_lesion & ~covered).any()):
                break
        else:
            if fallback is None:
                raise ValueError(
                    f"{n_blocks} target blocks of {shape} leave fewer than {min_context} "
                    f"context patches on a {grid} grid: lower n_blocks or block scale"
                )
            blocks, complement = fallback  # no lesion-aware draw: an ordinary one
        targets.append(blocks)
        complements.append(complement)
    k = min(c.numel() for c in complements)
    context = torch.stack([_context_subset(c, k, in_lesion, generator) for c in complements])
    return torch.stack(targets), context


def _context_subset(
    complement: torch.Tensor, k: int, keep_first: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``k`` members of ``complement``: those where ``keep_first`` is set (at random when
    they are more than ``k``), filled up uniformly at random from the rest; sorted."""
    first = complement[keep_first[complement]]
    if first.numel() >= k:
        return random_subset(first, k, generator)
    rest = random_subset(complement[~keep_first[complement]], k - first.numel(), generator)
    return torch.cat([first, rest]).sort().values


def ehr_token_masks(
    batch_size: int,
    n_features: int,
    generator: torch.Generator,
    ratio: tuple[float, float] = (0.3, 0.6),
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EHR ``(targets [B, Te], context [B, F - Te])``: a random disjoint split per sample, one
    target count per batch.

    ``group_size`` > 1 splits consecutive groups of that many features (e.g. the four
    readers' ratings of one attribute) instead of single features, so a masked value cannot
    be read off its group's other members in the context."""
    if group_size < 1 or n_features % group_size:
        raise ValueError(
            f"the EHR group size ({group_size}) must divide the number of EHR features "
            f"({n_features})"
        )
    n_groups = n_features // group_size
    n_tgt = max(1, min(n_groups - 1, round(_uniform(*ratio, generator) * n_groups)))
    perms = torch.stack([torch.randperm(n_groups, generator=generator) for _ in range(batch_size)])
    members = torch.arange(group_size)

    def expand(groups: torch.Tensor) -> torch.Tensor:
        index = groups.sort(1).values.unsqueeze(-1) * group_size + members
        return index.reshape(batch_size, -1)

    return expand(perms[:, :n_tgt]), expand(perms[:, n_tgt:])


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


@dataclass
class JEPAMaskCollator:
    """Adds JEPA mask indices to a collated batch; picklable, so it runs in loader workers.

    Per batch one mode is drawn: ``joint`` (image blocks and EHR tokens are targets, the
    rest is context), ``image_to_ehr`` (EHR dropped from the context: the image context
    predicts every EHR token and the image blocks) or ``ehr_to_image`` (image dropped: the
    full EHR predicts the image blocks). Adds ``ctx_image_idx``, ``ctx_ehr_idx``,
    ``tgt_image_idx``, ``tgt_ehr_idx`` (long, ``[B, K]``, possibly ``K = 0``) and ``jepa_mode``.

    ``lesion`` (patch indices) makes the image masks lesion-aware (:func:`multiblock_masks`).

    The random stream is seeded from the process's torch seed (distinct per loader worker)
    and the distributed rank, so ranks and workers never draw identical masks.
    """

    grid: Size3
    n_ehr_features: int
    n_blocks: int = 4
    block_scale: tuple[float, float] = (0.15, 0.2)
    block_aspect: tuple[float, float] = (0.75, 1.5)
    block_z_scale: tuple[float, float] = (0.75, 1.5)
    ehr_mask_ratio: tuple[float, float] = (0.3, 0.6)
    ehr_mask_group_size: int = 1
    p_image_only: float = 0.2
    p_ehr_only: float = 0.2
    min_context: int = 4
    use_ehr: bool = True
    lesion: tuple[int, ...] | None = None  # patch indices of the lesion: lesion-aware masks
    rank: int | None = None  # global rank; read from the environment when not given

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)  # type: ignore[assignment]
        if self.p_image_only + self.p_ehr_only > 1:
            raise ValueError("p_image_only + p_ehr_only must not exceed 1")
        self._generator: torch.Generator | None = None
        self._seeded_for: int | None = None

    def __getstate__(self) -> dict:
        # A generator is per process: workers (spawned or forked) re-seed their own.
        state = self.__dict__.copy()
        state["_generator"], state["_seeded_for"] = None, None
        return state

    def generator(self) -> torch.Generator:
        rank = self.rank if self.rank is not None else _distributed_rank()
        seed = (torch.initial_seed() + 1_000_003 * rank) % (2**63)
        if self._generator is None or self._seeded_for != seed:
            self._generator = torch.Generator().manual_seed(seed)
            self._seeded_for = seed
        return self._generator

    def state_dict(self) -> dict:
        """The mask stream's position, so a resumed run (``--ckpt_path``) draws the masks the
        uninterrupted run would have drawn. Only meaningful when masks are made in the main
        process (``num_workers=0``); loader workers keep their own streams."""
        g = self.generator()
        rank = self.rank if self.rank is not None else _distributed_rank()
        return {"rank": rank, "seed": self._seeded_for, "generator": g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        rank = self.rank if self.rank is not None else _distributed_rank()
        if state.get("rank") not in (None, rank):
            return  # another rank's stream (only rank 0's state is saved): keep ours distinct
        self._generator = torch.Generator()
        self._generator.set_state(state["generator"])
        self._seeded_for = state["seed"]

    def draw_mode(self, g: torch.Generator) -> str:
        if not self.use_ehr:
            return "joint"
        u = torch.rand(1, generator=g).item()
        if u < self.p_image_only:
            return "image_to_ehr"
        if u < self.p_image_only + self.p_ehr_only:
            return "ehr_to_image"
        return "joint"

    def masks(self, batch_size: int) -> dict[str, torch.Tensor | str]:
        g = self.generator()
        mode = self.draw_mode(g)
        tgt_img, ctx_img = multiblock_masks(
            batch_size, self.grid, g, self.n_blocks, self.block_scale, self.block_aspect,
            self.block_z_scale, self.min_context,
            lesion=None if self.lesion is None else torch.tensor(self.lesion, dtype=torch.long),
        )  # fmt: skip
        empty = torch.zeros(batch_size, 0, dtype=torch.long)
        all_ehr = torch.arange(self.n_ehr_features).expand(batch_size, -1).clone()
        if not self.use_ehr:
            tgt_ehr, ctx_ehr = empty, empty
        elif mode == "joint":
            tgt_ehr, ctx_ehr = ehr_token_masks(
                batch_size, self.n_ehr_features, g, self.ehr_mask_ratio, self.ehr_mask_group_size
            )
        elif mode == "image_to_ehr":
            tgt_ehr, ctx_ehr = all_ehr, empty
        else:  # ehr_to_image
            tgt_ehr, ctx_ehr, ctx_img = empty, all_ehr, empty
        return {
            "ctx_image_idx": ctx_img,
            "ctx_ehr_idx": ctx_ehr,
            "tgt_image_idx": tgt_img,
            "tgt_ehr_idx": tgt_ehr,
            "jepa_mode": mode,
        }

    def __call__(self, batch: dict) -> dict:
        batch.update(self.masks(len(batch["image"])))
        return batch


class SequenceMaskCollator:
    """JEPA masks for patient-sequence batches (``image [B, S, ...]``): one draw for the
    batch's latest scans, from the wrapped collator's stream (so it resumes the same way).

    ``supports_sequences`` tells the data module it may apply this hook to sequences.
    """

    supports_sequences = True

    def __init__(self, collator: JEPAMaskCollator):
        self.collator = collator

    def __call__(self, batch: dict) -> dict:
        batch.update(self.collator.masks(len(batch["image"])))
        return batch

    def state_dict(self) -> dict:
        return self.collator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.collator.load_state_dict(state)


# --- baselines: MAE / MSN patch dropping ------------------------------------------------------
# These are one argsort / one arange on the device, so the tasks call them in the step
# (as MAE does) rather than in the loader workers.


def step_generator(
    seed: int, rank: int, step: int, batch_idx: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for the random views drawn *on* a training/validation step (MAE, MSN).

    Why not the global RNG: ``seed_everything`` seeds it identically on every DDP rank, so
    masks drawn from it repeat across ranks and the global batch sees ``1 / world_size`` of
    the mask diversity. Keying on (run seed, rank, step, batch) gives every rank its own
    stream and needs no state in checkpoints: a resumed run redraws the same masks.
    """
    key = hash((int(seed), int(rank), int(step), int(batch_idx))) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)


def random_masks(
    batch_size: int,
    n_patches: int,
    n_keep: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random patch dropping: ``(keep [B, n_keep], masked [B, N] bool)``.

    Each sample keeps an independent uniformly random subset of ``n_keep`` patches
    (sorted raster indices); ``masked`` is True where a patch was dropped.
    """
    if not 1 <= n_keep <= n_patches:
        raise ValueError(f"n_keep must be in [1, {n_patches}], got {n_keep}")
    noise = torch.rand(batch_size, n_patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    masked = torch.ones(batch_size, n_patches, dtype=torch.bool, device=noise.device)
    masked.scatter_(1, keep, False)
    return keep, masked


def focal_masks(
    batch_size: int,
    grid: Size3,
    block: Size3,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSN focal views: each sample keeps one contiguous 3-D block of ``block`` patches,
    placed uniformly (the last patch on every axis reachable). ``keep [B, prod(block)]``."""
    if any(b < 1 or b > g for b, g in zip(block, grid, strict=True)):
        raise ValueError(f"focal block {tuple(block)} does not fit the patch grid {tuple(grid)}")
    starts = [
        torch.randint(0, g - b + 1, (batch_size, 1, 1, 1), device=device, generator=generator)
        for g, b in zip(grid, block, strict=True)
    ]
    offsets = torch.meshgrid(*(torch.arange(b, device=device) for b in block), indexing="ij")
    z, y, x = (s + o for s, o in zip(starts, offsets, strict=True))
    return (z * grid[1] * grid[2] + y * grid[2] + x).reshape(batch_size, math.prod(block))
