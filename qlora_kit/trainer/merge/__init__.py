"""`qtrain merge`: a LoRA adapter merged into its dequantized 4-bit base, written as bf16 or re-quantized to 4-bit,
with the cost of merging reported per tensor and at the logits."""
from .logits import DEFAULT_PROMPTS, LogitCost, PromptCost, compare_logits
from .run import REPORT_NAME, MergeResult, as_json, merge, provenance
from .weights import FORMATS, TensorCost, merge_weight, merged_reference

__all__ = ["DEFAULT_PROMPTS", "FORMATS", "REPORT_NAME", "LogitCost", "MergeResult", "PromptCost", "TensorCost",
           "as_json", "compare_logits", "merge", "merge_weight", "merged_reference", "provenance"]
