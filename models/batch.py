"""The encoded batch: what :class:`~models.encoding.FeatureEncoder` produces and every model consumes.

An encoded batch is a ``dict[str, Tensor]``:

- every sparse feature ``name``: int64 [B] (0 = padding, 1 = out of vocabulary, 2.. = vocabulary),
- every sequence feature ``name``: int64 [B, L], left-aligned, oldest first, most recent last, padded
  with 0; ``name + "__length"``: int64 [B] (the number of valid positions),
- ``"dense"``: float32 [B, D], the dense features in declaration order, standardised,
- ``"label"``: float32 [B] when the frame has a label column,
- ``"group"``: int64 [B] (the user id, for GAUC) when the frame has the group column.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PAD_ID = 0


OOV_ID = 1


FIRST_ID = 2  # the first vocabulary row


# The data contract's default for a string feature with no value; always encoded as OOV, never learned
# as a category of its own.
MISSING_CATEGORY = ""


LENGTH_SUFFIX = "__length"


DENSE_KEY = "dense"


LABEL_KEY = "label"


GROUP_KEY = "group"


Batch = dict[str, torch.Tensor]


def sequence_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """[B, L] True at the valid (left-aligned) positions of each row."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])
