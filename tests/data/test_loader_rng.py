"""The training loader must not draw from the global torch RNG (the trainer restores it for dropout)."""
import pytest
import torch
from torch.utils.data import DataLoader

from megaflamingo.config import DataConfig, DatasetEntry, ModelConfig
from megaflamingo.data import build_train_loader
from megaflamingo.data.loader_rng import loader_generator
from tests.data.data_fixtures import D, W, make_split

MODEL = ModelConfig(audio_embed_dim=D, max_num_window=W, max_num_fewshot=1)


@pytest.fixture
def loader(tmp_path, tiny_tok, tiny_token_ids):
    make_split(tmp_path, "Clotho-AQA-AQA/train", 12)
    cfg = DataConfig(data_root=str(tmp_path), num_workers=0,
                     blend={"Clotho-AQA-AQA/train": DatasetEntry(weight=1.0)})
    return build_train_loader(cfg, tiny_tok, tiny_token_ids, 0, 1, 7, batch_size=3, model_cfg=MODEL)


def test_dataloader_base_seed_comes_from_the_global_rng_without_a_generator():
    """The mechanism behind the bug, on torch itself: creating an iterator consumes one global draw."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    iter(DataLoader(range(4), batch_size=2))
    assert not torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(before)
    iter(DataLoader(range(4), batch_size=2, generator=loader_generator(7, 0, 0, 0)))
    assert torch.equal(torch.get_rng_state(), before)  # the fix: the loader's own generator


def test_loader_generator_is_a_function_of_the_loader_state():
    draw = lambda g: torch.randint(0, 2**62, (4,), generator=g).tolist()  # noqa: E731
    assert draw(loader_generator(7, 1, 5, 0)) == draw(loader_generator(7, 1, 5, 0))
    others = [loader_generator(8, 1, 5, 0), loader_generator(7, 2, 5, 0), loader_generator(7, 1, 6, 0),
              loader_generator(7, 1, 5, 1)]
    assert len({tuple(draw(g)) for g in others} | {tuple(draw(loader_generator(7, 1, 5, 0)))}) == 5


def test_iterating_the_train_loader_leaves_the_global_rng_alone(loader):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
