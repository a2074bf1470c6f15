"""Packing, fused cross-attention and loss settings: the shipped configs turn them on; bad values are
errors that name the field."""
import pytest

from megaflamingo.config import load_config
from megaflamingo.data.packing import PackingConfig
from megaflamingo.errors import ConfigError


@pytest.fixture(autouse=True)
def _paths(monkeypatch, tmp_path):
    for var in ("MF_DATA_ROOT", "MF_RUN_ROOT", "MF_INIT_FROM", "MF_CLAPCAP_CKPT"):
        monkeypatch.setenv(var, str(tmp_path))


@pytest.mark.parametrize("name", ["tiny_cpu", "pretrain", "sft_4shot", "sft_8shot", "chat"])
def test_shipped_configs_pack_and_use_the_fused_layout(name):
    cfg = load_config(name)
    assert cfg.data.packing and cfg.model.xattn.backend == "auto" and cfg.model.attn_implementation == "auto"
    pk = PackingConfig.from_config(cfg.data, cfg.train.micro_batch_size)
    assert pk.max_tokens_per_row >= cfg.data.max_tokens and pk.rows_per_batch == cfg.train.micro_batch_size
    off = load_config(name, overrides=["data.packing=false", "model.xattn.backend=dense"])
    assert PackingConfig.from_config(off.data, off.train.micro_batch_size) is None


def test_defaults_are_the_padded_reference_path():
    cfg = load_config(None)
    assert not cfg.data.packing and cfg.model.xattn.backend == "dense"
    assert cfg.train.loss_weighting == "token" and cfg.train.loss_head == "plain"
    assert PackingConfig.from_config(cfg.data, 4) is None


@pytest.mark.parametrize("override,field", [
    ("data.max_tokens_per_row=32", "data.max_tokens_per_row"),
    ("data.packing_lookahead=0", "data.packing_lookahead"),
    ("data.group_by_length=true", "data.group_by_length"),
    ("model.xattn.backend=fastest", "model.xattn.backend"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("train.loss_weighting=mean", "train.loss_weighting"),
    ("train.loss_head=fused", "train.loss_head"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny_cpu", overrides=[override])


def test_liger_needs_supervised_logits():
    with pytest.raises(ConfigError, match=r"train\.loss_head.*loss_logits: supervised"):
        load_config("tiny_cpu", overrides=["train.loss_head=liger", "train.loss_logits=full"])
