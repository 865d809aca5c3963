"""The torch backend: the best stock PyTorch composite for each op.

The automatic choice on CPU, and the baseline the kernels must beat on GPU
(e.g. SDPA with a gathered, materialised bias for relpos_attention). Each op's
section below is owned by that op's module in vitkernels/ops/.
"""

from __future__ import annotations

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401
