"""x86 u8 x s8 integer convolution without VNNI, written from its description (ORT issue 16105).

ONNX Runtime turns symmetric int8 activations into uint8 (x_u8 = x_s8 + 128) and multiplies with
``vpmaddubsw``: adjacent products along the reduction axis are added into int16 WITH saturation,
then summed in int32; the zero point 128 is taken back with 128 * sum(w). For a 1x1 convolution
the reduction axis is the input channels, paired (0, 1), (2, 3), ...
"""

from __future__ import annotations

import numpy as np


def conv1x1_accumulators(x_s8: np.ndarray, w_s8: np.ndarray, saturate: bool) -> np.ndarray:
    """int64 accumulators [Cout, H*W] of a 1x1 conv, x_s8 [Cin, H, W], w_s8 [Cout, Cin]."""
    a = x_s8.reshape(x_s8.shape[0], -1).astype(np.int64)
    w = w_s8.astype(np.int64)
    if not saturate:
        return (w[:, :, None] * a[None]).sum(axis=1)
    prods = w[:, :, None] * (a + 128)[None]
    pairs = prods[:, 0::2] + prods[:, 1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=1) - 128 * w.sum(axis=1)[:, None]


def requantize(acc: np.ndarray, s_x: float, s_w: np.ndarray, s_y: float) -> np.ndarray:
    """DQ(Q(conv)) of the accumulators: int8 output with scale s_y, zero point 0, as float."""
    return s_y * np.clip(np.rint(acc * s_x * s_w[:, None] / s_y), -128, 127)
