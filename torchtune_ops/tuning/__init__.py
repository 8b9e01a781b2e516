"""Tuning: measuring candidates and choosing one.

Timing (``timing``), the isolated worker process (``worker``), tuning one problem against PyTorch's kernel
with a correctness gate (``tuner``), the performance model learned from trial history (``perfmodel``),
background tuning (``background``) and fleet workers (``fleet``). Tuning uses the kernels, the search and
storage; it reports back to the runtime only through callbacks it is handed.
"""
