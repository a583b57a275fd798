"""The models and the per-token loss that every method shares.

GPT: a pre-LN decoder with causal scaled_dot_product_attention and tied embeddings, with nanoGPT's
parameter names and checkpoint fields, so a nanoGPT checkpoint loads. It exposes what the methods
need: per-token losses instead of a mean (selection methods rank tokens or examples by them), active
layers (stacking and dropping run a subset of blocks), vocabulary logits (Sophia's estimator),
generate, and estimate_mfu.

The per-token loss (hidden states -> lm_head -> cross entropy, reduction='none') is the hot path of
SLM, RHO-LOSS, Selective Backprop and every training step. It never materializes the full
(tokens x vocab) fp32 logits: it walks the tokens in chunks, keeps only each token's log-sum-exp, and
recomputes a chunk's logits in the backward. The chunk kernels are compiled with torch.compile.
"""
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Named size presets. vocab_size is set by the data (256 for the byte tokenizer) unless a preset pins it.
PRESETS = {
    'tiny': dict(n_layer=2, n_head=2, n_embd=64, block_size=64),          # tests
    'small': dict(n_layer=4, n_head=4, n_embd=128, block_size=128),       # the CPU default
    'base': dict(n_layer=8, n_head=8, n_embd=512, block_size=256),        # a bigger CPU / small GPU run
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),     # GPT-2 124M
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


# -----------------------------------------------------------------------------
# the per-token loss

LOSS_CHUNK = 2048  # tokens per chunk: chunk x vocab fp32 logits is the peak extra memory


def _chunk_loss(h, w, targets):
    """h (n, C), w (V, C), targets (n,) with -1 = ignore -> loss (n,) fp32, lse (n,) fp32."""
    logits = (h @ w.t()).float()                                   # (n, V)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets >= 0, lse - target_logit, 0.0), lse


def _chunk_grad(h, w, targets, lse, grad_loss):
    """d(sum_i grad_loss_i * loss_i) / (h, w) for one chunk: softmax minus one-hot, scaled."""
    logits = (h @ w.t()).float()                                   # (n, V), recomputed
    dlogits = torch.exp(logits - lse[:, None])
    dlogits.scatter_add_(1, targets.clamp(min=0)[:, None], -torch.ones_like(lse)[:, None])
    dlogits = dlogits * torch.where(targets >= 0, grad_loss, 0.0)[:, None]
    dlogits = dlogits.to(h.dtype)
    return dlogits @ w, dlogits.t() @ h                            # (n, C), (V, C)


class _Kernels:
    """The chunk kernels, compiled on first use; eager (with a warning) where compile fails."""

    def __init__(self):
        self.compiled = None

    def get(self, use_compile):
        if not use_compile:
            return _chunk_loss, _chunk_grad
        if self.compiled is None:
            self.compiled = (torch.compile(_chunk_loss, dynamic=None), torch.compile(_chunk_grad, dynamic=None))
        return self.compiled

    def fall_back(self, error):
        warnings.warn(f'torch.compile of the per-token loss failed ({type(error).__name__}: {error}); '
                      f'using the eager kernels')
        self.compiled = (_chunk_loss, _chunk_grad)


KERNELS = _Kernels()


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk, use_compile):
        fwd, bwd = KERNELS.get(use_compile)
        try:
            parts = [fwd(h[i:i + chunk], w, targets[i:i + chunk]) for i in range(0, len(h), chunk)]
        except Exception as e:  # an inductor/compiler problem must not stop a run
            if not use_compile or fwd is _chunk_loss:
                raise
            KERNELS.fall_back(e)
            return ChunkedCrossEntropy.forward(ctx, h, w, targets, chunk, use_compile)
        loss, lse = (torch.cat(p) for p in zip(*parts))
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk, ctx.bwd = chunk, bwd
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, targets, lse = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i in range(0, len(h), ctx.chunk):
            s = slice(i, i + ctx.chunk)
            dh, dw = ctx.bwd(h[s], w, targets[s], lse[s], grad_loss[s])
            grad_h[s] = dh
            grad_w += dw
        return grad_h, grad_w.to(w.dtype), None, None, None


def per_token_loss(h, w, targets, chunk=LOSS_CHUNK, use_compile=True):
    """Cross entropy of each token, reduction='none': h (N, C) hidden states, w (V, C) the lm_head
    weight, targets (N,) with -1 meaning ignore (loss 0). Returns (N,) fp32."""
    return ChunkedCrossEntropy.apply(h, w, targets, chunk, use_compile)


# -----------------------------------------------------------------------------
# GPT

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(cfg.n_embd, cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = LayerNorm(cfg.n_embd, cfg.bias), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.active_layers = list(range(cfg.n_layer))
        self.compile_loss = True  # the training loop turns this off with --compile_loss=False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2: residual projections scaled by 1/sqrt(2L)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_layer(self):
        return self.config.n_layer

    def set_active_layers(self, layers):
        """Run only these blocks (a count n = the first n, or a list of indices), in order."""
        layers = list(range(layers)) if isinstance(layers, int) else sorted(layers)
        assert layers and all(0 <= i < self.config.n_layer for i in layers), layers
        self.active_layers = layers

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx):
        """idx (B, T) token ids -> (B, T, C) final hidden states through the active blocks."""
        T = idx.size(1)
        assert T <= self.config.block_size, f'sequence of {T} tokens > block_size {self.config.block_size}'
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i in self.active_layers:
            x = self.transformer.h[i](x)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """With targets: per-token losses (B, T) fp32. Without: logits of the last position (B, 1, V)."""
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h[:, [-1], :])
        B, T, C = h.shape
        return per_token_loss(h.view(B * T, C), self.lm_head.weight, targets.reshape(B * T),
                              use_compile=self.compile_loss).view(B, T)

    def logits(self, idx):
        """Full vocabulary logits (B, T, V), for the rare user who needs them (Sophia's estimator)."""
        return self.lm_head(self.hidden(idx))

    def flops_per_token(self, n_active=None, seq_len=None):
        """Forward+backward FLOPs per token at n_active blocks (PaLM appendix B, as nanoGPT)."""
        cfg = self.config
        L = len(self.active_layers) if n_active is None else n_active
        T = cfg.block_size if seq_len is None else seq_len
        per_block = sum(p.numel() for p in self.transformer.h[0].parameters())
        matmul_params = L * per_block + cfg.vocab_size * cfg.n_embd
        return 6 * matmul_params + 12 * L * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        return self.flops_per_token() * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Build from a checkpoint dict (ours or nanoGPT's: model_args + model state dict)."""
        args = {k: ckpt['model_args'][k] for k in GPTConfig.__dataclass_fields__ if k in ckpt['model_args']}
        model = cls(GPTConfig(**args))
        state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
        state = {k: v for k, v in state.items() if not k.endswith('.attn.bias')}  # nanoGPT's causal-mask buffer
        model.load_state_dict(state)
        return model


# -----------------------------------------------------------------------------
# peak FLOP/s for MFU

GPU_BF16_PEAK = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, '4090': 165e12}


def measure_cpu_peak(dtype=torch.float32, n=1024, repeats=5):
    """The matmul FLOP/s this CPU reaches on an n x n matmul: the honest 'peak' for a CPU MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def device_peak_flops(device):
    """Dense bf16 peak of a known GPU; a measured fp32 matmul peak on a CPU."""
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak
        warnings.warn(f'unknown GPU {name}: MFU uses 312 TFLOP/s; set --peak_flops')
        return 312e12
    return measure_cpu_peak()
