"""server.dequantize_bases: the explicit dense-base option swaps every NF4 projection and reports its memory cost.
server.start: --served-model-name and --chat-template reach the HTTP API."""
import pytest
import torch

from qlora_kit.models import Batch, NF4Linear
from tests.tolerances import tol

from ._tiny_serve import tiny_model

pytestmark = pytest.mark.unit


def test_dequantize_bases_reports_the_extra_bytes_and_keeps_the_logits(tmp_path):
    from qlora_kit.qserve.server import dequantize_bases

    _, model = tiny_model(tmp_path)
    layers = model.lora_layers()
    assert all(isinstance(m.base, NF4Linear) for m in layers.values())  # the 4-bit base is what loads
    four_bit = sum(b.nbytes for m in layers.values() for n, b in m.base.named_buffers() if n.startswith("weight_"))
    dense = sum(m.in_features * m.out_features * 4 for m in layers.values())  # fp32 compute in this tiny model
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(Batch(ids))
        n, extra = dequantize_bases(model)
        after = model(Batch(ids))
    assert n == len(layers) and extra == dense - four_bit > 0
    assert not any(isinstance(m.base, NF4Linear) for m in layers.values())
    # the same weights; the 4-bit base multiplies in kernels.nf4_matmul's order, the dense copy in F.linear's
    torch.testing.assert_close(before, after, **tol("nf4_matmul", torch.float32))


def test_served_model_name_and_chat_template_reach_the_api(smollm2, tmp_path):
    """--served-model-name names the base in /v1/models and requests; --chat-template is the template
    /v1/chat/completions renders (prompt tokens = those of the custom rendering, not the checkpoint's)."""
    import httpx

    from qlora_kit.models import Tokenizer
    from qlora_kit.qserve.config import ServeConfig
    from qlora_kit.qserve.server import start
    from tests.unit.trainer._tiny import write_tiny_chat_model

    folder = write_tiny_chat_model(smollm2, tmp_path / "tiny-chat")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}>>{% endfor %}")
    handle = start(ServeConfig(str(folder), port=0, served_model_name="tea-base", chat_template=str(template),
                               dtype="float32", max_model_len=64, kv_cache_tokens=256))
    try:
        assert [m["id"] for m in httpx.get(handle.url + "/v1/models").json()["data"]] == ["tea-base"]
        body = {"model": "tea-base", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2}
        r = httpx.post(handle.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tea-base", r.text
        tok = Tokenizer(folder)
        ours = tok.encode("<<user: Hi there>>", add_special_tokens=False)
        theirs = tok.encode_chat(body["messages"])  # the checkpoint's own template (SmolLM2's)
        assert len(ours) != len(theirs) and r.json()["usage"]["prompt_tokens"] == len(ours)
        r = httpx.post(handle.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "x"}, timeout=60)
        assert r.status_code == 404  # the folder's name is no longer the base's name
    finally:
        handle.stop()
