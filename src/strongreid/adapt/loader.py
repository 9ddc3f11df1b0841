"""A fixed number of training batches per epoch over the current pseudo-identities."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from strongreid.errors import StrongReIDError

# Passes over the pseudo-identities within one epoch get their own sampler epochs, far enough
# apart that no two (epoch, pass) pairs share one.
_PASSES_PER_EPOCH = 10_000


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(loader, "dataset", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


class PseudoIdentityLoader:
    """`iters` batches per epoch from the P x K loader of the latest clustering.

    As cluster-contrast's fixed iterations per epoch: the epoch's length (and the LR schedule
    built on it) does not depend on how many pseudo-identities a clustering finds; when one pass
    of the P x K sampler is shorter than `iters`, the next pass draws a new order.
    """

    def __init__(self, iters: int) -> None:
        self.iters = int(iters)
        self.loader: Any = None
        self.records: Sequence[Any] = ()
        self.epoch = 0

    def reset(self, loader: Any, records: Sequence[Any], epoch: int) -> None:
        """Train the coming epoch `epoch` on `loader` (built over the pseudo-labelled `records`)."""
        self.loader, self.records, self.epoch = loader, records, int(epoch)

    @property
    def dataset(self) -> Any:
        """The current loader's dataset (None before the first clustering)."""
        return getattr(self.loader, "dataset", None)

    def __len__(self) -> int:
        return self.iters

    def __iter__(self) -> Iterator[Any]:
        if self.loader is None:
            raise StrongReIDError("no pseudo-identities yet: the clustering hook (strongreid.adapt) "
                                  "builds the batches before each epoch")
        produced = 0
        for round_ in range(self.iters):  # at least one batch per pass: never more passes than batches
            _set_epoch(self.loader, self.epoch * _PASSES_PER_EPOCH + round_)
            for batch in self.loader:
                yield batch
                produced += 1
                if produced == self.iters:
                    return
        raise StrongReIDError("the pseudo-identity loader yielded no batch")
