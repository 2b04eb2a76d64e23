"""Batch norm over the global batch when several processes train one model.

With P processes each holding B/P samples, plain BatchNorm normalises with the statistics of
its own slice, so two processes at global batch B would not train like one process at batch B.
``torch.nn.SyncBatchNorm`` fixes that on GPUs only; ``GlobalBatchNorm`` does the same on any
device by all-reducing per-channel sums (differentiably, so the backward pass also sees the
global batch). Outside training, or with one process, it is exactly ``nn.BatchNorm``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) of the gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every process's share of the batch."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (B, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        # Two passes, like nn.BatchNorm: the global mean first, then the global sum of squared
        # deviations. The one-pass E[x^2] - E[x]^2 cancels catastrophically for a channel whose
        # spread is small against its mean, and rsqrt(var + eps) amplifies the error. Sums are
        # accumulated in float64 (per-channel scalars: free) so their order does not matter.
        count = torch.tensor([x.numel() / channels], device=x.device, dtype=torch.float64)
        packed = _SumOverProcesses.apply(torch.cat([x.sum(dims, dtype=torch.float64), count]))
        total = packed[-1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        mean = (packed[:channels] / total).to(x.dtype)
        centred = x - mean.view(shape)
        var = (_SumOverProcesses.apply((centred * centred).sum(dims, dtype=torch.float64)) / total).to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Swap every BatchNorm of ``module`` for one that uses the global batch (in place).

    On CUDA this is torch's ``SyncBatchNorm``; elsewhere :class:`GlobalBatchNorm`. Parameters and
    buffers are carried over, so state-dict keys and values are unchanged.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            # Take over the very tensors (as SyncBatchNorm's converter does): same device, dtype
            # and identity, so an optimizer built on the old parameters still updates them.
            for key, param in child.named_parameters(recurse=False):
                setattr(replacement, key, param)
            for key, buffer in child.named_buffers(recurse=False):
                setattr(replacement, key, buffer)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child, device_type)
    return module
