"""Engine step loop on a tiny model: streaming deltas, stop strings, cancellation, adapter loads off the loop,
refused adapters failing their requests (never served as base), metrics."""
import asyncio

import pytest

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine import SamplingParams
from qlora_kit.qserve.engine.engine import Engine
from qlora_kit.qserve.errors import AdapterRefused, InvalidRequest, PromptTooLong

from ._tiny_serve import CharTokenizer, make_adapter, tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("eng")
    folder, model = tiny_model(root)
    make_adapter(model, root / "allowed" / "good", 4, 1)
    bad = make_adapter(model, root / "allowed" / "bad", 4, 2)
    (bad / "adapter_config.json").write_text((bad / "adapter_config.json").read_text().replace(
        '"llama"', '"some-other-model"'))
    cfg = ServeConfig(str(folder), allowed_root=str(root / "allowed"), max_model_len=64, kv_cache_tokens=512,
                      block_size=4, max_tokens_limit=32, max_num_seqs=8, max_num_batched_tokens=64)
    eng = Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start()
    yield eng
    eng.stop()


async def _collect(handle):
    outs = [o async for o in handle]
    return "".join(o.text for o in outs), outs[-1]


def test_streams_and_stop_string(engine):
    async def go():
        text, last = await _collect(engine.add([1, 2, 3], SamplingParams(temperature=0, max_tokens=12)))
        assert last.finish_reason == "length" and last.completion_tokens == 12 and len(text) == 12
        stop = text[4:6]
        t2, last2 = await _collect(engine.add([1, 2, 3], SamplingParams(temperature=0, max_tokens=12, stop=(stop,))))
        assert t2 == text[:text.find(stop)] and last2.finish_reason == "stop"
    asyncio.run(go())


def test_cancel_frees_the_request(engine):
    async def go():
        h = engine.add([5, 6], SamplingParams(temperature=0, max_tokens=30))
        await h.get()
        h.close()
        for _ in range(100):
            if not engine.scheduler.has_unfinished:
                break
            await asyncio.sleep(0.02)
        assert not engine.scheduler.has_unfinished and engine.blocks.usage() == 0
    asyncio.run(go())


def test_adapter_loaded_off_loop_and_refused_one_errors(engine):
    engine.registry.register("good", "good")
    engine.registry.register("bad", "bad")

    async def go():
        text, last = await _collect(engine.add([1, 2], SamplingParams(temperature=0, max_tokens=6), "good"))
        assert last.finish_reason == "length"
        base, _ = await _collect(engine.add([1, 2], SamplingParams(temperature=0, max_tokens=6)))
        assert text != base
        _, last = await _collect(engine.add([1, 2], SamplingParams(temperature=0, max_tokens=6), "bad"))
        assert last.finish_reason == "error" and "some-other-model" in last.error
    asyncio.run(go())
    with pytest.raises(AdapterRefused, match="some-other-model"):
        engine.registry.load("bad")
    slot = engine.registry.get("good").slot
    assert slot >= 0 and any(slot in layer.scales for layer in engine.model.lora_layers().values())
    assert engine.registry.unload("good")  # unloaded for good: its weights leave the resident slot too
    assert not any(slot in layer.scales for layer in engine.model.lora_layers().values())


def test_limits(engine):
    async def go():
        with pytest.raises(InvalidRequest, match="max_tokens=33"):
            engine.add([1], SamplingParams(max_tokens=33))
        with pytest.raises(PromptTooLong):
            engine.add(list(range(64)), SamplingParams(max_tokens=1))
    asyncio.run(go())
    assert engine.metrics.value("vllm:request_success_total", finished_reason="length") >= 1
    assert engine.metrics.value("vllm:num_requests_waiting") == 0


def test_step_thread_runs_with_its_own_intra_op_thread_count(tmp_path):
    """ServeConfig.threads is set inside the engine's step thread (torch's count is per thread); the caller's
    own count is left alone."""
    import torch

    folder, model = tiny_model(tmp_path)
    seen = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    cfg = ServeConfig(str(folder), max_model_len=64, kv_cache_tokens=256, block_size=4, threads=3)
    eng = Engine(model, CharTokenizer(), cfg).start()
    try:
        async def go():
            return await _collect(eng.add([1, 2, 3], SamplingParams(temperature=0, max_tokens=2)))
        asyncio.run(go())
    finally:
        eng.stop()
        hook.remove()
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads=0"):
        ServeConfig(str(folder), threads=0)


def test_threads_flag_is_refused_with_the_vllm_backend(tmp_path):
    from click.testing import CliRunner

    from qlora_kit.qserve.cli import main

    out = CliRunner().invoke(main, ["serve", str(tmp_path), "--backend", "vllm", "--threads", "2"])
    assert out.exit_code == 2 and "--threads sets the native engine's step thread" in out.output


def test_a_cold_store_adapter_is_read_as_its_first_request_arrives(tmp_path):
    """The read starts in `add`, not at the step loop's next turn (which may be a whole step away): here no loop
    runs at all, and the adapter still reaches host memory, read once."""
    import time

    folder, model = tiny_model(tmp_path)
    make_adapter(model, tmp_path / "store" / "cold", 4, 1)
    cfg = ServeConfig(str(folder), adapter_store=str(tmp_path / "store"), max_model_len=64, kv_cache_tokens=256,
                      block_size=4)
    eng = Engine(model, CharTokenizer(), cfg, base_names=("llama",))  # not started: no step loop
    try:
        assert eng.registry.lookup("cold") and eng.registry.tier("cold") == "store"

        async def go():
            eng.add([1, 2], SamplingParams(temperature=0, max_tokens=2), "cold")
            eng.add([3, 4], SamplingParams(temperature=0, max_tokens=2), "cold")
        asyncio.run(go())
        deadline = time.monotonic() + 30
        while eng.registry.tier("cold") != "host" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.registry.tier("cold") == "host" and eng.registry.store.reads == {"cold": 1} and eng.steps == 0
    finally:
        eng.stop()
