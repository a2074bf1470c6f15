"""The segment description shared by sequence packing and the fused cross-attention layout.

A batch is ``R`` rows of ``T`` token positions holding ``S`` samples; every sample occupies one contiguous
run of one row (an unpacked, right- or left-padded batch is the special case "one sample per row"), and
``sample_index [R, T]`` says which (``-1`` = padding). Sample ``s`` brings its own ``L`` window slots
(``audio_embeds [S, L, D]``, ``audio_mask [S, L]``): audio k of the sample owns slots ``[W k, W k + W)``.

Two kinds of segment come out of that one description (:func:`build_layout`):

* **sequence segments** over the flattened ``R * T`` stream: each sample, and each run of padding, is one
  segment. The LM's self-attention is causal inside a segment and blind across segments (``cu_seqlens``
  for varlen kernels, or the block-causal mask of :func:`block_causal_mask`); positions restart at 0 in
  every segment, so OPT's learned positions and RoPE see each sample exactly as if it were alone.
* **cross-attention segments.** AF1's rule: a text token that has seen ``n`` ``<audio>`` tokens of its
  sample (itself included) attends to the sample's valid slots among ``[0, W max(n, 1))``. Compacting
  the valid slots of each sample in slot order turns that set into a *prefix* of length
  ``c = #valid slots < W max(n, 1)`` of the sample's compacted keys, whatever the validity pattern. ``c``
  only grows along a sample, so the tokens of a sample split into runs of equal ``c``: each run is one
  varlen segment whose keys are that prefix (duplicated per segment; at most L <= 128 keys, so the
  copies are tiny). Padding tokens take no part. A token with ``c = 0`` (its visible audios have no
  valid window) is AF1's fully-masked row, which AF1's ``-finfo.max`` fill turns into a uniform average
  over ALL L slots of the sample: it gets a single key whose value is the projection of the sample's
  mean slot (the projection is linear, so this is that average exactly, up to rounding).

Segments may be cut into query chunks of at most ``query_chunk`` tokens (queries are independent, so
any split is exact): the pure-torch implementation pads segments to a common length and chunking
bounds that waste. Build the layout on the host (the collator does, in the data-loader workers): it
reads a few sizes (``max_q``, ``max_k``) that a device-side build would have to synchronise for.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


class LayoutError(ValueError):
    """The batch does not describe a valid packed/unpacked layout (names the field)."""


@dataclass
class CrossAttentionSegments:
    """The fused cross-attention layout of one batch (see module docstring). All index tensors long."""

    tokens: torch.Tensor  # [Nq] flat indices (into R*T) of the query tokens, in stream order
    kv_slots: torch.Tensor  # [Nv] flat indices (into S*L) of the valid slots, sample-major: compacted keys
    key_index: torch.Tensor  # [Nk] per segment, the rows of [compacted keys; S mean rows] it attends to
    cu_q: torch.Tensor  # [G+1] int32 cumulative query counts per segment
    cu_k: torch.Tensor  # [G+1] int32 cumulative key counts per segment
    max_q: int
    max_k: int
    num_samples: int
    num_slots: int
    has_uniform: bool  # some token sees no valid slot: the S mean rows are appended to the keys
    token_sample: torch.Tensor  # [Nq] sample of each query token
    token_visible: torch.Tensor  # [Nq] c = number of compacted keys the token sees (0 = uniform row)
    sample_key_offset: torch.Tensor  # [S] first compacted key of each sample

    @property
    def num_segments(self) -> int:
        return self.cu_q.numel() - 1

    def to(self, device, non_blocking: bool = False) -> "CrossAttentionSegments":
        return _to(self, device, non_blocking)

    def pin_memory(self) -> "CrossAttentionSegments":
        return _pin(self)


@dataclass
class PackedLayout:
    """Everything the model needs to run a (packed or padded) batch sample by sample."""

    rows: int
    seq_len: int
    num_samples: int
    sample_index: torch.Tensor  # [R, T] long, -1 = padding
    position_ids: torch.Tensor  # [R, T] long, restarting at 0 in every sequence segment
    seq_cu: torch.Tensor  # [N+1] int32 cumulative lengths of the sequence segments of the flat stream
    seq_max: int
    segment_id: torch.Tensor  # [R, T] long, sequence segment of each position (row-local order)
    sample_row: torch.Tensor  # [S]
    sample_start: torch.Tensor  # [S] first position of the sample in its row
    sample_length: torch.Tensor  # [S]
    sample_media: torch.Tensor  # [S] number of <audio> tokens in the sample
    xattn: CrossAttentionSegments

    def to(self, device, non_blocking: bool = False) -> "PackedLayout":
        return _to(self, device, non_blocking)

    def pin_memory(self) -> "PackedLayout":
        """Called by DataLoader(pin_memory=True), so the host-to-GPU copies are asynchronous too."""
        return _pin(self)

    @property
    def is_packed(self) -> bool:
        return self.num_samples != self.rows


def _to(obj, device, non_blocking):
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.to(device, non_blocking=non_blocking)
        elif hasattr(v, "to") and isinstance(v, (CrossAttentionSegments, PackedLayout)):
            changes[f.name] = v.to(device, non_blocking)
    return replace(obj, **changes)


def _pin(obj):
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor) or isinstance(v, (CrossAttentionSegments, PackedLayout)):
            changes[f.name] = v.pin_memory()
    return replace(obj, **changes)


def repeat_counts(values: torch.Tensor, counts: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """``torch.repeat_interleave(values, counts)`` by a sorted search: the same result, and no thread-pool
    start per call (torch's CPU kernel costs ~25 ms a call on a busy multi-threaded host)."""
    ends = torch.cumsum(counts, 0)
    n = (int(ends[-1]) if ends.numel() else 0) if total is None else int(total)
    return values[torch.searchsorted(ends, torch.arange(n, device=ends.device), right=True)]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _runs(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and lengths of the runs of equal consecutive values of a 1-D tensor."""
    if key.numel() == 0:
        z = key.new_zeros(0)
        return z, z
    change = torch.ones_like(key, dtype=torch.bool)
    change[1:] = key[1:] != key[:-1]
    starts = change.nonzero().flatten()
    lengths = torch.diff(starts, append=starts.new_tensor([key.numel()]))
    return starts, lengths


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)


def sample_index_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """One sample per row (an ordinary padded batch): row r's real tokens are sample r."""
    R, T = attention_mask.shape
    rows = torch.arange(R, device=attention_mask.device)[:, None].expand(R, T)
    return torch.where(attention_mask.bool(), rows, torch.full_like(rows, -1))


def build_layout(input_ids: torch.Tensor, sample_index: torch.Tensor, audio_mask: torch.Tensor,
                 media_token_id: int, windows_per_audio: int, query_chunk: Optional[int] = None,
                 check: bool = True) -> PackedLayout:
    """The layout of a batch: ``input_ids``/``sample_index`` [R, T], ``audio_mask`` [S, L] (True = valid
    window). Samples must be numbered 0..S-1 in row-major order of appearance, one contiguous run each.

    ``query_chunk``: cut cross-attention segments into chunks of at most this many queries (bounds the
    padding of the pure-torch implementation; kernels with native varlen support do not need it)."""
    if input_ids.ndim != 2 or sample_index.shape != input_ids.shape:
        raise LayoutError(f"input_ids {tuple(input_ids.shape)} and sample_index {tuple(sample_index.shape)} "
                          "must both be [R, T]")
    if audio_mask.ndim != 2:
        raise LayoutError(f"audio_mask must be [S, L], got {tuple(audio_mask.shape)}")
    R, T = input_ids.shape
    S, L = audio_mask.shape
    W = int(windows_per_audio)
    if L % W:
        raise LayoutError(f"audio_mask has L={L} slots, not a multiple of windows per audio {W}")
    dev = input_ids.device
    ids = input_ids.reshape(-1)
    sid = sample_index.reshape(-1).long()
    real = sid >= 0

    # ---- sequence segments: runs of equal sample index inside a row (padding runs included)
    row_of = torch.arange(R, device=dev)[:, None].expand(R, T).reshape(-1)
    seq_key = row_of * (S + 1) + (sid + 1)
    seq_starts, seq_len = _runs(seq_key)
    seg_of_pos = repeat_counts(torch.arange(seq_starts.numel(), device=dev), seq_len, R * T)
    position = torch.arange(R * T, device=dev) - seq_starts[seg_of_pos]
    seg_sample = sid[seq_starts]
    is_sample_seg = seg_sample >= 0
    samples_in_order = seg_sample[is_sample_seg]
    if check:
        if int(samples_in_order.numel()) != S or not torch.equal(samples_in_order,
                                                                 torch.arange(S, device=dev)):
            raise LayoutError(
                f"sample_index must number the {S} samples of audio_mask 0..{S - 1} in row-major order, each "
                f"one contiguous run inside one row; got the run sequence {samples_in_order.tolist()[:32]}")
    sample_start_flat = seq_starts[is_sample_seg]
    sample_length = seq_len[is_sample_seg]
    sample_row = sample_start_flat // T
    sample_start = sample_start_flat % T
    # row-local segment ids (only equality within a row matters for the block mask)
    segment_id = seg_of_pos.view(R, T)

    # ---- cross-attention
    is_media = (ids == int(media_token_id)) & real
    csum = torch.cumsum(is_media.long(), 0)
    before = (csum - is_media.long())[sample_start_flat]  # media tokens before each sample's start
    sample_media = csum[sample_start_flat + sample_length - 1] - before
    if check and S and bool((sample_media * W > L).any()):
        bad = (sample_media * W > L).nonzero().flatten().tolist()
        raise LayoutError(f"sample(s) {bad} have {sample_media[bad].tolist()} <audio> tokens but only "
                          f"{L // W} audio slots each (L={L}, {W} windows per audio)")
    tokens = real.nonzero().flatten()
    tok_sample = sid[tokens]
    n_seen = csum[tokens] - before[tok_sample]
    end = (W * n_seen.clamp(min=1)).clamp(max=L)
    valid = audio_mask.bool()
    cum_valid = torch.cat([torch.zeros(S, 1, dtype=torch.long, device=valid.device),
                           torch.cumsum(valid.long(), 1)], 1).to(dev)
    visible = cum_valid[tok_sample, end]  # c: a prefix of the sample's compacted keys
    num_valid = cum_valid[:, -1]
    key_offset = _exclusive_cumsum(num_valid)
    kv_slots = valid.reshape(-1).nonzero().flatten().to(dev)
    n_valid_total = int(kv_slots.numel())

    xa_key = tok_sample * (L + 1) + visible
    if tokens.numel():
        # a new segment where (sample, c) changes, or where two query tokens are not adjacent (padding
        # between them never happens inside a sample, but rows end)
        q_starts, q_len = _runs(xa_key)
        if query_chunk:
            pieces = (q_len + query_chunk - 1) // query_chunk
            run_of_piece = repeat_counts(torch.arange(q_len.numel(), device=dev), pieces)
            piece_in_run = torch.arange(run_of_piece.numel(), device=dev) - _exclusive_cumsum(pieces)[run_of_piece]
            q_starts = q_starts[run_of_piece] + piece_in_run * query_chunk
            q_len = torch.minimum(q_len[run_of_piece] - piece_in_run * query_chunk,
                                  torch.full_like(q_starts, query_chunk))
    else:
        q_starts = q_len = tokens.new_zeros(0)
    g_sample = tok_sample[q_starts]
    g_visible = visible[q_starts]
    uniform = g_visible == 0
    k_len = torch.where(uniform, torch.ones_like(g_visible), g_visible)
    k_first = torch.where(uniform, n_valid_total + g_sample, key_offset[g_sample])
    nk = int(k_len.sum())
    g_of_key = repeat_counts(torch.arange(k_len.numel(), device=dev), k_len, nk)
    key_index = torch.arange(nk, device=dev) - _exclusive_cumsum(k_len)[g_of_key] + k_first[g_of_key]
    xattn = CrossAttentionSegments(
        tokens=tokens, kv_slots=kv_slots, key_index=key_index, cu_q=_cu(q_len), cu_k=_cu(k_len),
        max_q=int(q_len.max()) if q_len.numel() else 0, max_k=int(k_len.max()) if k_len.numel() else 0,
        num_samples=S, num_slots=L, has_uniform=bool(uniform.any()), token_sample=tok_sample,
        token_visible=visible, sample_key_offset=key_offset)
    return PackedLayout(
        rows=R, seq_len=T, num_samples=S, sample_index=sid.view(R, T), position_ids=position.view(R, T),
        seq_cu=_cu(seq_len), seq_max=int(seq_len.max()) if seq_len.numel() else 0, segment_id=segment_id,
        sample_row=sample_row, sample_start=sample_start, sample_length=sample_length,
        sample_media=sample_media, xattn=xattn)


def layout_for_padded_batch(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            audio_mask: torch.Tensor, media_token_id: int, windows_per_audio: int,
                            query_chunk: Optional[int] = None) -> PackedLayout:
    """Layout of an ordinary batch (one sample per row, right or left padding): lets unpacked batches use
    the fused cross-attention too."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return build_layout(input_ids, sample_index_from_attention_mask(attention_mask), audio_mask,
                        media_token_id, windows_per_audio, query_chunk)


def block_causal_mask(layout: PackedLayout) -> torch.Tensor:
    """[R, 1, T, T] bool (True = attend): causal inside each sequence segment, nothing across segments.
    Padding runs are segments of their own, so no row is fully masked (no NaN in any kernel)."""
    seg = layout.segment_id
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def unpack_rows(x: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Split a per-position tensor [R, T, ...] into the per-sample pieces [len_s, ...] (sample order)."""
    rows, starts, lens = layout.sample_row.tolist(), layout.sample_start.tolist(), layout.sample_length.tolist()
    return [x[r, a:a + n] for r, a, n in zip(rows, starts, lens)]
