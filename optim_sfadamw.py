"""Schedule-free AdamW: no decay schedule, an average of the iterates in its place.

Paper: Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682 (the AlgoPerf self-tuning
track's winner); reference code: the `schedulefree` package's AdamWScheduleFree.

The idea in three lines:
  take an AdamW-like step on a base sequence z, z <- z - lr * (g / (sqrt(v_hat) + eps) + wd * y);
  keep x, the running weighted average of the z's, x <- (1 - c) x + c z: the model is evaluated at x;
  take the gradient at y = (1 - beta1) z + beta1 x, between the two (beta1 plays momentum's part).

Use: python train.py --optimizer=sfadamw --warmup_units=4   (a constant lr after a warm-up in budget units)

The numbers are AdamWScheduleFree's (schedulefree 1.4), in its order: the second moment
v = beta2 v + (1 - beta2) g^2 with AdamW's bias correction (no first moment: the average does its work);
weight decay decoupled from v and taken at y, as the reference does; the weight of step t in the average,
w_t = t^r * lr_max^weight_lr_power, with lr_max the largest lr so far, so that the small steps of the
warm-up count little (c_t = w_t / sum of w_1..w_t); the optimizer's own linear warm-up over warmup_steps
(train.py leaves it off: its loop warms up in budget units).
As in the reference, x is never stored: the parameter holds y while training, and y moves in one step to
y' = (1 - beta1) z' + beta1 x' (the algebra in sfadamw_update). eval() puts x in the parameter,
x = (y - (1 - beta1) z) / beta1, and keeps y; train() puts that y back exactly (the reference recomputes
it from x and z, off by a rounding), so evaluating never changes the run that follows.
"""
import torch
from torch.optim import Optimizer


def average_weight(step, lr_max, weight_sum, r=0.0, weight_lr_power=2.0):
    """The weight c_t of z_t in x_t = (1 - c_t) x_{t-1} + c_t z_t (step t counts from 1), and the new sum of
    weights: c_t = w_t / (w_1 + ... + w_t) with w_t = t^r * lr_max^weight_lr_power (0 while every w is 0)."""
    weight = step ** r * lr_max ** weight_lr_power
    weight_sum += weight
    return (weight / weight_sum if weight_sum > 0 else 0.0), weight_sum


def sfadamw_update(y, grad, z, exp_avg_sq, step, lr, c, beta1, beta2, weight_decay, eps=1e-8):
    """One step for one tensor, in place: y (the parameter), z and exp_avg_sq (v); step t counts from 1.

    With u = g / (sqrt(v / (1 - beta2^t)) + eps) + wd * y, the paper's three updates are
      z' = z - lr u,   x' = (1 - c) x + c z',   y' = (1 - beta1) z' + beta1 x';
    substituting x = (y - (1 - beta1) z) / beta1 gives y' = y + c (z - y) + lr (beta1 (1 - c) - 1) u,
    so x need not be stored."""
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    u = grad / denom
    if weight_decay != 0:
        u.add_(y, alpha=weight_decay)  # decoupled from v, at y (where the gradient was taken)
    y.lerp_(z, c)
    y.add_(u, alpha=lr * (beta1 * (1 - c) - 1))
    z.sub_(u, alpha=lr)


class SFAdamW(Optimizer):
    """Schedule-free AdamW (Defazio et al. 2024). State per parameter: `z`, `exp_avg_sq`, and `y` while at the
    evaluation point; per group: `steps`, `lr_max`, `weight_sum`, `train_mode`. A fresh optimizer is in
    train mode; step() refuses to run at the evaluation point."""

    def __init__(self, params, lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0):
        for name, value in (('lr', lr), ('eps', eps), ('weight_decay', weight_decay), ('warmup_steps', warmup_steps),
                            ('weight_lr_power', weight_lr_power), ('r', r)):
            if not value >= 0:
                raise ValueError(f'{name} must be >= 0, got {value}')
        if not 0.0 < betas[0] < 1.0:  # x = (y - (1 - beta1) z) / beta1: beta1 = 0 leaves x unrecoverable from y
            raise ValueError(f'betas[0] must be in (0, 1), got {betas[0]}')
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f'betas[1] must be in [0, 1), got {betas[1]}')
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      steps=0, lr_max=0.0, weight_sum=0.0, train_mode=True))

    @torch.no_grad()
    def eval(self):
        """Parameters to x, the average (for evaluation, checkpoints, samples); y is kept for train()."""
        for group in (g for g in self.param_groups if g['train_mode']):
            for p in group['params']:
                state = self.state.get(p, {})
                if 'z' in state:
                    state['y'] = p.clone()
                    p.lerp_(state['z'], 1 - 1 / group['betas'][0])  # x = (y - (1 - beta1) z) / beta1
            group['train_mode'] = False

    @torch.no_grad()
    def train(self):
        """Parameters back to y, where gradients are taken: the y eval() kept, bit for bit (a state without
        one, the reference's, gets y = (1 - beta1) z + beta1 x)."""
        for group in (g for g in self.param_groups if not g['train_mode']):
            for p in group['params']:
                state = self.state.get(p, {})
                if 'y' in state:
                    p.copy_(state.pop('y'))
                elif 'z' in state:
                    p.lerp_(state['z'], 1 - group['betas'][0])
            group['train_mode'] = True

    @torch.no_grad()
    def step(self, closure=None):
        if not all(g['train_mode'] for g in self.param_groups):
            raise RuntimeError('SFAdamW.step() with the parameters at the evaluation point x: call optimizer.train() first')
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_group(group)
        return loss

    def step_group(self, group):
        k, warmup = group['steps'], group['warmup_steps']
        t = k + 1
        lr = group['lr'] * (t / warmup if k < warmup else 1.0)  # the optimizer's own linear warm-up
        group['lr_max'] = max(group['lr_max'], lr)
        c, group['weight_sum'] = average_weight(t, group['lr_max'], group['weight_sum'], group['r'],
                                                group['weight_lr_power'])
        beta1, beta2 = group['betas']
        for p in (p for p in group['params'] if p.grad is not None):
            state = self.state[p]
            if 'z' not in state:  # x = y = z at the start
                state['z'] = p.clone(memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            sfadamw_update(p, p.grad, state['z'], state['exp_avg_sq'], t, lr, c, beta1, beta2,
                           group['weight_decay'], group['eps'])
        group['steps'] = t
