"""Benchmarks: ours against the peer in one run, ratios printed. Run each as python -m bench.<name>."""
import logging

# bitsandbytes probes for Hugging Face's optional `kernels` package at import and finds ours; the probe fails
# harmlessly but would print a warning in every benchmark.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
