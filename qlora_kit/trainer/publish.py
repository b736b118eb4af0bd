"""`qtrain publish ADAPTER_DIR REPO_ID`: push a trained adapter to the Hub with its own model card.

Uploaded: adapter_config.json and adapter_model.safetensors (checked by formats.peft.load_adapter first),
loss_curve.png when present, and a README.md built with huggingface_hub's ModelCardData: base_model (the
adapter's base_model_name_or_path when it is a Hub id, or --base-model), base_model_relation: adapter,
library_name: peft, pipeline_tag: text-generation, tags; then a data summary (file name, rows, sha256 of
the training file when it is still on disk), the training settings of train_config.json (local paths cut
to their file names), the steps/tokens/losses of metrics.jsonl with the final eval loss, the loss curve
and load snippets (PEFT, vLLM, qserve). One commit (qlora_kit._cli.hub.commit_files), endpoint HF_ENDPOINT.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qlora_kit._cli.hub import REPO_ID_PATTERN, commit_files, hub_api, is_hub_id
from qlora_kit.formats.peft import CONFIG_NAME, WEIGHTS_NAME, load_adapter

from .errors import PublishError
from .many.job import CONFIG_USED, LOSS_CURVE
from .metrics import METRICS_NAME

CARD = "README.md"
# train_config.json keys shown in the card, in this order (paths and bookkeeping are left out)
SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler", "warmup_ratio",
            "warmup_steps", "max_steps", "epochs", "batch_size", "grad_accum", "max_seq_len", "packing", "optimizer",
            "weight_decay", "max_grad_norm", "compute_dtype", "seed")


@dataclass
class AdapterPlan:
    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # (path in repo, bytes) of the folder's files, README.md last
    card: str


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PublishError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PublishError(f"{path}: expected a JSON object")
    return obj


def _metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_NAME
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise PublishError(f"{path}:{i}: not valid JSON") from None
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _data_summary(train: dict) -> str:
    """One line per data file: its name, rows and sha256 when on disk (the path itself stays private)."""
    lines = []
    for key, label in (("data", "training data"), ("eval_data", "eval data")):
        value = train.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value)
        if path.is_file():
            data = path.read_bytes()
            rows = sum(1 for s in data.splitlines() if s.strip()) if path.suffix == ".jsonl" else None
            lines.append(f"- {label}: `{path.name}`{f', {rows} rows' if rows is not None else ''}, "
                         f"sha256 `{hashlib.sha256(data).hexdigest()}`")
        else:
            lines.append(f"- {label}: `{value if is_hub_id(value) else path.name}`")
    if train.get("eval_fraction") and not train.get("eval_data"):
        lines.append(f"- eval split: {train['eval_fraction']:.0%} of the training data held out")
    return "\n".join(lines) or "- not recorded (no train_config.json beside the adapter)"


def _results(metrics: list[dict]) -> str:
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval_loss" in r]
    if not steps:
        return "No metrics.jsonl beside the adapter."
    lines = [f"- optimizer steps: {steps[-1]['step']}, training tokens: {sum(r.get('tokens', 0) for r in steps):,}",
             f"- train loss: {steps[0]['loss']:.4f} (step {steps[0]['step']}) -> {steps[-1]['loss']:.4f} "
             f"(step {steps[-1]['step']})"]
    if evals:
        lines.append(f"- eval loss: {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})")
    return "\n".join(lines)


def adapter_card(repo_id: str, base_model: str | None, train: dict, metrics: list[dict], has_curve: bool,
                 lora: dict) -> str:
    """The README.md text of an adapter repo."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model, library_name="peft", pipeline_tag="text-generation",
                         tags=["lora", "qlora", "qlora-kit", "peft"],
                         **({"base_model_relation": "adapter"} if base_model else {}))
    settings = "\n".join(f"| `{k}` | `{json.dumps(train[k])}` |" for k in SETTINGS if k in train)
    base = base_model or "BASE_MODEL"
    name = repo_id.split("/")[-1]
    curve = f"![loss curve]({LOSS_CURVE})\n\n" if has_curve else ""
    return f"""---
{data.to_yaml()}
---

# {name}

A LoRA adapter (rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, on {', '.join(map(str, lora.get('target_modules') or []))})
for {f'[{base_model}](https://huggingface.co/{base_model})' if base_model else 'its base model'}, trained with
`qtrain train` from qlora-kit against the frozen 4-bit NF4 base (QLoRA). Stored in PEFT's format.

## Data

{_data_summary(train)}

## Training

| setting | value |
|---|---|
{settings or "| (train_config.json not found) | |"}

## Results

{_results(metrics)}

{curve}## Usage

PEFT (on the 4-bit base it was trained against):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{base}", device_map="auto")
model = PeftModel.from_pretrained(model, "{repo_id}")
```

vLLM:

```bash
vllm serve {base} --quantization bitsandbytes --enable-lora --lora-modules {name}={repo_id}
```

qlora-kit (the adapter folder downloaded first):

```bash
hf download {repo_id} --local-dir {name}
qserve serve {base} --adapter {name}={name}
```
"""


def plan(folder: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
         base_model: str | None = None) -> AdapterPlan:
    """Check the adapter folder and build what would be uploaded.

    Raises:
        PublishError (bad repo id, unreadable train_config/metrics), AdapterFormatError (not a PEFT adapter).
    """
    folder = Path(folder)
    if not REPO_ID_PATTERN.fullmatch(repo_id) or "/" not in repo_id:
        raise PublishError(f"{repo_id!r}: not a Hub repo id; expected namespace/name")
    lora, _ = load_adapter(folder)  # a folder the adapter boundary refuses is not published
    lora_json = lora.to_json()
    recorded = lora_json.get("base_model_name_or_path")
    base = base_model or (recorded if isinstance(recorded, str) and is_hub_id(recorded) and "/" in recorded else None)
    train = _read_json(folder / CONFIG_USED) if (folder / CONFIG_USED).is_file() else {}
    has_curve = (folder / LOSS_CURVE).is_file()
    card = adapter_card(repo_id, base, train, _metrics(folder), has_curve, lora_json)
    names = [CONFIG_NAME, WEIGHTS_NAME] + ([LOSS_CURVE] if has_curve else [])
    files = [(n, (folder / n).stat().st_size) for n in names] + [(CARD, len(card.encode()))]
    return AdapterPlan(repo_id, revision, private, files, card)


def upload(folder: str | Path, p: AdapterPlan, token: str | None = None) -> str:
    """Create the repo (and branch) and commit the planned files; return the commit URL."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return commit_files(hub_api(token), p.repo_id, p.private, p.revision, Path(folder),
                            [n for n, _ in p.files if n != CARD], {CARD: p.card.encode()},
                            "Upload LoRA adapter (qlora-kit qtrain)")
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PublishError(f"{p.repo_id}: upload failed ({first})") from None
