"""The loss every model shares: hidden states -> lm_head -> cross entropy, per token, without ever
materializing the (tokens x vocab) fp32 logits: it walks the tokens in chunks.

Two forms: `per_token_loss` gives per-token losses (two passes: the backward recomputes each chunk's
logits; selection methods rank tokens or examples by them), and `weighted_loss` gives sum_t w_t * loss_t
with both gradients computed in the forward from the one read of each chunk's logits (three matmuls, as
eager), for every loss whose weights are known before the forward (the mean, a mask, per-example
weights). The chunk kernels are compiled once per process; a model whose compiled kernels fail falls
back to eager on its own (LossKernels).
"""
import functools
import warnings

import torch

LOSS_CHUNK = 2048   # tokens per chunk of per-token losses: chunk x vocab fp32 logits is the extra memory
FUSED_CHUNK = 1024  # tokens per chunk of the fused loss (studies/bench.py, CPU: fwd+bwd 0.79x eager, 512: 0.82x)


def _upcast(logits):
    """At least fp32 (a bf16 log-sum-exp is too coarse); fp64 stays fp64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_loss(logits, targets):
    """logits (n, V) of one chunk, targets (n,) with -1 = ignore -> loss (n,), lse (n,), at least fp32."""
    logits = _upcast(logits)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets >= 0, lse - target_logit, 0.0), lse


def _dlogits(logits, targets, lse, scale):
    """d(sum_i scale_i * loss_i) / d logits (n, V): softmax minus one-hot, scaled; 0 where ignored. The
    one-hot is a comparison with the vocab index, not a scatter: compiled, the whole expression is one
    pass over the chunk (a scatter splits it into several)."""
    one_hot = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    softmax = torch.exp(_upcast(logits) - lse[:, None])
    return softmax.sub_(one_hot.to(softmax.dtype)).mul_(torch.where(targets >= 0, scale, 0.0)[:, None])  # in place: eager's memory


def _chunk_grad_(logits, targets, lse, scale):
    """Overwrites a chunk's logits with their gradient (one chunk buffer, not two; where the logits are
    bf16 under autocast, the matmuls that read the gradient would round it to bf16 anyway)."""
    logits.copy_(_dlogits(logits, targets, lse, scale))


def _chunk_fused_(logits, targets, weight):
    """Loss and gradient from one read of the logits: returns loss (n,), logits := d(sum_i weight_i *
    loss_i) / d logits."""
    loss, lse = _chunk_loss(logits, targets)
    logits.copy_(_dlogits(logits, targets, lse, weight))
    return loss


def _add_lm_head_grad(grad_w, dlogits, h):
    """grad_w (V, C) += dlogits.T @ h: in place where the dtypes agree (no (V, C) temporary)."""
    if grad_w.dtype == dlogits.dtype == h.dtype:
        torch.addmm(grad_w, dlogits.t(), h, out=grad_w)  # not addmm_: FlopCounterMode counts this one
    else:
        grad_w += dlogits.t() @ h


EAGER_KERNELS = {'loss': _chunk_loss, 'grad': _chunk_grad_, 'fused': _chunk_fused_}


@functools.cache
def compiled_kernels():
    """The chunk kernels compiled once per process, shared by every model (compiling is the cost)."""
    return {name: torch.compile(fn, dynamic=None) for name, fn in EAGER_KERNELS.items()}


class LossKernels:
    """One model's chunk kernels: the shared compiled ones, or eager where compile is off or has failed
    for this model (warned once). A failure is this model's: another's inputs may compile fine."""

    def __init__(self, use_compile=True):
        self.compiled = use_compile

    def __call__(self, name, *args):
        if self.compiled and not torch.compiler.is_compiling():  # in a compiled model: traced into its graph
            try:
                return compiled_kernels()[name](*args)
            except Exception as e:  # an inductor/compiler problem must not stop a run
                self.compiled = False
                warnings.warn(f'torch.compile of the per-token loss failed ({type(e).__name__}: {e}); '
                              f'this model uses the eager kernels')
        return EAGER_KERNELS[name](*args)


def _losses(h, w, targets, chunk, kernels):
    """Per-token losses (N,) and log-sum-exps (N,), a chunk of logits at a time."""
    parts = [kernels('loss', h[i:i + chunk] @ w.t(), targets[i:i + chunk]) for i in range(0, len(h), chunk)]
    return [torch.cat(p) for p in zip(*parts)]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token losses; the backward recomputes each chunk's logits (a 4th matmul: the price of not
    knowing the loss's weights in the forward)."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, kernels):
        loss, lse = _losses(h, w, targets, chunk, kernels)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk, ctx.kernels = chunk, kernels
        device = h.device.type  # the backward runs outside autocast: it must recompute the logits as these were
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, targets, lse = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w, dtype=lse.dtype)
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # fp32 logits against a bf16 lse: wrong softmax
            for i in range(0, len(h), ctx.chunk):
                s = slice(i, i + ctx.chunk)
                logits = h[s] @ w.t()
                ctx.kernels('grad', logits, targets[s], lse[s], grad_loss[s])              # logits := dlogits
                grad_h[s] = logits @ w
                _add_lm_head_grad(grad_w, logits, h[s])
        return grad_h, grad_w.to(w.dtype), None, None, None


class FusedCrossEntropy(torch.autograd.Function):
    """sum_i weight_i * loss_i, with the gradients of h and w computed in the forward from the one read
    of each chunk's logits (3 matmuls, as eager); the backward only scales them by the incoming grad."""

    @staticmethod
    def forward(ctx, h, w, targets, weight, chunk, kernels, sample, grad_enabled):
        need_h, need_w, _, need_weight = (grad_enabled and need for need in ctx.needs_input_grad[:4])
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=_upcast(w).dtype) if need_w else None
        losses = []
        for i in range(0, len(h), chunk):
            s = slice(i, i + chunk)
            logits = h[s] @ w.t()                                                        # (n, V)
            t = targets[s] if sample is None else torch.where(targets[s] >= 0, sample(logits), -1)
            if not (need_h or need_w):
                losses.append(kernels('loss', logits, t)[0])
                continue
            losses.append(kernels('fused', logits, t, weight[s]))                       # logits := dlogits
            if need_h:
                grad_h[s] = logits @ w                                                   # (n, C)
            if need_w:
                _add_lm_head_grad(grad_w, logits, h[s])                                  # (V, C)
        loss = torch.cat(losses)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w.dtype), loss if need_weight else None)
        return (loss * weight).sum()

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w, grad_weight = (None if g is None else grad * g for g in ctx.saved_tensors)
        return grad_h, grad_w, None, grad_weight, None, None, None, None


def per_token_loss(h, w, targets, chunk=LOSS_CHUNK, use_compile=True, kernels=None):
    """Cross entropy of each token, reduction='none': h (N, C) hidden states, w (V, C) the lm_head
    weight, targets (N,) with -1 meaning ignore (loss 0). Returns (N,) in h's dtype promoted to fp32
    (fp64 stays fp64). kernels: the caller's LossKernels, which remembers a compile failure (a model
    passes its own); by default a fresh one as use_compile says."""
    return ChunkedCrossEntropy.apply(h, w, targets, chunk, kernels or LossKernels(use_compile))


def weighted_loss(h, w, targets, weight, chunk=FUSED_CHUNK, use_compile=True, kernels=None, sample=None):
    """sum_i weight_i * loss_i of per_token_loss's losses (a 0-d tensor): weight a float (1/N: the mean)
    or a tensor broadcastable to targets (a mask, per-example weights). With grad enabled the gradients
    come out of the forward (FusedCrossEntropy); under no_grad no gradient work is done. sample(logits
    (n, V)) -> labels (n,): the loss is against labels drawn from the model's own logits where targets
    >= 0 (Sophia's estimator), in the same pass."""
    weight = torch.as_tensor(weight, dtype=_upcast(h).dtype, device=h.device).expand(targets.shape).reshape(-1)
    return FusedCrossEntropy.apply(h, w, targets.reshape(-1), weight, chunk, kernels or LossKernels(use_compile),
                                   sample, torch.is_grad_enabled())

