"""Token sampling: greedy picks the argmax, seeded sampling repeats, bad parameters are refused."""

from __future__ import annotations

import math

import pytest
import torch

from kvfuse.errors import InvalidRequestError
from kvfuse.model.sampling import Sampler, SamplingParams

VOCAB_SIZE = 64


def random_logits(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(VOCAB_SIZE, generator=torch.Generator().manual_seed(seed))


def draws(params: SamplingParams, logits: torch.Tensor, num_draws: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(num_draws)]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed: int) -> None:
    logits = random_logits(seed)
    assert Sampler(SamplingParams()).sample(logits) == int(logits.argmax())


def test_greedy_ignores_seed_and_top_p() -> None:
    logits = random_logits(0)
    params = SamplingParams(temperature=0.0, top_p=0.1, seed=123)
    assert draws(params, logits, 20) == [int(logits.argmax())] * 20


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    logits = random_logits(1)
    assert draws(params, logits, 200) == draws(params, logits, 200)


def test_different_seeds_differ() -> None:
    logits = random_logits(1)  # N(0, 1) logits: no token above ~10% probability
    first = draws(SamplingParams(temperature=1.0, seed=1), logits, 200)
    second = draws(SamplingParams(temperature=1.0, seed=2), logits, 200)
    assert first != second
    assert len(set(first)) > 10  # really sampling, not collapsing onto one token


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    counts = torch.bincount(
        torch.tensor(draws(SamplingParams(temperature=1.0, seed=0), logits, 4000)), minlength=3
    )
    # 4000 draws: the standard error of each frequency is ≤ 0.008; allow about 4 of them.
    assert torch.allclose(counts / 4000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_tiny_top_p_returns_argmax() -> None:
    logits = random_logits(2)
    params = SamplingParams(temperature=1.0, top_p=1e-6, seed=0)
    assert draws(params, logits, 100) == [int(logits.argmax())] * 100


def test_top_p_keeps_the_smallest_set_reaching_it() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # Mass before each token: 0, 0.4, 0.7, 0.9 -> top_p 0.5 keeps the first two only.
    seen = set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0), logits, 500))
    assert seen == {0, 1}


def test_low_temperature_concentrates_on_argmax() -> None:
    logits = random_logits(3)
    params = SamplingParams(temperature=1e-3, seed=0)
    assert set(draws(params, logits, 50)) == {int(logits.argmax())}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": 101.0},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
    ],
)
def test_invalid_params_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
