"""Runtime: what runs inside the user's model.

The custom ops (``ops``), the hot path of each call (``dispatch``: key, in-memory lookup, call), the
resolution of a key met for the first time (``resolve``: store, bundles, prediction, tuning, agreement
across ranks), the guarded kernel call (``launch``), PyTorch's reference kernels (``aten``), the in-memory
state (``choices``) and the torch.compile backend (``backend``).
"""
