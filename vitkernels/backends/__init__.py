"""Non-kernel backends: `reference` (the literal math, the test oracle) and
`torch_ops` (the best stock PyTorch composite)."""
