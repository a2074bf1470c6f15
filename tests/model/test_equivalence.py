"""Our vectorised model vs the slow AF1 reference (tests/model/reference.py)."""
import pytest
import torch

from megaflamingo.model import apply_freeze_policy, media_visibility

from tests.model import model_af1_reference as ref


def test_mask_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (8, 20), generator=g)  # id 5 = <audio>, ~1/6 of the tokens
    am = torch.rand(8, 16, generator=g) > 0.5
    am[1] = False  # every row of sample 1 is fully masked
    mask, has_any = media_visibility(torch.cumsum((ids == 5).long(), 1), am, 4)
    want = ref.few_shot_mask(ids, am, 4, 5)
    assert torch.equal(has_any, want.any(-1))
    assert not has_any[1].any()
    # rows with a visible slot: exactly the reference; fully masked rows: unmasked (q is zeroed instead)
    assert torch.equal(mask[:, 0][has_any], want[has_any])
    assert mask[:, 0][~has_any].all()


@pytest.mark.parametrize("arch,every_n,layers", [("opt", 1, 2), ("llama", 1, 2), ("qwen2", 1, 2), ("opt", 2, 4)])
def test_logits_loss_grads_match_reference(make_model, make_batch, arch, every_n, layers):
    model = make_model(arch, every_n=every_n, num_layers=layers)
    apply_freeze_policy(model, "pretrain")
    b = make_batch()
    mask = ref.few_shot_mask(b["input_ids"], b["audio_mask"], model.windows_per_audio, model.media_token_id)
    assert not mask.any(-1).all(), "batch should contain AF1's fully-masked rows"

    out = model(**b)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    want = ref.forward(model, **b)
    want.loss.backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert (out.logits - want.logits).abs().max() <= 1e-4
    assert abs(out.loss.item() - want.loss.item()) <= 1e-5
    assert set(ours) == set(theirs) and any("audio_transformer" in n for n in ours)
    n_xattn = sum(1 for n in ours if "gated_cross_attn_layer" in n)
    assert n_xattn == 11 * (layers // every_n)
    for n in ours:
        scale = theirs[n].abs().max().clamp(min=1e-3)
        assert (ours[n] - theirs[n]).abs().max() / scale <= 1e-4, n
    # not vacuous: the audio reaches the logits ...
    with torch.no_grad():
        noisy = model(**dict(b, audio_embeds=b["audio_embeds"] + torch.randn_like(b["audio_embeds"]))).logits
        assert (noisy - out.logits).abs().amax(-1).min() > 1e-4
        # ... and the visible range is per token: hiding audio 2 of row 2 (its 3rd <audio> is at t=10)
        # changes only tokens t >= 10 of that row
        am = b["audio_mask"].clone()
        am[2, 2 * model.windows_per_audio:] = True
        base = model(**dict(b, audio_mask=am)).logits
        am[2, 2 * model.windows_per_audio:] = False
        diff = (model(**dict(b, audio_mask=am)).logits - base).abs().amax(-1)
    assert diff[2, :10].max() == 0 and diff[2, 10:].min() > 1e-4
    assert diff[:2].max() == 0


def test_activation_checkpointing_same_loss_and_grads(make_model, make_batch):
    model = make_model("llama").train()
    apply_freeze_policy(model, "sft")
    b = make_batch()

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    h = model.flamingo_layers[0].decoder_layer.register_forward_pre_hook(lambda *a: calls.append(1))
    loss0, g0 = run()
    n_plain = len(calls)
    model.gradient_checkpointing_enable()
    calls.clear()
    loss1, g1 = run()
    h.remove()
    assert len(calls) == 2 * n_plain, "checkpointed layer should be recomputed once in backward"
    assert torch.equal(loss0, loss1)
    assert set(g0) == set(g1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n
    model.gradient_checkpointing_disable()
    # enabled through HF on the LM, even asking for reentrant checkpointing: the audio path keeps its grads
    model.lang_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    loss2, g2 = run()
    assert torch.equal(loss0, loss2) and set(g0) == set(g2)
    for n in g0:
        assert torch.allclose(g0[n], g2[n], atol=1e-6, rtol=1e-5), n
