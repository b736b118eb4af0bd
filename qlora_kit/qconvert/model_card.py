"""The README.md (model card) `publish` uploads: Hub metadata, size and error tables, load snippets.

The metadata is built with huggingface_hub's ModelCardData (so it parses back with ModelCard.load):
base_model (when known) with base_model_relation: quantized, license (and license_name / license_link
for "other") copied from the source's card front matter or config.json (recorded at convert time in the
safetensors metadata key `qlora_kit.source_license`, qconvert/licence.py), pipeline_tag:
text-generation, library_name: transformers, tags bitsandbytes / 4-bit / <quant type> / qlora-kit, quantized_by. Sizes come from
`inspect` (bits per parameter = 8 * bytes / params); errors, when a source was given, from
`verify --against` (SQNR_dB = 10 log10(sum W^2 / sum (W - W')^2) per tensor).
"""
import statistics

from .inspection import Inspection
from .verify import VerifyResult

_WORST = 10


def card_data(base_model: str | None, quant_type: str, license_: dict[str, str], quantized_by: str):
    """The card's metadata as huggingface_hub.ModelCardData."""
    from huggingface_hub import ModelCardData

    extra = {"base_model_relation": "quantized"} if base_model else {}
    return ModelCardData(base_model=base_model, license=license_.get("license"),
                         license_name=license_.get("license_name"), license_link=license_.get("license_link"),
                         pipeline_tag="text-generation", library_name="transformers",
                         tags=["bitsandbytes", "4-bit", quant_type, "qlora-kit"], quantized_by=quantized_by, **extra)


def _size_table(ins: Inspection) -> str:
    quant = [r for r in ins.rows if r.blocksize is not None]
    qparams = sum(r.params for r in quant)
    qbytes = sum(r.nbytes for r in quant)
    mib = 2**20
    return "\n".join([
        "| | parameters | bf16 size | this checkpoint | bits/param |",
        "|---|---:|---:|---:|---:|",
        f"| quantized linear weights ({len(quant)} tensors) | {qparams:,} | {2 * qparams / mib:.1f} MiB "
        f"| {qbytes / mib:.1f} MiB | {8 * qbytes / max(qparams, 1):.3f} |",
        f"| whole model | {ins.params:,} | {ins.bf16_bytes / mib:.1f} MiB | {ins.nbytes / mib:.1f} MiB "
        f"| {8 * ins.nbytes / max(ins.params, 1):.3f} |",
    ])


def _error_table(result: VerifyResult) -> str:
    quant = [e for e in result.errors if e.quantized]
    if not quant:
        return "No per-tensor error was measured (publish with `--against SRC` to include it)."
    values = [e.sqnr_db for e in quant]
    lines = [f"SQNR over {len(quant)} quantized tensors: min {min(values):.2f} dB, "
             f"median {statistics.median(values):.2f} dB, mean {statistics.fmean(values):.2f} dB.", "",
             "| tensor (worst first) | SQNR dB |", "|---|---:|"]
    lines += [f"| `{e.name}` | {e.sqnr_db:.2f} |" for e in sorted(quant, key=lambda e: e.sqnr_db)[:_WORST]]
    return "\n".join(lines)


def model_card(repo_id: str, ins: Inspection, errors: VerifyResult | None, base_model: str | None,
               license_: dict[str, str] | None = None, quantized_by: str | None = None) -> str:
    """The full README.md text for `repo_id` (front matter from card_data, then the body)."""
    qc = ins.quantization_config or {}
    qt = qc.get("bnb_4bit_quant_type", "nf4")
    compute = qc.get("bnb_4bit_compute_dtype", "bfloat16")
    license_ = license_ or {}
    data = card_data(base_model, qt, license_, quantized_by or repo_id.split("/")[0])
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its source model"
    settings = [r for r in ins.rows if r.blocksize is not None]
    blocksize = settings[0].blocksize if settings else 64
    licence = (f"Licence: `{license_['license']}`, the source model's; its licence and notice files are included "
               "unchanged." if license_.get("license") else
               "Licence: the source model's card states none; its licence and notice files, if any, are included.")
    return f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A 4-bit {qt.upper()} version of {source}, written by `qconvert convert` from qlora-kit. It uses the
bitsandbytes 4-bit layout, so transformers + bitsandbytes, vLLM and qlora-kit load it unchanged.

Quantization: {qt}, blocksize {blocksize}, double quantization {'on' if qc.get('bnb_4bit_use_double_quant') else 'off'},
compute dtype {compute}; embeddings, the LM head and norms are kept in {compute}.

{licence}

## Size

{_size_table(ins)}

## Error

{_error_table(errors) if errors else "No per-tensor error was measured (publish with `--against SRC` to include it)."}

## Usage

transformers + bitsandbytes (the quantization settings are in config.json):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=16)[0]))
```

PEFT (a LoRA adapter trained on this 4-bit base, e.g. by `qtrain train --base {repo_id}`):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")
model = PeftModel.from_pretrained(model, "your-org/your-adapter")
```

vLLM (bitsandbytes pre-quantized checkpoint; adapters with `--enable-lora`):

```bash
vllm serve {repo_id} --quantization bitsandbytes --enable-lora --lora-modules my-adapter=your-org/your-adapter
```

qlora-kit (many LoRA adapters over one 4-bit base, OpenAI-compatible API; the Hub id is fetched into the
Hugging Face cache):

```bash
qserve serve {repo_id} --adapter my-adapter=path/to/adapter
```
"""
