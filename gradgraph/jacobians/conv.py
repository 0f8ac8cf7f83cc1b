"""Convolutions wrt their input, referencing the weight, with their (max, x) kernel (the sum
products are torch's convolutions)."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from ._intrinsics import transform
from .base import Jacobian, _empty_max, _numel, max_dtype

# ----------------------------------------------------------------------------- convolution
@njit(cache=True)
def conv_max(src_max, src_min, W, stride, pad, dil, groups, transpose, signed, dst_max, dst_min):
    """(max, x) through a 2-d convolution wrt its input.

    Arrays are (N, C, H, W). With ``transpose`` the source is the output gradient (N, Co, OH, OW)
    and the destination the input (N, Ci, H, W); otherwise the reverse.
    """
    Co, Cig, KH, KW = W.shape
    if transpose:
        N, _, OH, OW = src_max.shape
        _, Ci, H, Wd = dst_max.shape
    else:
        N, Ci, H, Wd = src_max.shape
        _, _, OH, OW = dst_max.shape
    cog = Co // groups
    for n in range(N):
        for co in range(Co):
            g = co // cog
            for oh in range(OH):
                for ow in range(OW):
                    for cl in range(Cig):
                        ci = g * Cig + cl
                        for kh in range(KH):
                            ih = oh * stride[0] - pad[0] + kh * dil[0]
                            if ih < 0 or ih >= H:
                                continue
                            for kw in range(KW):
                                iw = ow * stride[1] - pad[1] + kw * dil[1]
                                if iw < 0 or iw >= Wd:
                                    continue
                                w = W[co, cl, kh, kw]
                                if w == 0.0:
                                    continue
                                if transpose:
                                    smax = src_max[n, co, oh, ow]
                                    smin = src_min[n, co, oh, ow]
                                else:
                                    smax = src_max[n, ci, ih, iw]
                                    smin = src_min[n, ci, ih, iw]
                                if signed:
                                    if smax == -np.inf:
                                        continue
                                    if w > 0:
                                        hi = w * smax
                                        lo = w * smin
                                    else:
                                        hi = w * smin
                                        lo = w * smax
                                else:
                                    hi = abs(w) * smax
                                    lo = hi
                                if transpose:
                                    if hi > dst_max[n, ci, ih, iw]:
                                        dst_max[n, ci, ih, iw] = hi
                                    if signed and lo < dst_min[n, ci, ih, iw]:
                                        dst_min[n, ci, ih, iw] = lo
                                else:
                                    if hi > dst_max[n, co, oh, ow]:
                                        dst_max[n, co, oh, ow] = hi
                                    if signed and lo < dst_min[n, co, oh, ow]:
                                        dst_min[n, co, oh, ow] = lo




# ============================================================================ convolution
class ConvJacobian(Jacobian):
    """N-d convolution (1-d or 2-d) wrt its input, referencing the weight.

    The edge (n, ci, ih, iw) -> (n, co, oh, ow) has weight ``W[co, ci mod Cin/groups, kh, kw]``
    when ``ih = oh*stride - pad + kh*dilation`` (and likewise for w).
    """

    kind = "conv"

    def __init__(self, out_shape, in_shape, weight, stride, padding, dilation, groups):
        super().__init__(out_shape, in_shape)
        self.weight = weight
        self.spatial = weight.ndim - 2
        if self.spatial not in (1, 2) or len(self.in_shape) != self.spatial + 2:
            raise ValueError("ConvJacobian supports batched 1-d and 2-d convolutions")
        self.stride, self.padding, self.dilation = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
        self.groups = int(groups)
        lift = (lambda t: (1,) + tuple(t)) if self.spatial == 1 else tuple
        lift0 = (lambda t: (0,) + tuple(t)) if self.spatial == 1 else tuple
        self._W = weight.reshape(weight.shape[:2] + (1,) + weight.shape[2:]) if self.spatial == 1 else weight
        self._in4 = self.in_shape[:2] + lift(self.in_shape[2:]) if self.spatial == 1 else self.in_shape
        self._out4 = self.out_shape[:2] + lift(self.out_shape[2:]) if self.spatial == 1 else self.out_shape
        self._s, self._p, self._d = lift(self.stride), lift0(self.padding), lift(self.dilation)

    def sum_product(self, x, weight, transpose):
        C = x.shape[0]
        Wt = torch.from_numpy(np.ascontiguousarray(transform(self._W, weight)))
        src_shape = self._out4 if transpose else self._in4
        # float64, as the transformed weights (a float32 pass's values are widened; the result is float64)
        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape((C * src_shape[0],) + src_shape[1:])
        if transpose:
            size = (C * self._in4[0],) + self._in4[1:]
            y = torch.nn.grad.conv2d_input(size, Wt, xs, self._s, self._p, self._d, self.groups)
        else:
            y = torch.nn.functional.conv2d(xs, Wt, None, self._s, self._p, self._d, self.groups)
        return y.reshape(C, -1).numpy()

    def max_product(self, xmax, xmin, transpose):
        signed = xmin is not None
        src_shape, dst_shape = (self._out4, self._in4) if transpose else (self._in4, self._out4)
        n = _numel(dst_shape)
        ymax, ymin = _empty_max(n, signed, max_dtype(xmax))
        smax = xmax.reshape(src_shape)
        smin = (xmin if signed else xmax).reshape(src_shape)
        dmin = ymin if signed else np.zeros(1)
        conv_max(smax, smin, np.ascontiguousarray(self._W), np.array(self._s), np.array(self._p),
                   np.array(self._d), self.groups, transpose, signed, ymax.reshape(dst_shape),
                   dmin.reshape(dst_shape) if signed else np.zeros((1, 1, 1, 1)))
        return ymax, ymin

    def out_edges(self, j):
        N, Ci, H, Wd = self._in4
        _, Co, OH, OW = self._out4
        Co_, Cig, KH, KW = self._W.shape
        n, ci, ih, iw = np.unravel_index(j, self._in4)
        g = ci // Cig
        cl = ci % Cig
        cog = Co // self.groups
        idx, ws = [], []
        for kh in range(KH):
            num_h = ih + self._p[0] - kh * self._d[0]
            if num_h % self._s[0]:
                continue
            oh = num_h // self._s[0]
            if not 0 <= oh < OH:
                continue
            for kw in range(KW):
                num_w = iw + self._p[1] - kw * self._d[1]
                if num_w % self._s[1]:
                    continue
                ow = num_w // self._s[1]
                if not 0 <= ow < OW:
                    continue
                for co in range(g * cog, (g + 1) * cog):
                    w = float(self._W[co, cl, kh, kw])
                    if w != 0.0:
                        idx.append(np.ravel_multi_index((n, co, oh, ow), self._out4))
                        ws.append(w)
        order = np.argsort(idx, kind="stable")
        return np.asarray(idx, dtype=np.int64)[order], np.asarray(ws, dtype=np.float64)[order]

    def state(self):
        return ({"stride": list(self.stride), "padding": list(self.padding),
                 "dilation": list(self.dilation), "groups": self.groups}, {"weight": self.weight})

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, in_shape, arrays["weight"], params["stride"], params["padding"],
                   params["dilation"], params["groups"])


