"""RepDistiller's CRD arithmetic, restated plainly: the yardstick for tests and benchmarks.

``PlainCRD`` gathers the ``(B, K+1, d)`` rows of each bank, scores them with ``bmm``, takes
``exp``, divides by a ``Z`` set once from the first batch, applies Eq. 18 and updates the banks
with ``index_copy_``, step for step as ``crd/memory.py`` and ``crd/criterion.py`` do. It shares
no code path with :class:`losses.crd.CRDLoss`; it starts from a copy of one's heads and banks.
"""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7


class PlainCRD:
    """The reference formulation, initialised from a ``CRDLoss`` state dict.

    Attributes ``w_s, b_s, w_t, b_t`` (heads, leaf tensors with gradients), ``memory_v1``
    (student bank), ``memory_v2`` (teacher bank), ``z_v1`` and ``z_v2`` (-1 until set).
    """

    def __init__(self, state: dict[str, Tensor], n_data: int, nce_t: float = 0.07, nce_m: float = 0.5) -> None:
        self.w_s = state["embed_s.linear.weight"].detach().clone().requires_grad_()
        self.b_s = state["embed_s.linear.bias"].detach().clone().requires_grad_()
        self.w_t = state["embed_t.linear.weight"].detach().clone().requires_grad_()
        self.b_t = state["embed_t.linear.bias"].detach().clone().requires_grad_()
        self.memory_v1 = state["memory.student_bank"].detach().float().clone()
        self.memory_v2 = state["memory.teacher_bank"].detach().float().clone()
        self.z_v1 = -1.0
        self.z_v2 = -1.0
        self.n, self.t, self.m = n_data, nce_t, nce_m

    @staticmethod
    def _embed(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        y = x.flatten(1) @ w.T + b
        return y / y.pow(2).sum(1, keepdim=True).pow(0.5)

    def _contrast_loss(self, x: Tensor) -> Tensor:
        bsz, m = x.shape[0], x.shape[1] - 1
        pn = 1.0 / self.n
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + EPS))
        log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + EPS))
        return -(log_d1.sum() + log_d0.sum()) / bsz

    def __call__(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        v1 = self._embed(f_s, self.w_s, self.b_s)
        v2 = self._embed(f_t, self.w_t, self.b_t)
        bsz, kp1 = contrast_idx.shape
        weight_v1 = torch.index_select(self.memory_v1, 0, contrast_idx.reshape(-1)).view(bsz, kp1, -1)
        out_v2 = torch.exp(torch.bmm(weight_v1, v2[:, :, None]) / self.t)[..., 0]
        weight_v2 = torch.index_select(self.memory_v2, 0, contrast_idx.reshape(-1)).view(bsz, kp1, -1)
        out_v1 = torch.exp(torch.bmm(weight_v2, v1[:, :, None]) / self.t)[..., 0]
        if self.z_v1 < 0:
            self.z_v1 = (out_v1.mean() * self.n).item()
        if self.z_v2 < 0:
            self.z_v2 = (out_v2.mean() * self.n).item()
        loss = self._contrast_loss(out_v1 / self.z_v1) + self._contrast_loss(out_v2 / self.z_v2)
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = memory[idx] * self.m + v * (1 - self.m)
                memory.index_copy_(0, idx, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
        return loss
