"""Lion: the sign-of-momentum optimizer.

Paper: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675.

The idea in three lines:
  interpolate the momentum and the fresh gradient, c = b1*m + (1-b1)*g;
  step every coordinate by the same amount, lr * sign(c) (no second moment, no eps, no bias correction);
  only then update the momentum with a slower rate, m = b2*m + (1-b2)*g.

Use: python train.py --optimizer=lion --lr=1e-4 --weight_decay=0.3 --beta2=0.99   (the paper's betas: 0.9, 0.99)
(the paper's guidance: lr 3-10x smaller and weight decay 3-10x larger than AdamW's, because every
sign step has unit size per coordinate).

Weight decay is decoupled and scaled by the *current* lr: p *= 1 - lr*wd, applied to the pre-step
weights, as in the paper's algorithm box and lucidrains/lion-pytorch. Some libraries divide wd by the
initial lr instead (decay independent of the schedule); this file does not.

rms_scale=True (off by default) scales the step of each tensor by max(1e-3, rms(p)), with p measured
before the step, as No Train No Gain's T5 runs did for AdamW (Adafactor's relative step size);
weight decay keeps the plain lr.
"""
import torch
from torch.optim import Optimizer


def _step_size(p, lr, rms_scale):
    if not rms_scale:
        return lr
    # Relative step: a tensor moves in proportion to its own scale; the floor keeps zero-init tensors moving.
    # (Norm accumulated in at least fp32: a bf16 sum of squares over a large matrix loses digits.)
    rms = torch.linalg.vector_norm(p, dtype=torch.promote_types(p.dtype, torch.float32)) / p.numel() ** 0.5
    return rms.clamp(min=1e-3) * lr


def lion_update(p, grad, exp_avg, lr, beta1, beta2, weight_decay, rms_scale=False):
    """One Lion step for one tensor, in place, in the paper's order."""
    step_size = _step_size(p, lr, rms_scale)
    if lr * weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    c = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    p.sub_(c.sign_().mul_(step_size))
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def lion_update_foreach(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, rms_scale=False):
    """The same step for a list of tensors with torch._foreach_* ops (fewer kernel launches).

    Every op is the elementwise twin of one in lion_update, so the results are identical.
    """
    step_sizes = [_step_size(p, lr, rms_scale) for p in params] if rms_scale else lr
    if lr * weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, grads, alpha=1 - beta1)
    torch._foreach_sign_(c)
    torch._foreach_mul_(c, step_sizes)
    torch._foreach_sub_(params, c)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def _can_foreach(params, grads):
    # foreach kernels need one device and dense grads; anything else takes the per-tensor path.
    return len({p.device for p in params}) == 1 and not any(g.is_sparse for g in grads)


class Lion(Optimizer):
    """Lion (Chen et al. 2023). State per parameter: `exp_avg` (the momentum m)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, rms_scale=False, foreach=None):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                        rms_scale=rms_scale, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            exp_avgs = [self._exp_avg(p) for p in params]
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2,
                         weight_decay=group["weight_decay"], rms_scale=group["rms_scale"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = _can_foreach(params, grads)
            if foreach:
                lion_update_foreach(params, grads, exp_avgs, **hyper)
            else:
                for p, g, m in zip(params, grads, exp_avgs):
                    lion_update(p, g, m, **hyper)
        return loss

    def _exp_avg(self, p):
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["exp_avg"]
