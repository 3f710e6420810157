"""Token choice from logits: greedy, temperature, top-k, top-p, seeded reproducibility."""
from __future__ import annotations

import pytest
import torch

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference.sampling import Sampler, SamplingParams


def logits_row(seed: int = 0, vocab: int = 200) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits) for _ in range(n)]


def test_greedy_is_argmax_and_needs_no_generator():
    logits = logits_row()
    sampler = Sampler(SamplingParams())
    assert sampler.generator is None
    assert sampler(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=0.8, top_k=1))(logits) == int(logits.argmax())


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = logits_row()
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draws(params, logits) == draws(params, logits)
    assert draws(params, logits) != draws(SamplingParams(temperature=1.0, seed=1235), logits)


def test_top_k_keeps_only_the_k_most_likely():
    logits = logits_row(1)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    got = set(draws(SamplingParams(temperature=2.0, top_k=5, seed=0), logits, 500))
    assert got <= allowed
    assert len(got) > 1  # really sampling, not argmax


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0)).distribution(logits)
    # 0.5 alone < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is the first two tokens, renormalised
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # the most likely token survives however small p is
    tiny = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=0)).distribution(logits)
    assert tiny.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_temperature_sharpens_and_flattens():
    logits = logits_row(2, vocab=10)
    cold = Sampler(SamplingParams(temperature=0.2, seed=0)).distribution(logits)
    hot = Sampler(SamplingParams(temperature=5.0, seed=0)).distribution(logits)
    assert cold.max() > torch.softmax(logits, -1).max() > hot.max()


def test_empirical_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=7), logits, 3000)),
                            minlength=3).float() / 3000
    torch.testing.assert_close(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.04, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_parameters_are_generation_errors(kwargs):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, GenerationError)
