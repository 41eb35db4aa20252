"""Shuffled mini-batches served straight from an in-memory uint8 tensor.

A small image dataset (MNIST is 47 MB, CIFAR-10 150 MB as uint8) fits in host or accelerator memory whole;
indexing it there replaces per-sample decoding, collation and host→device copies, so the data pipeline never
waits on Python. The iterable shards itself across DDP ranks and keeps a checkpointable position, so a resumed
run continues from the exact batch it stopped at.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class InMemoryBatches:
    """Batches of (uint8 images, labels or None) from tensors held in memory.

    Every epoch draws a fresh permutation from ``seed + epoch``; rank r of w takes every w-th index of it
    (after trimming to a multiple of w, so all ranks see the same number of batches).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._batches_done = 0  # within the current epoch, for exact resumption

    def _indices(self) -> torch.Tensor:
        count = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(count)
        per_rank = count // self.world_size if self.shuffle else -(-count // self.world_size)
        shard = order[self.rank :: self.world_size][:per_rank]
        return shard.to(self.images.device)

    def __len__(self) -> int:
        count = self.images.shape[0]
        per_rank = count // self.world_size if self.shuffle else -(-count // self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        indices = self._indices()
        for batch in range(self._batches_done, len(self)):
            chosen = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            # Lightning fetches a sized iterable's batches one at a time (no look-ahead), so when it saves a
            # checkpoint after a step the batches handed out are exactly the batches trained on.
            self._batches_done = batch + 1
            yield self.images[chosen], (self.labels[chosen] if self.labels is not None else None)
        self._batches_done = 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])


def images_in_batch(batch: tuple[torch.Tensor, Any]) -> int:
    """How many images a (images, labels) batch holds: Lightning's ThroughputMonitor counts with it."""
    return int(batch[0].shape[0])
