"""Sophia-G: sign-momentum steps clipped by a cheap diagonal Hessian estimate.

Paper: Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv 2305.14342.

The idea in three lines:
  keep an EMA of gradients m and, every k steps, an EMA h of a diagonal Hessian estimate;
  step by m / h (Newton-like: small steps in sharp directions, large ones in flat directions),
  but clip every coordinate to at most lr, so a tiny or stale h cannot blow up a step.

Use: python train.py --optimizer=sophiag
(authors' GPT-2 small setting: lr 6e-4, rho 0.05, weight decay 0.2, betas (0.965, 0.99), k = 10).

What `bs` means (the question users ask most in the authors' repository): the number of *tokens* per
optimizer step, batch_size * block_size * grad_accum * world_size (the authors pass 480 * 1024).
Why it is there: the Gauss-Newton-Bartlett estimate is B * g_hat * g_hat for a mean loss over B tokens
(paper, Algorithm 2); h stores g_hat * g_hat without the B, and the step puts it back as rho * bs * h.
So rho and bs trade off: change the batch and the step changes unless bs follows it. It is a required
argument of step() here, because the authors' silent default (5120) is wrong for almost every run.

Per parameter, in this order:
  p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  p -= lr * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1).
`win_rate` is the fraction of coordinates whose ratio is below 1, i.e. NOT clipped (the authors tune
rho to keep it in 0.1-0.5).

The Hessian estimate (gnb_hessian_step) is a hook the one training loop calls; see its docstring.
"""
import torch
import torch.nn.functional as F
from torch.optim import Optimizer


class SophiaG(Optimizer):
    """Sophia-G (Liu et al. 2023). State per parameter: `exp_avg` (m) and `hessian` (h)."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._win_count = None  # tensor: coordinates not clipped in the last step (read via win_rate)
        self._win_total = 0

    @property
    def win_rate(self):
        """Fraction of coordinates not clipped in the last step; None before the first step.

        Kept as a tensor until read, so a step costs no device sync unless someone logs it.
        """
        if self._win_count is None or self._win_total == 0:
            return None
        return self._win_count.item() / self._win_total

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self):
        """h = b2*h + (1-b2) * grad*grad, for every param with a grad (grad = the GNB estimator's)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p)["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs, closure=None):
        """One Sophia-G step. bs: tokens per optimizer step (see the module docstring)."""
        if not bs > 0:
            raise ValueError(f"bs must be > 0 (tokens per optimizer step), got {bs}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        win_counts, total = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                win_counts.append(self._update(p, group, bs))
                total += p.numel()
        if win_counts:
            device = win_counts[0].device
            self._win_count = torch.stack([c.to(device) for c in win_counts]).sum()
            self._win_total = total
        return loss

    def _update(self, p, group, bs):
        state = self._state(p)
        exp_avg, hessian = state["exp_avg"], state["hessian"]
        lr, wd, rho, beta1 = group["lr"], group["weight_decay"], group["rho"], group["betas"][0]
        p.mul_(1 - lr * wd)
        exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        # 1e-15 keeps 0/0 finite; where h = 0 the ratio is clipped to 1 and the step is lr*sign(m).
        ratio = (exp_avg.abs() / (rho * bs * hessian + 1e-15)).clamp_(max=1)
        p.addcmul_(exp_avg.sign(), ratio, value=-lr)
        return (ratio < 1).sum()


def sample_labels(logits, generator=None):
    """Labels drawn from the model's own softmax, one per token: (..., V) -> (N,)."""
    flat = logits.detach().reshape(-1, logits.size(-1))  # (N, V)
    # At least fp32 for the softmax: bf16 probabilities are too coarse to sample from.
    probs = flat.softmax(-1, dtype=torch.promote_types(flat.dtype, torch.float32))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def gnb_hessian_step(optimizer, logits_fn, generator=None, clip=1.0):
    """Gauss-Newton-Bartlett estimate of diag(H), folded into optimizer's `hessian` EMA.

    logits_fn(): runs the model forward on a *fresh* batch with grad enabled and returns logits (..., V).
    Sampling y_hat from softmax(logits) and backpropagating CE(logits, y_hat) gives a gradient whose
    square is, in expectation, the Gauss-Newton diagonal (Bartlett's identity) -- no true labels needed.

    Call it AFTER the normal optimizer.step(bs) when iter % hess_interval == hess_interval - 1
    (hess_interval = k = 10 in the paper), as the authors' train_sophiag.py does. Any grads still on the
    parameters are discarded first (zero_grad(set_to_none=True)) so they cannot leak into h; therefore
    never call it in the middle of gradient accumulation. Weights and exp_avg are not touched; the
    grads are None afterwards. Returns the sampled-label loss (float, one sync).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    logits = logits_fn()  # (..., V)
    y_hat = sample_labels(logits, generator)  # (N,)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y_hat)  # mean over tokens
    loss.backward()
    # The authors clip this gradient to norm 1 before the EMA, like the training gradient.
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
