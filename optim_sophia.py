"""Sophia-G: sign-momentum steps clipped by a cheap diagonal Hessian estimate.

Paper: Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv 2305.14342.

The idea in three lines:
  keep an EMA of gradients m and, every k steps, an EMA h of a diagonal Hessian estimate;
  step by m / h (Newton-like: small steps in sharp directions, large ones in flat directions),
  but clip every coordinate to at most lr, so a tiny or stale h cannot blow up a step.

Use: python train.py --optimizer=sophiag
(authors' GPT-2 small setting: lr 6e-4, rho 0.05, weight decay 0.2, betas (0.965, 0.99), k = 10).

Per parameter, in this order:
  p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  p -= lr * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1).
`win_rate` is the fraction of coordinates NOT clipped, |m| < rho*bs*h (the authors count |m| >= rho*bs*h
as clipped, so a coordinate with m = h = 0 is clipped; they tune rho to keep the rate in 0.1-0.5).

What `bs` means (the question users ask most in the authors' repository): the number of *tokens whose
loss is averaged* in one optimizer step, batch_size * grad_accum * world_size * targets per example
(block_size for GPT, the target length for T5; the authors pass 480 * 1024). Why it is there: the
Gauss-Newton-Bartlett estimate is B * g_hat * g_hat for a mean loss over B tokens (paper, Algorithm 2);
h stores g_hat * g_hat without the B, and the step puts it back as rho * bs * h. So rho and bs trade off:
change the batch and the step changes unless bs follows it. It is a required argument of the
constructor, because the authors' silent default (5120) is wrong for almost every run.

The Hessian estimate is the training loop's every-k-steps hook (HessianHook): after the normal step,
on fresh micro-batches, sample labels from the model's own softmax, backpropagate the mean cross
entropy against them through the same (DDP-wrapped) model and the same gradient accumulation as a
training step, clip that gradient to norm 1, and fold its square into h. It costs one forward and
backward per micro-batch: the model's fused loss draws the labels from each chunk of logits it computes.
"""
import torch
from torch.optim import Optimizer


class SophiaG(Optimizer):
    """Sophia-G (Liu et al. 2023). State per parameter: `exp_avg` (m) and `hessian` (h)."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, *, bs):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not bs > 0:
            raise ValueError(f"bs must be > 0 (tokens averaged per optimizer step), got {bs}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs)
        super().__init__(params, defaults)
        self._stepped = []       # [(group, params)] that the last step updated
        self._win_count = None   # their coordinates not clipped, a tensor, counted when first asked for

    @property
    def win_rate(self):
        """Fraction of coordinates not clipped in the last step; None before the first step. Counted only
        when asked for (the loop logs it on Hessian steps) and before update_hessian changes h, from m and
        h as the step used them; kept as a tensor until read, so counting costs no device sync."""
        total = sum(p.numel() for _, params in self._stepped for p in params)
        if total == 0:
            return None
        return self._count_wins().item() / total

    def _count_wins(self):
        if self._win_count is None:
            self._win_count = sum((self.state[p]["exp_avg"].abs() < g["rho"] * g["bs"] * self.state[p]["hessian"]).sum()
                                  for g, params in self._stepped for p in params)
        return self._win_count

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self):
        """h = b2*h + (1-b2) * grad*grad, for every param with a grad (grad = the GNB estimator's)."""
        if self._stepped:
            self._count_wins()  # the last step's win rate, before h moves on
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                hessians = [self._state(p)["hessian"] for p in params]
                grads = [p.grad for p in params]
                torch._foreach_mul_(hessians, group["betas"][1])
                torch._foreach_addcmul_(hessians, grads, grads, value=1 - group["betas"][1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stepped, self._win_count = [], None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
                self._stepped.append((group, params))
        return loss

    def _update(self, group, params):
        """One group's step, as foreach ops over all its tensors (a few kernels, not a few per tensor).
        sign(m) * min(|m| / d, 1) is computed as clamp(m / d, -1, 1): the same numbers, one buffer fewer."""
        lr, wd, rho, beta1, bs = group["lr"], group["weight_decay"], group["rho"], group["betas"][0], group["bs"]
        states = [self._state(p) for p in params]
        exp_avgs, hessians = [s["exp_avg"] for s in states], [s["hessian"] for s in states]
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, [p.grad for p in params], alpha=1 - beta1)
        denom = torch._foreach_mul(hessians, rho * bs)
        # 1e-15 keeps 0/0 finite; where h = 0 the ratio is clipped to 1 and the step is lr*sign(m).
        torch._foreach_add_(denom, 1e-15)
        ratio = torch._foreach_div(exp_avgs, denom)
        del denom
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(params, ratio, alpha=-lr)


def sample_labels(logits, generator=None):
    """Labels drawn from the model's own softmax, one per token: (..., V) -> (N,)."""
    flat = logits.detach().reshape(-1, logits.size(-1))  # (N, V)
    # At least fp32 for the softmax: bf16 probabilities are too coarse to sample from.
    probs = flat.softmax(-1, dtype=torch.promote_types(flat.dtype, torch.float32))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampled_label_loss(model, inputs, targets, generator=None):
    """Mean cross entropy of a micro-batch against labels sampled from the model's own softmax, over
    the positions whose loss training averages (targets >= 0). One pass through `model` itself (DDP-wrapped
    in a DDP run, so the gradient is all-reduced) on the fused loss path: each chunk's logits are sampled
    from, then scored against the sample, and their gradients computed, while they are in memory."""
    n = (targets >= 0).sum().clamp(min=1)
    return model(*inputs, targets, weight=1.0 / n, sample=lambda logits: sample_labels(logits, generator))


def gnb_hessian_step(optimizer, backward, clip=1.0):
    """Gauss-Newton-Bartlett estimate of diag(H), folded into the optimizer's `hessian` EMA.

    backward(): computes and backpropagates the sampled-label loss of a fresh batch (the loop runs it over
    all micro-batches of a step) and returns it. Sampling y_hat from softmax(logits) and backpropagating
    CE(logits, y_hat) gives a gradient whose square is, in expectation, the Gauss-Newton diagonal
    (Bartlett's identity): no true labels needed. Grads left on the parameters are discarded first, so
    they cannot leak into h; the weights and exp_avg are not touched; the grads are None afterwards.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    loss = backward()
    torch.nn.utils.clip_grad_norm_(params, clip)  # the authors clip it like the training gradient
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)
    return loss


class HessianHook:
    """The loop's every-k-steps hook: runs after the optimizer step when step % every == every - 1,
    as the authors' train_sophiag.py does, and returns what to log (the win rate of the step just taken).
    `charge_as` names the cost-table entry the loop charges for it (None: free, the paper's ablation)."""

    def __init__(self, every, charged=True):
        self.every, self.charge_as = every, 'sophiag' if charged else None

    def __call__(self, optimizer, accumulate, fresh_batch):
        win_rate = optimizer.win_rate
        gnb_hessian_step(optimizer, lambda: accumulate(lambda model: sampled_label_loss(model, *fresh_batch())))
        return {} if win_rate is None else {'win_rate': win_rate}
