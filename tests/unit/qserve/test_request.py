"""Request state (SamplingParams validation: tests/unit/models/test_sampling.py)."""
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


def test_invalid_prompt():
    with pytest.raises(InvalidRequest, match="prompt: is empty"):
        Request([])
    with pytest.raises(InvalidRequest, match="prompt: token ids must be integers >= 0"):
        Request([1, -3])
