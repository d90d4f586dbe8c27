"""Where a run stands in the data, in images, and the rest of an epoch on another number of processes.

With accelerate's seedable sampler the order of epoch `e` is one permutation of the training images, a function of
(seed, e) alone. Its batches of `--train_batch_size` go to the processes in turn (batch k to process k mod N), so N
processes that each consumed b batches consumed the first N x b x batch_size images of the permutation. A checkpoint
records that count (`TrainerState.images_in_epoch`). A resume on the same number of processes skips b batches per
process (`accelerator.skip_first_batches`, bit for bit); a resume on M processes skips exactly that many images of
the permutation and splits the rest among its M processes in the same way: `rest_of_epoch`.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler, get_sampler, prepare_data_loader


def epoch_order(dataloader: torch.utils.data.DataLoader, epoch: int) -> list[int]:
    """The indices of the training images in the order of `epoch` (every process gets the same list), as the prepared
    `dataloader`'s seedable sampler draws them."""
    sampler = get_sampler(dataloader)
    if not isinstance(sampler, SeedableRandomSampler):
        raise TypeError(f"the data order needs accelerate's seedable sampler, not {type(sampler).__name__}")
    copy = SeedableRandomSampler(
        data_source=sampler.data_source,
        num_samples=sampler._num_samples,
        generator=torch.Generator(),
        data_seed=sampler.initial_seed,
    )
    copy.set_epoch(epoch)
    return list(copy)


def images_consumed(start: int, batches: int, per_batch: int, epoch_images: int) -> int:
    """Images of the epoch consumed: `start` (before the first batch counted) plus `batches` batches of every process
    (`per_batch` images on all of them together), at most the epoch (its last batches may be short, or padded with
    images of its start)."""
    return min(start + batches * per_batch, epoch_images)


def rest_of_epoch(
    accelerator: Accelerator, dataloader: torch.utils.data.DataLoader, epoch: int, consumed: int, batch_size: int
) -> torch.utils.data.DataLoader | list:
    """
    The batches of `epoch` after its first `consumed` images (of its permutation), for this process: the rest is cut
    into batches of `batch_size` in order and dealt to the processes in turn, as accelerate deals a whole epoch (its
    last batches made even the same way). None of the epoch's images twice, none skipped. An empty list when nothing
    is left. `dataloader` is the run's prepared loader (its dataset, collation and workers are reused).
    """
    remaining = epoch_order(dataloader, epoch)[consumed:]
    if not remaining:
        return []
    loader = torch.utils.data.DataLoader(
        dataloader.dataset,
        batch_size=batch_size,
        sampler=remaining,  # in this order: no shuffle
        collate_fn=dataloader.collate_fn,
        num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory,
    )
    # Not `accelerator.prepare`: this loader is for one epoch and must not join the checkpointed state.
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        even_batches=accelerator.even_batches,
        non_blocking=accelerator.non_blocking,
    )
