"""Benchmarks: ours against the peer in one run, ratios printed. Run each as python -m bench.<name>."""
