"""Label masking: which tokens of a padded batch the LM is trained on (AF1 semantics, vectorised).

AF1 built labels with a per-token Python loop over the padded batch. The rules it implemented:

1. pad tokens, the first two positions (the text's bos and the tokenizer's bos) and every
   ``<audio>`` token become -100 *before* anything else;
2. walking left to right with a "masking" switch that starts on: a token is kept iff the switch is
   off or the token is eos (eos is kept everywhere, even inside prompts); after deciding, a SEP turns
   the switch off and an end-of-chunk turns it on again. The switch looks at the values from step 1,
   so a SEP that sits at position 0/1 (already -100) opens nothing;
3. if the last column of the row is not -100/eos/pad/eoc (the answer was cut by truncation), the
   unfinished answer is erased back to the nearest -100/eos/eoc.

Here the switch state is "the last SEP-or-EOC strictly before this position was a SEP", which a
running maximum over event positions gives without any Python loop; step 3 is a reversed search.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch

from megaflamingo.tokens import IGNORE_INDEX, SpecialTokens


def build_labels(input_ids: torch.Tensor, token_ids: Union[SpecialTokens, Mapping[str, int]]) -> torch.LongTensor:
    """Labels for ``input_ids`` [B, T] (or [T]) under AF1's rules; returns a new LongTensor.
    ``token_ids``: a SpecialTokens, or a plain dict with at least media, eoc, sep, pad, eos."""
    if input_ids.dim() == 1:
        return build_labels(input_ids.unsqueeze(0), token_ids)[0]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if isinstance(token_ids, SpecialTokens):
        token_ids = token_ids.as_dict()
    for key in ("media", "eoc", "sep", "pad", "eos"):
        if key not in token_ids or token_ids[key] is None:
            raise ValueError(f"token_ids lacks {key!r} (needs media, eoc, sep, pad, eos)")
    pad, media, sep = int(token_ids["pad"]), int(token_ids["media"]), int(token_ids["sep"])
    eoc, eos = int(token_ids["eoc"]), int(token_ids["eos"])

    ids = input_ids.long()
    B, T = ids.shape
    # Step 1 (order matters only for equality checks, all three write the same value).
    pre = ids.clone()
    pre[ids == pad] = IGNORE_INDEX
    pre[:, :2] = IGNORE_INDEX
    pre[pre == media] = IGNORE_INDEX

    # Step 2: the switch before position j is "off" iff the latest SEP/EOC event at a position < j
    # is a SEP (AF1 tests SEP first, so a token equal to both counts as SEP).
    is_sep = pre == sep
    is_event = is_sep | (pre == eoc)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    last_event = torch.where(is_event, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    # shift right by one: events strictly before j
    before = torch.cat([torch.full_like(last_event[:, :1], -1), last_event[:, :-1]], dim=1)
    open_ = is_sep.gather(1, before.clamp(min=0)) & (before >= 0)
    keep = open_ | (pre == eos)
    labels = torch.where(keep, pre, torch.full_like(pre, IGNORE_INDEX))

    # Step 3: erase a truncated final answer (AF1 inspects the last column of the padded batch).
    if T > 0:
        last = labels[:, -1]
        cut = ~((last == IGNORE_INDEX) | (last == eos) | (last == pad) | (last == eoc))
        if bool(cut.any()):
            stop_tok = (labels == IGNORE_INDEX) | (labels == eos) | (labels == eoc)
            stop = torch.where(stop_tok, pos, torch.full_like(pos, -1)).max(dim=1).values
            erase = cut.unsqueeze(1) & (pos > stop.unsqueeze(1))
            labels = labels.masked_fill(erase, IGNORE_INDEX)
    return labels
