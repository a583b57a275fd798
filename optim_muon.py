"""Muon: momentum orthogonalised by Newton-Schulz, for the hidden matrices of a network.

Paper: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon; the NanoGPT speedrun's optimizer); its scale-up and the
'match_rms_adamw' scale: Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982.

The idea in three lines:
  keep a momentum of each 2-D hidden weight's gradient, M = mu*M + (1-mu)*G (Nesterov: U = (1-mu)*G + mu*M);
  replace U by its nearest semi-orthogonal matrix (U = P S Q^T -> P Q^T) with five Newton-Schulz steps;
  so every direction of the update moves by the same amount: W -= lr * scale(A, B) * O.

Use: python train.py --optimizer=muon --muon_lr=0.02   (embeddings, the head, norms and biases: AdamW at --lr)

The numbers are torch.optim.Muon's (torch >= 2.9), op for op: the momentum by lerp; Newton-Schulz in
bfloat16 (as Jordan's code), on the wide orientation, from X / max(||X||_F, eps); decoupled weight decay by
the current lr, W *= 1 - lr*wd, before the step. One departure, a key: ns_dtype, the Newton-Schulz dtype.
train.py passes float32 on a CPU, where bfloat16 matrix products are emulated at many times float32's time:
charged in RST, a bfloat16 iteration would bill Muon for the CPU's missing bfloat16 units, not for its
algorithm. The scale by shape (A rows, B columns) is a key of SCALES:
'original' (the default, Jordan's and torch's: sqrt(max(1, A/B))) or 'match_rms_adamw' (Liu et al.:
0.2*sqrt(max(A, B)), an update of AdamW's RMS, so AdamW's lr and weight decay carry over).
MuonWithAdamW is the one optimizer a whole model needs: Muon on the groups marked 'muon': True, AdamW
(torch.optim.AdamW's arithmetic) on every other group.
"""
import math

import torch
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c): the steepest slope at 0 that still lands near 1
SCALES = {
    'original': lambda A, B: math.sqrt(max(1, A / B)),          # Jordan 2024; torch's default
    'match_rms_adamw': lambda A, B: 0.2 * math.sqrt(max(A, B)),  # Liu et al. 2025: AdamW's update RMS
}


def newton_schulz5(U, steps=5, eps=1e-7, coefficients=NS_COEFFICIENTS, dtype=torch.bfloat16):
    """About P Q^T of U = P S Q^T: the quintic X -> a X + (b S + c S^2) X, S = X X^T, moves each singular
    value that is not tiny into about [0.7, 1.2] rather than to exactly 1 (fewer steps; Jordan found no
    loss from it). In `dtype` (bfloat16, as Jordan's code: the iteration tolerates its rounding) and on
    the wide orientation, so that S is the smaller Gram matrix; the result is in `dtype`."""
    a, b, c = coefficients
    tall = U.size(0) > U.size(1)
    X = U.to(dtype).T if tall else U.to(dtype)  # (rows <= cols)
    X = X / X.norm().clamp(min=eps)  # ||X||_F >= ||X||_2: every singular value <= 1. Not in place: a bf16 U is X.
    for _ in range(steps):
        S = X @ X.T                                                  # (rows, rows)
        X = torch.addmm(X, torch.addmm(S, S, S, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


def muon_update(p, grad, momentum_buffer, lr, wd, mu=0.95, nesterov=True, scale='original', ns_steps=5, ns_eps=1e-7,
                ns_dtype=torch.bfloat16):
    """One Muon step for one 2-D tensor (A, B), in place, in torch.optim.Muon's order."""
    momentum_buffer.lerp_(grad, 1 - mu)                                  # M = mu*M + (1-mu)*G
    U = grad.lerp(momentum_buffer, mu) if nesterov else momentum_buffer  # (1-mu)*G + mu*M
    O = newton_schulz5(U, ns_steps, ns_eps, dtype=ns_dtype)
    if lr * wd != 0:
        p.mul_(1 - lr * wd)
    p.add_(O, alpha=-lr * SCALES[scale](*p.shape))


def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, wd, eps=1e-8):
    """One AdamW step (step counts from 1) for the parameters Muon does not take, in place, in
    torch.optim.AdamW's order and arithmetic."""
    if lr * wd != 0:
        p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def _check(lr, weight_decay, momentum, scale, ns_steps):
    for name, value in (('lr', lr), ('weight_decay', weight_decay)):
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not (isinstance(ns_steps, int) and ns_steps >= 1):
        raise ValueError(f"ns_steps must be a positive int, got {ns_steps}")


class Muon(Optimizer):
    """Muon for 2-D parameters only (torch.optim.Muon's numbers). State per parameter: `momentum_buffer`."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, scale='original',
                 ns_steps=5, ns_eps=1e-7, ns_dtype=torch.bfloat16):
        _check(lr, weight_decay, momentum, scale, ns_steps)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      scale=scale, ns_steps=ns_steps, ns_eps=ns_eps, ns_dtype=ns_dtype))

    def steps_muon(self, group):
        return True  # every group: Muon takes matrices only

    def add_param_group(self, param_group):
        if self.steps_muon(param_group):  # refused before the group is added
            params = param_group['params']
            param_group['params'] = params = [params] if isinstance(params, torch.Tensor) else list(params)
            shapes = [tuple(p.shape) for p in params if p.dim() != 2]
            if shapes:
                raise ValueError(f'Muon steps 2-D weights only, got a parameter of shape {shapes[0]}: give '
                                 f'embeddings, the head, norms and biases to AdamW (MuonWithAdamW does both)')
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_group(group)
        return loss

    def step_group(self, group):
        for p in (p for p in group['params'] if p.grad is not None):
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            muon_update(p, p.grad, state['momentum_buffer'], group['lr'], group['weight_decay'], group['momentum'],
                        group['nesterov'], group['scale'], group['ns_steps'], group['ns_eps'],
                        group.get('ns_dtype', torch.bfloat16))  # a checkpoint of before the key: torch's


class MuonWithAdamW(Muon):
    """One optimizer for a whole model: Muon on the groups marked 'muon': True (hidden matrices, at their
    own lr, muon_lr unless the group sets one), AdamW on every other group (embeddings, the head, norms'
    gains, biases). AdamW state per parameter: `step`, `exp_avg`, `exp_avg_sq`, as torch's."""

    def __init__(self, params, lr=1e-3, muon_lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 momentum=0.95, nesterov=True, scale='original', ns_steps=5, ns_eps=1e-7, ns_dtype=torch.bfloat16):
        _check(muon_lr, weight_decay, momentum, scale, ns_steps)
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        params = list(params)
        if params and isinstance(params[0], dict):  # a Muon group's lr is muon_lr unless it sets one
            params = [{'lr': muon_lr, **g} if g.get('muon') else g for g in params]
        Optimizer.__init__(self, params, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, muon=False,
            momentum=momentum, nesterov=nesterov, scale=scale, ns_steps=ns_steps, ns_eps=ns_eps, ns_dtype=ns_dtype))

    def steps_muon(self, group):
        return bool(group.get('muon'))

    def step_group(self, group):
        if group['muon']:
            return super().step_group(group)
        beta1, beta2 = group['betas']
        for p in (p for p in group['params'] if p.grad is not None):
            state = self.state[p]
            if 'step' not in state:  # torch's layout: a float32 step on the CPU, moments like p
                state['step'] = torch.tensor(0.0)
                state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['step'] += 1
            adamw_update(p, p.grad, state['exp_avg'], state['exp_avg_sq'], state['step'].item(), group['lr'],
                         beta1, beta2, group['weight_decay'], group['eps'])
