"""`attn_implementation="sdpa_packed"`: SDPA that attends within each packed sequence only.

TRL's padding-free packing puts a whole batch in one row and marks where each chat starts by restarting
`position_ids`. transformers' "sdpa" then attends over the whole row under a block-diagonal mask: (row length)^2
work, nearly all of it masked away (one 2,048-token row of ~150-token chats). On CPU that was a third of a training
step of SmolLM2. Here each sequence runs causal SDPA on its own, sum(length^2 / 2) work, with the same result.
Anything else (a KV cache, a padded batch of several rows) goes to transformers' "sdpa" unchanged, with the mask
transformers builds for "sdpa".

Importing this module registers the name; `adapt/sft.py` does.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_packed"


def sequence_starts(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Where each sequence of a packed one-row batch starts (a position that does not follow its neighbour's, as
    transformers' own packed-sequence detection reads them), or None when the row holds a single sequence."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    positions = position_ids[0]
    starts = ((positions[1:] - positions[:-1]) != 1).nonzero().flatten() + 1
    return [0, *starts.tolist()] if len(starts) else None


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> ([1, T, heads, d], None), as transformers' sdpa."""
    starts = None
    if query.shape[0] == 1 and query.shape[2] == key.shape[2]:  # no cached prefix
        starts = sequence_starts(kwargs.get("position_ids"), query.shape[2])
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = zip(starts, [*starts[1:], query.shape[2]])
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        for start, end in bounds
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
