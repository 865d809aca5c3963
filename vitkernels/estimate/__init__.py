"""The compiler-based estimate: what each kernel launch of the reference workloads
should take on an H200, read from its machine code (no GPU needed; an estimate,
never a measurement). ``python -m vitkernels estimate``; see run.py, and
bench/WORKLOADS.md for the model."""
