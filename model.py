"""The models every method shares.

GPT: a pre-LN decoder with causal scaled_dot_product_attention and tied embeddings, with nanoGPT's
parameter names and checkpoint fields, so a nanoGPT checkpoint loads. It exposes what the methods need:
per-token losses (selection methods rank tokens or examples by them), active layers (stacking and
dropping run a subset of blocks: arch.py), generate (with a KV cache, the one decoder evaluation and
sampling share) and estimate_mfu. T5-lite: T5 v1.1 in miniature (Raffel et al. 2020, arXiv 1910.10683),
an encoder-decoder of the same Block (RMSNorm, gated-GELU, a relative position bias per block), trained
on span corruption (data/spans.py), with the same loss, active layers, generate and estimate_mfu.

Both end in loss.py's chunked cross entropy, which never materializes the (tokens x vocab) fp32 logits:
`model(x, y)` gives per-token losses, `model(x, y, weight=w)` the fused sum_t w_t * loss_t. evaluate (the
mean loss on fixed examples) and sample_text (a prompt's continuation, as text) serve either model.
"""
import contextlib
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.spans import raw_length_for, span_vocab, t5_lengths
from loss import LossKernels, per_token_loss, weighted_loss

# Named size presets. vocab_size is set by the data (256 for the byte tokenizer; T5-lite adds sentinels).
PRESETS = {
    'tiny': dict(n_layer=2, n_head=2, n_embd=64, block_size=64),          # tests
    'small': dict(n_layer=4, n_head=4, n_embd=128, block_size=128),       # the CPU default
    'base': dict(n_layer=8, n_head=8, n_embd=512, block_size=256),        # a bigger CPU / small GPU run
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),     # GPT-2 124M
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    # T5-lite (model_type='t5'): n_layer blocks in the encoder and as many in the decoder; block_size =
    # the encoder's input length (its raw chunk is longer: data.spans.raw_length_for)
    't5-tiny': dict(n_layer=2, n_head=2, n_embd=64, block_size=32),       # tests
    't5-small-cpu': dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # the CPU default
    't5-small': dict(n_layer=8, n_head=8, n_embd=512, block_size=512),    # T5 v1.1 small's depth and width
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_tokens: int = 0        # the data's ids, 0..n_tokens-1 (0: all of vocab_size); sampling never draws the padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    compile_loss: bool = True  # torch.compile the per-token loss kernels (False: eager)


# -----------------------------------------------------------------------------
# the blocks both models are built from

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(LayerNorm):
    """T5's norm: divide by the root mean square, no centring (a bias only if asked, like LayerNorm)."""

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * self.weight  # eager F.rms_norm is slower on CPU
        return x if self.bias is None else x + self.bias


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's buckets for key position minus query position: half of them exact (distances below
    num_buckets/4 bidirectionally, /2 causally), the rest logarithmic up to max_distance; a
    bidirectional bias gives the future (positive distances) the upper half of the buckets."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # the future is masked anyway: bucket 0
    max_exact = num_buckets // 2
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket of relative position, head), added to the attention scores. Each
    T5-lite block owns one (T5 shares the first layer's), so blocks can be stacked or dropped alone."""

    def __init__(self, cfg, bidirectional):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, cfg.rel_buckets, cfg.rel_max_distance

    def forward(self, T, S):
        """(1, nh, T, S) bias for the last T of S positions querying all S."""
        device = self.relative_attention_bias.weight.device
        relative_position = torch.arange(S, device=device)[None, :] - torch.arange(S - T, S, device=device)[:, None]
        bucket = relative_position_bucket(relative_position, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)


class KVCache:
    """One self-attention layer's keys and values of the positions decoded so far, (B, nh, S, hs) each."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k, v):
        """Append the new positions' k, v (B, nh, T, hs); return all of them (B, nh, S + T, hs)."""
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v

    def keep(self, rows):
        """Keep only these batch rows (a bool mask or indices): finished sequences leave the batch."""
        if self.k is not None:  # None: nothing cached yet (a prompt longer than block_size is recomputed)
            self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    """Multi-head attention on scaled_dot_product_attention: self-attention, causal (GPT, T5's
    decoder) or bidirectional (T5's encoder), or cross-attention from x to a memory (T5's decoder
    reading the encoder). Optionally a relative position bias of its own, passed to SDPA as a float
    mask (with -inf on the future when causal)."""

    def __init__(self, cfg, causal=True, cross=False, relative_bias=False):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        C = cfg.n_embd
        if cross:
            self.c_q = nn.Linear(C, C, bias=cfg.bias)            # queries from x
            self.c_kv = nn.Linear(C, 2 * C, bias=cfg.bias)       # keys and values from the memory
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)     # q, k, v in one matmul
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rel_bias = RelativePositionBias(cfg, bidirectional=not causal) if relative_bias else None
        self.n_head, self.dropout, self.causal = cfg.n_head, cfg.dropout, causal

    def forward(self, x, memory=None, cache=None):
        """x (B, T, C) -> (B, T, C). memory (B, S, C): attend to it instead (cross-attention). cache: the
        KVCache of the positions before x's, which x's keys and values extend (self-attention)."""
        B, T, C = x.size()
        if memory is None:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            q, (k, v) = self.c_q(x), self.c_kv(memory).split(C, dim=2)
        q, k, v = (t.view(B, t.size(1), self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T or S, hs)
                   for t in (q, k, v))
        if cache is not None:
            k, v = cache.extend(k, v)                                                  # (B, nh, S, hs)
        mask = self._mask(T, k.size(2), q)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None and self.causal)      # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _mask(self, T, S, q):
        """SDPA's attn_mask for the last T of S positions, or None where is_causal (or no mask) does."""
        if self.rel_bias is None and (not self.causal or S == T):
            return None
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
        if self.rel_bias is None:
            return ~future  # queries after cached keys: is_causal would align them with the first keys
        mask = self.rel_bias(T, S).to(q.dtype)                                         # (1, nh, T, S)
        return mask.masked_fill(future, float('-inf')) if self.causal else mask


class MLP(nn.Module):
    """GPT's feed-forward: GELU between two matmuls, 4x wide."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class GatedMLP(nn.Module):
    """T5 v1.1's gated-GELU feed-forward: c_proj(gelu(x W_gate) * x W_up), W_gate and W_up in c_fc."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.gelu(gate, approximate='tanh') * up))


class Block(nn.Module):
    """A pre-norm block: x += attn(norm(x)); [x += cross_attn(norm(x), memory)]; x += mlp(norm(x)).

    The defaults are GPT's block (LayerNorm, GELU MLP, causal self-attention). T5-lite passes RMSNorm,
    GatedMLP and a relative position bias; its encoder blocks are bidirectional, its decoder blocks
    causal with cross-attention to the encoder's output.
    """

    def __init__(self, cfg, norm=LayerNorm, mlp=MLP, causal=True, cross=False, relative_bias=False):
        super().__init__()
        self.ln_1, self.attn = norm(cfg.n_embd, cfg.bias), Attention(cfg, causal, relative_bias=relative_bias)
        self.ln_cross, self.cross_attn = (norm(cfg.n_embd, cfg.bias), Attention(cfg, causal=False, cross=True)) \
            if cross else (None, None)
        self.ln_2, self.mlp = norm(cfg.n_embd, cfg.bias), mlp(cfg)

    def forward(self, x, memory=None, cache=None):
        x = x + self.attn(self.ln_1(x), cache=cache)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln_cross(x), memory)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# what GPT and T5-lite share around the blocks

def init_weights(model, n_layer):
    """GPT-2's init: N(0, 0.02) for matrices and embeddings, zero biases, and residual projections
    (c_proj) scaled by 1/sqrt(2 n_layer)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith('c_proj.weight'):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """(B, V) logits of the last position -> (B, 1) next ids: a sample from the top_k at this
    temperature; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # bf16 probabilities (under autocast) are too coarse to sample from
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('inf')
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def keep_running(running, rows, seq, cache):
    """Keep the running rows (a bool (B,)) of rows, seq and the KV cache {block: KVCache}, if any:
    finished sequences leave the batch, so later decoding steps cost less."""
    if running.all():
        return rows, seq
    for layer in (cache or {}).values():
        layer.keep(running)
    return rows[running], seq[running]


@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside the block (no dropout); its previous mode comes back after, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def state_from_checkpoint(ckpt):
    """A checkpoint's model state dict without torch.compile's prefix and nanoGPT's mask buffers."""
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    return {k: v for k, v in state.items() if not k.endswith('.attn.bias')}


class LayeredLM(nn.Module):
    """What both models expose to the loop: active blocks, per-token losses, MFU, building from a checkpoint."""
    config_class = None

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.active_layers = list(range(cfg.n_layer))
        self.loss_kernels = LossKernels(cfg.compile_loss)

    @property
    def n_layer(self):
        return self.config.n_layer

    def blocks(self):
        """Every block of the model (GPT's n_layer; T5-lite's encoder's then decoder's)."""
        return [block for name, block in self.named_modules() if name.rsplit('.', 2)[-2:-1] == ['h']]

    def set_active_layers(self, layers):
        """Run only these blocks (a count n = the first n, or a list of indices), in order; T5-lite runs
        the same indices in its encoder and its decoder."""
        layers = list(range(layers)) if isinstance(layers, int) else sorted(layers)
        assert layers and all(0 <= i < self.n_layer for i in layers), layers
        self.active_layers = layers

    def _loss_or_logits(self, h, targets, weight=None, sample=None):
        """Final hidden states h (B, T, C) -> per-token losses (B, T) (-1 targets: loss 0); with weight, the
        fused sum_t weight_t * loss_t (weighted_loss: weight and sample as there); without targets the
        logits of the last position (B, 1, V)."""
        if targets is None:
            return self.lm_head(h[:, [-1], :])
        h, w = h.flatten(0, 1), self.lm_head.weight
        if weight is None:
            return per_token_loss(h, w, targets.reshape(-1), kernels=self.loss_kernels).view(targets.shape)
        return weighted_loss(h, w, targets, weight, kernels=self.loss_kernels, sample=sample)

    def logits(self, *inputs):
        """Full vocabulary logits (B, T, V) of every (decoder) position, for the rare user who needs them
        (tests, analysis; the loss never materializes them)."""
        return self.lm_head(self.hidden(*inputs))

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        return self.flops_per_token() * tokens_per_sec / peak_flops

    @classmethod
    def from_checkpoint(cls, ckpt, **overrides):
        """Build from a checkpoint dict (ours, or nanoGPT's for GPT: model_args + model state dict).
        model_args the config lacks are ignored, and fields model_args lack (compile_loss in older
        checkpoints) keep their defaults; overrides set config fields (compile_loss=False, dropout=0.0)."""
        fields = cls.config_class.__dataclass_fields__
        model_args = {k: v for k, v in ckpt['model_args'].items() if k in fields}
        model = cls(cls.config_class(**{**model_args, **overrides}))
        model.load_state_dict(state_from_checkpoint(ckpt))
        return model


# -----------------------------------------------------------------------------
# GPT

class GPT(LayeredLM):
    config_class = GPTConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        init_weights(self, cfg.n_layer)

    def block_stacks(self):
        """The block lists that active-layer indices address (stacking copies block i - L into i in each)."""
        return [self.transformer.h]

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, start=0, cache=None):
        """idx (B, T) token ids at positions start.. -> (B, T, C) final hidden states through the active
        blocks. cache {block index: KVCache}: the keys and values of positions < start, which idx's extend."""
        T, block_size = idx.size(1), self.config.block_size
        assert start + T <= block_size, f'sequence of {start + T} tokens > block_size {block_size}'
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i in self.active_layers:
            x = self.transformer.h[i](x, cache=None if cache is None else cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, weight=None, sample=None):
        """With targets: per-token losses (B, T) fp32, or with weight their weighted sum (a scalar, the
        gradients computed in the forward). Without: logits of the last position (B, 1, V)."""
        return self._loss_or_logits(self.hidden(idx), targets, weight, sample)

    def flops_per_token(self, n_active=None, seq_len=None):
        """Forward+backward FLOPs per token at n_active blocks: nanoGPT's 6 N + 12 L H Q T (PaLM appendix B),
        N the non-embedding parameters of the blocks that run, so an MFU compares with nanoGPT's."""
        cfg = self.config
        L = len(self.active_layers) if n_active is None else n_active
        T = cfg.block_size if seq_len is None else seq_len
        per_block = sum(p.numel() for p in self.transformer.h[0].parameters())
        N = self.num_params() - (cfg.n_layer - L) * per_block
        return 6 * N + 12 * L * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, stop=None, pad_id=0,
                 use_cache=True):
        """Continue idx (B, P) by up to max_new_tokens ids drawn by sample_next (temperature 0 is greedy)
        -> (B, P + n). stop(new) gets the tokens generated so far (B_running, t) of the rows still running
        and returns a bool (B_running,): the rows finished now, last token included. They leave the batch,
        their later positions are pad_id, and n < max_new_tokens when every row finished early. A KV cache
        of the active blocks serves positions below block_size; past it the context is cropped to the last
        block_size tokens and recomputed (nanoGPT). use_cache=False always recomputes, with the same draws."""
        P = idx.size(1)
        out = F.pad(idx, (0, max_new_tokens), value=pad_id)              # (B, P + max_new_tokens)
        rows, seq = torch.arange(len(idx), device=idx.device), idx       # the running rows, their ids so far
        cache = {i: KVCache() for i in self.active_layers} if use_cache else None
        with evaluating(self):
            for t in range(max_new_tokens):
                logits = self._next_logits(seq, cache, start=0 if t == 0 else seq.size(1) - 1)
                nxt = sample_next(logits, temperature, top_k, generator)  # (B_running, 1)
                out[rows, P + t] = nxt[:, 0]
                seq = torch.cat((seq, nxt), dim=1)
                if stop is not None:
                    rows, seq = keep_running(~stop(seq[:, P:]).to(seq.device), rows, seq, cache)
                    if len(rows) == 0:
                        break
        return out[:, :seq.size(1)]

    def _next_logits(self, seq, cache, start):
        """(B, V) logits of the token after seq (B, T). With a cache holding the positions before start,
        only seq[:, start:] runs, while every position fits block_size (absolute position embeddings);
        past it the last block_size tokens are recomputed."""
        if cache is None or seq.size(1) > self.config.block_size:
            return self(seq[:, -self.config.block_size:])[:, -1, :self.config.n_tokens or None]
        return self.lm_head(self.hidden(seq[:, start:], start, cache)[:, -1])[:, :self.config.n_tokens or None]


# -----------------------------------------------------------------------------
# T5-lite

@dataclass
class T5Config:
    block_size: int = 128         # encoder input length (span corruption cuts it from a longer raw chunk)
    vocab_size: int = 320         # tokenizer ids, sentinels, then the decoder start id and EOS (the last two)
    n_layer: int = 4              # blocks in the encoder, and as many in the decoder
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 0                 # gated-GELU width; 0 = 8/3 n_embd up to a multiple of 64 (T5 v1.1 base: 2048)
    dropout: float = 0.0
    bias: bool = False            # T5 has no biases
    rel_buckets: int = 32         # relative position buckets (T5's 32)
    rel_max_distance: int = 128   # distances from here on share the last bucket (T5's 128)
    compile_loss: bool = True     # torch.compile the per-token loss kernels (False: eager)

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.n_embd / 3 / 64)


class T5Lite(LayeredLM):
    """T5 v1.1 in miniature: a bidirectional encoder and a causal decoder that cross-attends to it, both
    made of the shared Block (RMSNorm pre-norm, gated-GELU, a relative position bias per block), a
    token embedding shared by both stacks and an untied lm_head. Active layers act on both stacks
    alike (the same indices), as No Train No Gain drops and stacks T5's layers."""
    config_class = T5Config

    def __init__(self, cfg):
        super().__init__(cfg)
        t5_block = functools.partial(Block, cfg, norm=RMSNorm, mlp=GatedMLP, relative_bias=True)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleDict(dict(h=nn.ModuleList([t5_block(causal=False) for _ in range(cfg.n_layer)]),
                                          ln_f=RMSNorm(cfg.n_embd, cfg.bias)))
        self.decoder = nn.ModuleDict(dict(h=nn.ModuleList([t5_block(causal=True, cross=True) for _ in range(cfg.n_layer)]),
                                          ln_f=RMSNorm(cfg.n_embd, cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.start_id, self.eos_id = cfg.vocab_size - 2, cfg.vocab_size - 1
        init_weights(self, cfg.n_layer)

    def block_stacks(self):
        """The block lists that active-layer indices address: the encoder's and the decoder's."""
        return [self.encoder.h, self.decoder.h]

    def num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out the input embedding (a lookup; lm_head is not tied to it)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def encode(self, enc_in):
        """enc_in (B, Ti) -> the memory (B, Ti, C): the encoder's output through the active blocks."""
        x = self.drop(self.wte(enc_in))
        for i in self.active_layers:
            x = self.encoder.h[i](x)
        return self.encoder.ln_f(x)

    def decode(self, dec_in, memory):
        """dec_in (B, Tt), memory (B, Ti, C) -> (B, Tt, C) the decoder's final hidden states."""
        x = self.drop(self.wte(dec_in))
        for i in self.active_layers:
            x = self.decoder.h[i](x, memory)
        return self.decoder.ln_f(x)

    def hidden(self, enc_in, dec_in):
        """(B, Tt, C) the decoder's final hidden states for dec_in, reading the encoded enc_in."""
        return self.decode(dec_in, self.encode(enc_in))

    def forward(self, enc_in, dec_in, targets=None, weight=None, sample=None):
        """With targets (B, Tt): per-token losses (B, Tt) fp32 (-1 = ignore, loss 0), or with weight their
        weighted sum (as GPT's). Without: logits of the last decoder position (B, 1, V)."""
        return self._loss_or_logits(self.hidden(enc_in, dec_in), targets, weight, sample)

    def flops_per_token(self, n_active=None, seq_len=None):
        """Forward+backward FLOPs per encoder input token at n_active blocks per stack: one example's
        encoder (seq_len tokens), decoder (its span-corrupted target length, with cross-attention and
        the lm_head), divided by seq_len. Matmuls 6 x params x tokens, attention as in PaLM appendix B."""
        cfg = self.config
        L = len(self.active_layers) if n_active is None else n_active
        Ti = cfg.block_size if seq_len is None else seq_len
        Tt = t5_lengths(raw_length_for(Ti))[1]
        enc_block, dec_block = (sum(p.numel() for n, p in stack.h[0].named_parameters() if 'rel_bias' not in n)
                                for stack in (self.encoder, self.decoder))
        c_kv = self.decoder.h[0].cross_attn.c_kv.weight.numel()  # applied to the memory, once per encoder token
        matmul_flops = 6 * (Ti * L * (enc_block + c_kv) + Tt * (L * (dec_block - c_kv) + cfg.vocab_size * cfg.n_embd))
        attention_flops = 12 * L * cfg.n_embd * (Ti * Ti + Tt * Tt + Tt * Ti)
        return (matmul_flops + attention_flops) / Ti

    @torch.no_grad()
    def generate(self, enc_in, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Decode from the start id: (B, 1 + max_new_tokens), the start id then the new tokens. A row
        that has emitted EOS emits only EOS after it. temperature=0 is greedy."""
        with evaluating(self):
            memory = self.encode(enc_in)
            dec = torch.full((len(enc_in), 1), self.start_id, dtype=torch.long, device=enc_in.device)
            for _ in range(max_new_tokens):
                nxt = sample_next(self.lm_head(self.decode(dec, memory)[:, -1, :]), temperature, top_k, generator)
                done = (dec == self.eos_id).any(dim=1, keepdim=True)
                dec = torch.cat((dec, torch.where(done, self.eos_id, nxt)), dim=1)
        return dec


MODELS = {'gpt': (GPT, GPTConfig), 't5': (T5Lite, T5Config)}  # model_type -> (model class, its config)


def model_vocab_size(model_type, vocab_size, block_size, multiple=1):
    """GPT: the data's vocabulary padded up to a multiple (nanoGPT's 50304 for GPT-2's 50257: matrix
    shapes the hardware tiles well; the padded ids are never targets and never sampled). T5-lite adds
    sentinels, a decoder start id and EOS (data/spans.py), its last two ids, so it is not padded."""
    if model_type == 't5':
        return span_vocab(vocab_size, raw_length_for(block_size)).size
    return -(-vocab_size // multiple) * multiple


# -----------------------------------------------------------------------------
# evaluation and sampling, for either model

@torch.no_grad()
def evaluate(model, inputs, targets, batch_size, runtime, n_layers=None):
    """Mean per-token loss on fixed examples, through the first n_layers blocks (default: all), in eval
    mode. inputs: a tuple of the model's inputs (GPT: x; T5: enc_in, dec_in); -1 targets are ignored."""
    active = model.active_layers
    model.set_active_layers(n_layers or model.n_layer)
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(targets), batch_size):
            x, y = [t[i:i + batch_size].to(runtime.device) for t in inputs], targets[i:i + batch_size].to(runtime.device)
            with runtime.autocast():
                total += model(*x, y).sum().item()
            count += (y >= 0).sum().item()
    model.set_active_layers(active)
    return total / count


def sample_text(model, tokenizer, runtime, n_tokens, prompt='\ndef ', seed=0, temperature=0.8, top_k=40):
    """GPT: prompt and its continuation. T5-lite: the prompt, then what its decoder writes for one masked
    span at the prompt's end (sentinel ids printed as <extra_id_i>, as in T5). temperature 0 is greedy;
    top_k 0 samples from the whole vocabulary."""
    ids = list(tokenizer.encode(prompt))
    g = torch.Generator(runtime.device).manual_seed(seed)
    top_k = top_k or None
    if not hasattr(model, 'encode'):
        out = model.generate(torch.tensor([ids], device=runtime.device), n_tokens, temperature=temperature, top_k=top_k,
                             generator=g)
        return tokenizer.decode(out[0].tolist())
    base = tokenizer.vocab_size  # the sentinels' first id (data/spans.py)
    enc_in = torch.tensor([ids + [base, model.eos_id]], device=runtime.device)
    out = model.generate(enc_in, n_tokens, temperature=temperature, top_k=top_k, generator=g)[0, 1:].tolist()
    runs = itertools.groupby((t for t in out if t != model.eos_id), key=lambda t: t < base)
    text = ''.join(tokenizer.decode(list(r)) if words else ''.join(f'<extra_id_{t - base}>' for t in r) for words, r in runs)
    return f'{prompt} => {text}'
