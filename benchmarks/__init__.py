"""Benchmarks: one script per measured claim, on the shared harness in `harness.py`."""
