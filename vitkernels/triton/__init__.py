"""Triton kernels, one module per op (forward and backward side by side).

Importing a module here needs triton; `vitkernels` itself never imports them
until a triton backend runs. Every module lists the specialisations it launches
in `AOT_SPECS` for the compile-budget tests (see `_aot.py`).
"""
