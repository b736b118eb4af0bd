import pytest
import torch

from qlora_kit.models import SamplingParams, sample

pytestmark = pytest.mark.unit


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1)), logits.argmax(-1))


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=0.8, seed=7)
    draws = [sample(logits, p, torch.Generator().manual_seed(p.seed)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen_k = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g).item() for _ in range(200)}
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is tokens 0 and 1
    seen_all = {sample(logits, SamplingParams(temperature=1.0), g).item() for _ in range(400)}
    assert seen_all == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs,msg", [({"temperature": -1}, "temperature=-1"), ({"top_k": -2}, "top_k=-2"),
                                        ({"top_p": 0.0}, "top_p=0.0"), ({"max_tokens": 0}, "max_tokens=0")])
def test_invalid_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)
