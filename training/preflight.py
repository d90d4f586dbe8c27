"""What train_ddpm.py checks of the file system and the machine before any long work starts.

Each check raises `ArgumentError` with one line that names the flag, the fault and what to do; none writes anything.
- `check_output_paths`: the folders the run writes (`--output_dir`, which holds the checkpoints, `--logging_dir` and
  `--cache_dir`) can be folders (no file in the way) that this process can write
  (`hub_access.disk_space.output_folder_problem`, which evaluate_ddpm.py also asks), and `--output_dir` does not lie
  inside the training images (the next run would read its samples and checkpoints as images).
- `check_step_memory`: one training step of `--train_batch_size` images at `--resolution` can fit the device at all
  (a lower bound: one feature map of the net's first layer), before the data cache is built at that resolution.
"""

from __future__ import annotations

import os

import psutil
import torch

from hub_access.disk_space import format_bytes, output_folder_problem
from hub_access.secrets import is_local_path
from training.args import ArgumentError, TrainingArguments


def written_folders(args: TrainingArguments) -> list[tuple[str, str]]:
    """(flag, folder) of every folder the run writes: the output folder (checkpoints, samples, exports), the
    tracker's logs and, when given, the datasets cache."""
    folders = [("--output_dir", args.output_dir), ("--logging_dir", os.path.join(args.output_dir, args.logging_dir))]
    if args.cache_dir is not None:
        folders.append(("--cache_dir", args.cache_dir))
    return folders


def lies_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it, links followed."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_paths(args: TrainingArguments) -> None:
    """
    Raises:
        `ArgumentError`: a file where `--output_dir`, `--logging_dir` or `--cache_dir` must be a folder, one of them
            this process cannot write, or an `--output_dir` inside the folder of training images (`--train_data_dir`,
            or a local `--dataset_name`).
    """
    for flag, path in written_folders(args):
        problem = output_folder_problem(flag, path)
        if problem is not None:
            raise ArgumentError(problem)
    data = [("--train_data_dir", args.train_data_dir)]
    if args.dataset_name is not None and is_local_path(args.dataset_name):
        data.append(("--dataset_name", args.dataset_name))
    for flag, folder in data:
        if folder is not None and os.path.isdir(folder) and lies_inside(args.output_dir, folder):
            raise ArgumentError(
                f"--output_dir '{args.output_dir}' lies inside the training images ({flag} '{folder}'): the sample "
                "grids, checkpoints and export written there would be read as training images by the next run on "
                "that folder. Pass an --output_dir outside it."
            )


def device_memory(device: torch.device) -> int:
    """The total memory of `device` in bytes: a GPU's own, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def check_step_memory(args: TrainingArguments, block_out_channels: tuple[int, ...], device: torch.device) -> None:
    """
    Refuses a step that cannot fit `device` at all: the output of the net's first convolution for one batch
    (`--train_batch_size` x `block_out_channels[0]` x `--resolution`^2, in the step's float size) is a lower bound
    of what the step holds at once, so a refused run would certainly have run out of memory, after the data cache
    was built at that resolution (hours for a large dataset).

    Raises:
        `ArgumentError`: the bound exceeds the device's memory; the message gives both and what to lower.
    """
    element = 2 if args.mixed_precision in ("fp16", "bf16") else 4
    channels = block_out_channels[0]
    needed = args.train_batch_size * channels * args.resolution**2 * element
    available = device_memory(device)
    if needed > available:
        raise ArgumentError(
            f"--resolution {args.resolution} with --train_batch_size {args.train_batch_size}: one feature map of the "
            f"net's first layer ({args.train_batch_size} x {channels} x {args.resolution}x{args.resolution} values of "
            f"{element} bytes) alone takes {format_bytes(needed)}, more than the {format_bytes(available)} of "
            f"{device.type}, and a step holds many. Lower --resolution or --train_batch_size."
        )
