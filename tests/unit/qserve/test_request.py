"""Request state and SamplingParams validation."""
import pytest

from qlora_kit.qserve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from qlora_kit.qserve.errors import InvalidRequest

pytestmark = pytest.mark.unit


def test_defaults_and_token_accounting():
    r = Request([1, 2, 3], SamplingParams(max_tokens=3), request_id="a", arrival_time=0.0)
    assert r.status is RequestStatus.WAITING and r.num_tokens == 3 and r.num_pending_tokens == 3
    assert not r.is_decoding
    r.num_computed_tokens = 3
    assert r.append_token(7) is None
    assert r.all_token_ids == [1, 2, 3, 7] and r.is_decoding and r.num_pending_tokens == 1


def test_finish_reasons():
    r = Request([1], SamplingParams(max_tokens=2, stop_token_ids=(9,)), eos_token_id=0)
    assert r.append_token(9) is FinishReason.STOP
    r = Request([1], SamplingParams(max_tokens=5), eos_token_id=0)
    assert r.append_token(0) is FinishReason.STOP
    r = Request([1], SamplingParams(max_tokens=5, ignore_eos=True), eos_token_id=0)
    assert r.append_token(0) is None
    r = Request([1], SamplingParams(max_tokens=2))
    assert r.append_token(5) is None and r.append_token(5) is FinishReason.LENGTH
    r = Request([1, 2], SamplingParams(max_tokens=100))
    assert r.append_token(5, max_model_len=3) is FinishReason.LENGTH
    assert FinishReason.STOP == "stop"


def test_cancel_flag():
    r = Request([1])
    r.cancel()
    assert r.cancelled


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
def test_sampling_params_invalid(kwargs, msg):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert msg in str(e.value)
    assert isinstance(e.value, ValueError)


def test_sampling_params_frozen():
    p = SamplingParams(temperature=0)
    assert p.greedy
    with pytest.raises(AttributeError):
        p.temperature = 1.0


def test_invalid_prompt():
    with pytest.raises(InvalidRequest, match="prompt: is empty"):
        Request([])
    with pytest.raises(InvalidRequest, match="prompt: token ids must be integers >= 0"):
        Request([1, -3])
