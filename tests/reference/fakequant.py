"""Reference INT8 fake quantization, written from the ONNX QuantizeLinear spec (not from calib).

QuantizeLinear: y = saturate(round_half_to_even(x / scale) + zero_point), int8 saturates to
[-128, 127]. DequantizeLinear: (y - zero_point) * scale. Everything here is plain numpy
loops over channels, in float32 like the ONNX operators.
"""

from __future__ import annotations

import numpy as np


def round_half_even(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even, element by element (deliberately slow and obvious)."""
    v = np.asarray(v, dtype=np.float64)
    out = np.empty_like(v)
    flat_in, flat_out = v.reshape(-1), out.reshape(-1)
    for i, x in enumerate(flat_in):
        lo = np.floor(x)
        frac = x - lo
        if frac > 0.5:
            r = lo + 1
        elif frac < 0.5:
            r = lo
        else:  # a tie: pick the even neighbour
            r = lo if lo % 2 == 0 else lo + 1
        flat_out[i] = r
    return out


def fake_quant(x: np.ndarray, scale: float, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """Per-tensor symmetric Q then DQ with zero point 0."""
    scale = np.float32(scale)
    q = round_half_even(np.asarray(x, dtype=np.float32) / scale)
    q = np.minimum(np.maximum(q, qmin), qmax)
    return (q.astype(np.float32) * scale).astype(np.float32)


def per_channel_scales(w: np.ndarray, axis: int) -> np.ndarray:
    """amax/127 per channel along ``axis``; an all-zero channel gets 1.0 (any positive scale keeps 0 at 0)."""
    w = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0)
    scales = []
    for c in range(w.shape[0]):
        amax = float(np.max(np.abs(w[c])))
        scales.append(amax / 127.0 if amax > 0 else 1.0)
    return np.asarray(scales, dtype=np.float32)


def fake_quant_per_channel(w: np.ndarray, axis: int, qmin: int = -127, qmax: int = 127) -> np.ndarray:
    """Symmetric per-channel fake quantization of a weight along ``axis`` (one channel at a time)."""
    scales = per_channel_scales(w, axis)
    moved = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0).copy()
    for c in range(moved.shape[0]):
        moved[c] = fake_quant(moved[c], scales[c], qmin, qmax)
    return np.moveaxis(moved, 0, axis)


def fake_quant_weight_per_tensor(w: np.ndarray) -> np.ndarray:
    amax = float(np.max(np.abs(w)))
    return fake_quant(w, amax / 127.0 if amax > 0 else 1.0, -127, 127)
