"""train.loss_head: the liger fused linear + cross-entropy head against the plain head (where liger-kernel
and CUDA exist), and a clear refusal everywhere else."""
import pytest
import torch

from megaflamingo.model.packed import liger_available

from tests.model.test_packing_equivalence import build, make_samples, packed_batch


def _run(model, pb, head, device):
    b = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in pb.items()}
    model.xattn_backend = "auto"
    out = model(b["input_ids"], None, b["audio_embeds"], b["audio_mask"], labels=b["labels"],
                loss_logits="supervised", layout=b["layout"], loss_head=head)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.skipif(not liger_available(), reason="liger-kernel and a CUDA device needed")
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_liger_head_equals_plain_head(arch):
    model = build(arch).cuda().train()
    pb, _ = packed_batch(make_samples(10, seed=5), max_tokens_per_row=128, rows_per_batch=4)
    plain, g_plain = _run(model, pb, "plain", "cuda")
    liger, g_liger = _run(model, pb, "liger", "cuda")
    torch.testing.assert_close(liger.loss_sum, plain.loss_sum, atol=1e-4, rtol=1e-4)
    assert torch.equal(liger.count, plain.count)
    torch.testing.assert_close(liger.loss.detach(), plain.loss.detach(), atol=1e-5, rtol=1e-5)
    assert g_plain.keys() == g_liger.keys()
    for n in g_plain:
        torch.testing.assert_close(g_liger[n], g_plain[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.skipif(liger_available(), reason="checks the refusal where liger cannot run")
def test_liger_head_refused_where_it_cannot_run(monkeypatch, tmp_path):
    model = build("opt")
    pb, _ = packed_batch(make_samples(3, seed=1), max_tokens_per_row=128, rows_per_batch=2)
    with pytest.raises(RuntimeError, match="liger-kernel and a CUDA device"):
        _run(model, pb, "liger", "cpu")

    from megaflamingo.config import load_config
    from megaflamingo.engine.build import check_loss_head
    from megaflamingo.errors import ConfigError

    monkeypatch.setenv("MF_DATA_ROOT", str(tmp_path))
    with pytest.raises(ConfigError, match=r"train\.loss_head: liger needs"):
        check_loss_head(load_config("tiny_cpu", overrides=["train.loss_head=liger"]))
