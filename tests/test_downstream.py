"""The evaluation's pre-training over a grid of step sizes: students trained together equal one at a time."""

import pytest
import torch

from mkdt import downstream
from mkdt.data import ImageData
from mkdt.nn.models import flatten_params
from mkdt.runtime import Runtime
from mkdt.store import SyntheticSet
from tests.helpers import tiny_config

OUT_DIM = 16


def _data() -> ImageData:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(20) % 10
    return ImageData("random", images, labels, images, labels, tuple("0123456789"), (0.5,), (0.25,))


def _set() -> SyntheticSet:
    gen = torch.Generator().manual_seed(1)
    return SyntheticSet(torch.randn(40, 1, 8, 8, generator=gen), torch.randn(40, OUT_DIM, generator=gen), 0.1)


def test_grid_trained_together_equals_one_at_a_time(tmp_path):
    config = tiny_config(tmp_path, "evaluate.selection=tuned", "evaluate.epochs=3", "evaluate.batch_size=16")
    lrs = [0.01, 0.1, 0.3, 1e6]  # groups of 3: [0.01, 0.1, 0.3] then [1e6] alone, which diverges
    runtime = Runtime(torch.device("cpu"))

    def grid(parallel):
        return downstream.pretrain_grid(config, "random", 1, _set(), _data(), OUT_DIM, runtime, lrs, parallel)

    one, together = grid(1), grid(3)
    assert list(one) == list(together) == lrs
    assert one[1e6] == together[1e6] == (None, [])  # diverged: left out, the others kept
    for lr in lrs[:3]:
        (a, a_loss), (b, b_loss) = one[lr], together[lr]
        assert a is not None and b is not None
        assert torch.allclose(flatten_params(b), flatten_params(a), rtol=0, atol=1e-5)
        assert b_loss == pytest.approx(a_loss, rel=1e-4) and len(a_loss) == 3
    reference, _ = downstream.pretrain(config, "random", 1, _set(), _data(), OUT_DIM, runtime, 0.1)
    assert torch.equal(flatten_params(one[0.1][0]), flatten_params(reference))  # parallel=1 is pretrain


def test_parallel_must_be_positive(tmp_path):
    config = tiny_config(tmp_path, "evaluate.selection=tuned")
    with pytest.raises(ValueError, match="parallel"):
        downstream.pretrain_grid(
            config, "random", 0, _set(), _data(), OUT_DIM, Runtime(torch.device("cpu")), [0.1], 0
        )
