import pytest
import torch

from qlora_kit.models import SamplingError, SamplingParams, generate, sample

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


@pytest.mark.parametrize("kwargs, msg", [
    ({"temperature": -0.1}, "temperature=-0.1: must be 0 (greedy) or a number in [0.001, 2]"),
    ({"temperature": 1e-300}, "temperature=1e-300: must be 0 (greedy)"),
    ({"seed": 2**64}, "seed=18446744073709551616: must be an integer in"),
    ({"seed": -(2**63) - 1}, "must be an integer in [-9223372036854775808, 18446744073709551615]"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"),
    ({"top_k": -2}, "top_k=-2: must be an integer >= 1, or 0/-1 to disable"),
    ({"max_tokens": 0}, "max_tokens=0: must be an integer >= 1"),
    ({"max_tokens": True}, "max_tokens=True"),
    ({"stop_token_ids": (1, -1)}, "stop_token_ids=(1, -1): must be a tuple of token ids >= 0"),
    ({"stop": ("",)}, "stop=('',): must be a tuple of non-empty strings"),
    ({"stop": ["x"]}, "stop=['x']"),
    ({"seed": 1.5}, "seed=1.5: must be an integer in"),
])
def test_sampling_params_invalid_names_the_field(kwargs, msg):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kwargs)
    assert msg in str(e.value)
    assert isinstance(e.value, ValueError)


def test_sampling_params_frozen():
    p = SamplingParams(temperature=0)
    assert p.greedy
    with pytest.raises(AttributeError):
        p.temperature = 1.0


def test_one_class_with_the_offline_defaults():
    """qserve's engine holds the same class; its defaults are generate()'s (the HTTP defaults are the API's)."""
    from qlora_kit.qserve.api import protocol
    from qlora_kit.qserve.engine import SamplingParams as EngineSampling

    assert EngineSampling is SamplingParams
    p = SamplingParams()
    assert (p.temperature, p.max_tokens, p.greedy) == (0.0, 64, True)
    # the OpenAI/vLLM defaults, applied by the HTTP layer: temperature 1.0 and 16 new tokens
    body = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    assert body.sampling(16) == SamplingParams(temperature=1.0, max_tokens=16)


def test_generate_refuses_stop_strings(tmp_path):
    from tests.unit.qserve._tiny_serve import tiny_model

    model = tiny_model(tmp_path)[1]
    with pytest.raises(SamplingError, match=r"stop=\('x',\): stop strings need detokenized text"):
        generate(model, [[1, 2]], SamplingParams(stop=("x",)))
