"""Triton kernels, one launcher module per op (relpos, performer, patch_embed; the
patch_embed kernels sit in _patch_embed_fwd.py and _patch_embed_bwd.py).

Importing a module here needs triton; `vitkernels` itself never imports them
until a triton backend runs. What they share (launches, recording, hints, the
allocator, dtype tables) is in `_common.py`; `_aot.py` compiles the launches the
launchers record, for the compile-budget tests and the estimate.
"""
