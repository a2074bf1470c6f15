"""Which parameters train in each stage.

Frozen parameters get ``requires_grad=False``, so autograd never computes their weight gradients
(AF1 computed them and discarded them). Policies:

* ``pretrain``      audio transformer + xattn blocks; the LM (embeddings included) frozen. (AF1 pretrain.)
* ``sft``           audio transformer + xattn blocks + the WHOLE LM really trains (AF1 intended this with
                    ``unfreeze_full_lm`` but its FSDP code excluded the decoder blocks from the optimizer).
* ``sft_af1_exact`` what AF1's SFT actually updated: everything except the LM decoder blocks (so
                    embeddings / lm_head / final norm / learned positions train, decoder layers do not).

Embedding option (``embeddings``), applied on top of ``pretrain``/``sft``:
* ``frozen``      leave as the policy says (pretrain: frozen; sft: trainable);
* ``new_tokens``  only the ``<audio>`` and ``<|endofchunk|>`` rows of the input (and untied output)
                  embedding train: the weight gets requires_grad and a gradient hook zeroes every other
                  row. Put such weights in a no-weight-decay group (``report.row_masked``): Adam leaves
                  zero-gradient rows unchanged only without decoupled weight decay;
* ``full``        input and output embeddings train.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

POLICIES = ("pretrain", "sft", "sft_af1_exact")
EMBEDDING_OPTIONS = ("frozen", "new_tokens", "full")


@dataclass
class FreezeReport:
    policy: str
    embeddings: str
    trainable: int
    total: int
    trainable_names: list[str] = field(default_factory=list)
    row_masked: list[str] = field(default_factory=list)  # params whose grads are masked to a few rows

    def __str__(self) -> str:
        return (f"freeze policy {self.policy} (embeddings: {self.embeddings}): {self.trainable:,} / "
                f"{self.total:,} parameters trainable")


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitioned params report their full size


def _embedding_modules(lm: nn.Module) -> list[nn.Module]:
    mods = [lm.get_input_embeddings()]
    out = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if out is not None and out.weight is not mods[0].weight:
        mods.append(out)
    return mods


def _row_mask_hook(rows: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        keep[rows.to(grad.device)] = 1
        return grad * keep

    return hook


def apply_freeze_policy(model, policy: str, embeddings: str = "frozen") -> FreezeReport:
    if policy not in POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; choose one of {POLICIES}")
    if embeddings not in EMBEDDING_OPTIONS:
        raise ValueError(f"unknown embeddings option {embeddings!r}; choose one of {EMBEDDING_OPTIONS}")
    for h in getattr(model, "_freeze_hooks", []):
        h.remove()
    model._freeze_hooks = []

    lm = model.lang_encoder
    model.requires_grad_(False)
    model.audio_transformer.requires_grad_(True)
    for block in model.xattn_blocks():
        block.requires_grad_(True)
    if policy == "sft":
        lm.requires_grad_(True)
    elif policy == "sft_af1_exact":
        lm.requires_grad_(True)
        for layer in model.flamingo_layers:
            layer.decoder_layer.requires_grad_(False)

    row_masked = []
    emb_mods = _embedding_modules(lm)
    if embeddings == "full":
        for m in emb_mods:
            m.requires_grad_(True)
    elif embeddings == "new_tokens":
        rows = torch.tensor(sorted({model.media_token_id, model.eoc_token_id}), dtype=torch.long)
        names = {id(p): n for n, p in model.named_parameters()}
        for m in emb_mods:
            m.weight.requires_grad_(True)
            model._freeze_hooks.append(m.weight.register_hook(_row_mask_hook(rows)))
            row_masked.append(names.get(id(m.weight), "?"))

    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    return FreezeReport(
        policy=policy, embeddings=embeddings,
        trainable=sum(_numel(params[n]) for n in trainable), total=sum(_numel(p) for p in params.values()),
        trainable_names=trainable, row_masked=row_masked,
    )


def policy_from_train_config(train_cfg) -> tuple[str, str]:
    """Map ``TrainConfig`` (stage, unfreeze_lm, af1_exact, embeddings) to (policy, embeddings)."""
    stage = getattr(train_cfg, "stage", "pretrain")
    unfreeze = bool(getattr(train_cfg, "unfreeze_lm", False))
    if stage == "pretrain" or not unfreeze:
        policy = "pretrain"
    else:
        policy = "sft_af1_exact" if getattr(train_cfg, "af1_exact", False) else "sft"
    return policy, getattr(train_cfg, "embeddings", "frozen")


def xattn_param_names(model) -> list[str]:
    """Names of xattn-block parameters (AF1 applied weight decay to these only)."""
    return [n for n, _ in model.named_parameters() if ".gated_cross_attn_layer." in n]
