"""The fused cross-attention layout (megaflamingo.model.segments + attention_kernels) against today's
SDPA-dense block (media_visibility mask), on random batches: text before the first <audio>, invalid
windows (also non-prefix patterns), AF1's fully-masked uniform rows, padding, several samples per row."""
import pytest
import torch

from megaflamingo.model.attention_kernels import segment_cross_attention
from megaflamingo.model.segments import LayoutError, build_layout, layout_for_padded_batch
from megaflamingo.model.xattn import GatedCrossAttentionBlock, MediaContext, media_visibility

MEDIA, W = 7, 4
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _random_batch(g, B, T, shots, p_media=0.15, p_valid=0.6, prefix_valid=False):
    L = W * shots
    ids = torch.randint(10, 50, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < p_media] = MEDIA
    # at most `shots` <audio> per row
    over = torch.cumsum((ids == MEDIA).long(), 1) > shots
    ids[over & (ids == MEDIA)] = 11
    if prefix_valid:  # what the data pipeline produces: the first n windows of each audio
        n = torch.randint(0, W + 1, (B, shots), generator=g)
        am = (torch.arange(W)[None, None, :] < n[..., None]).reshape(B, L)
    else:
        am = torch.rand(B, L, generator=g) < p_valid
    att = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(0, T // 2, (1,), generator=g))
        if pad:
            att[b, T - pad:] = 0
    return ids, am, att


def _dense_reference(block, x, ids, media, am):
    mask, has_any = media_visibility(torch.cumsum((ids == MEDIA).long(), 1), am, W)
    return block.attn(x, MediaContext(media=media, mask=mask, has_any=has_any))


@pytest.mark.parametrize("backend,prefix_valid", [("dense", False), ("dense", True), ("segments", False),
                                                   ("segments", True), ("flex", False)])
def test_padded_batch_matches_sdpa_dense(backend, prefix_valid):
    g = torch.Generator().manual_seed(3 + prefix_valid)
    B, T, shots, dim, da = 5, 23, 3, 32, 16
    block = GatedCrossAttentionBlock(dim, da, dim_head=8, heads=4)
    ids, am, att = _random_batch(g, B, T, shots, prefix_valid=prefix_valid)
    am[0] = False  # a sample without any valid window: every token of it is a uniform row
    ids[1, :5] = 12  # text before the first <audio>
    ids[1, 5] = MEDIA
    x = torch.randn(B, T, dim, generator=g, requires_grad=True)
    media = torch.randn(B, W * shots, da, generator=g, requires_grad=True)
    ref = _dense_reference(block, x, ids, media, am)
    lay = layout_for_padded_batch(ids, att, am, MEDIA, W, query_chunk=4)
    assert lay.xattn.has_uniform
    real = att.bool()
    if backend == "flex":  # FlexAttention has no backward on CPU: forward only here (GPU suite: both)
        with torch.no_grad():
            got = segment_cross_attention(block.attn, x, media, lay.xattn, am, backend)
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
        return
    got = segment_cross_attention(block.attn, x, media, lay.xattn, am, backend)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (got[~real] == 0).all()
    # gradients to the inputs and the block's weights agree on the real tokens
    w = torch.randn_like(ref) * real[..., None]
    gx_ref, gm_ref, gq_ref = torch.autograd.grad((ref * w).sum(), (x, media, block.attn.to_q.weight))
    gx, gm, gq = torch.autograd.grad((got * w).sum(), (x, media, block.attn.to_q.weight))
    for a, b in ((gx, gx_ref), (gm, gm_ref), (gq, gq_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_segments_follow_af1_visibility_rule():
    """Segment structure on a hand-made row: [bos, t, <a>, t, t, <a>, t] + pad, audio 0 invalid."""
    ids = torch.tensor([[1, 20, MEDIA, 21, 22, MEDIA, 23, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    am = torch.zeros(1, 3 * W, dtype=torch.bool)
    am[0, W:W + 2] = True  # audio 1 has 2 valid windows; audio 0 none
    lay = layout_for_padded_batch(ids, att, am, MEDIA, W)
    xa = lay.xattn
    # tokens 0..4 see audio 0 only -> no valid key (uniform); tokens 5..6 see audio 0+1 -> 2 keys
    assert xa.token_visible.tolist() == [0, 0, 0, 0, 0, 2, 2]
    assert xa.cu_q.tolist() == [0, 5, 7] and xa.cu_k.tolist() == [0, 1, 3]
    assert xa.kv_slots.tolist() == [W, W + 1]
    assert xa.key_index.tolist() == [2, 0, 1]  # the mean row (after the 2 compacted keys), then the prefix
    assert lay.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert lay.seq_cu.tolist() == [0, 7, 9]


def test_packed_rows_equal_samples_alone():
    """Several samples per row: each token's output equals its sample run alone through the dense block."""
    g = torch.Generator().manual_seed(5)
    dim, da, shots = 24, 12, 4
    block = GatedCrossAttentionBlock(dim, da, dim_head=6, heads=4)
    lens = [5, 9, 3, 12, 1, 7]
    rows = [[0, 1, 2], [3, 4], [5]]
    T = 18
    samples = []
    for n in lens:
        ids = torch.randint(10, 50, (1, n), generator=g)
        ids[torch.rand(1, n, generator=g) < 0.25] = MEDIA
        over = torch.cumsum((ids == MEDIA).long(), 1) > shots
        ids[over & (ids == MEDIA)] = 11
        am = torch.rand(1, W * shots, generator=g) < 0.5
        samples.append((ids, am, torch.randn(1, n, dim, generator=g), torch.randn(1, W * shots, da, generator=g)))
    R = len(rows)
    ids = torch.zeros(R, T, dtype=torch.long)
    sidx = torch.full((R, T), -1)
    x = torch.zeros(R, T, dim)
    s = 0
    for r, members in enumerate(rows):
        t = 0
        for m in members:
            n = lens[m]
            ids[r, t:t + n] = samples[m][0][0]
            x[r, t:t + n] = samples[m][2][0]
            sidx[r, t:t + n] = s
            s += 1
            t += n
    order = [m for members in rows for m in members]
    am = torch.cat([samples[m][1] for m in order])
    media = torch.cat([samples[m][3] for m in order])
    lay = build_layout(ids, sidx, am, MEDIA, W, query_chunk=5)
    for backend in ("dense", "segments", "flex"):
        with torch.no_grad():
            got = segment_cross_attention(block.attn, x, media, lay.xattn, am, backend)
        for k, m in enumerate(order):
            r, a, n = int(lay.sample_row[k]), int(lay.sample_start[k]), int(lay.sample_length[k])
            with torch.no_grad():
                ref = _dense_reference(block, samples[m][2], samples[m][0], samples[m][3], samples[m][1])
            torch.testing.assert_close(got[r, a:a + n], ref[0], atol=1e-5, rtol=1e-5, msg=f"{backend} sample {m}")


def test_layout_errors_name_the_problem():
    ids = torch.tensor([[MEDIA, 3, MEDIA, 4]])
    am = torch.ones(2, 2 * W, dtype=torch.bool)
    with pytest.raises(LayoutError, match="row-major order"):
        build_layout(ids, torch.tensor([[1, 1, 0, 0]]), am, MEDIA, W)
    with pytest.raises(LayoutError, match="row-major order"):  # sample 0 split in two runs
        build_layout(ids, torch.tensor([[0, 1, 0, -1]]), am, MEDIA, W)
    with pytest.raises(LayoutError, match="<audio> tokens but only 1 audio slots"):
        build_layout(ids, torch.tensor([[0, 0, 0, 0]]), am[:1, :W], MEDIA, W)
    with pytest.raises(LayoutError, match="not a multiple"):
        build_layout(ids, torch.tensor([[0, 0, 0, 0]]), am[:1, :W + 1], MEDIA, W)
