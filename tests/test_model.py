"""model and loss: the chunked per-token loss and the fused weighted loss against F.cross_entropy (fp32, fp64,
weights, no_grad, a compile failure's fallback, DDP), nanoGPT checkpoints, config overrides, active layers, generate
with its KV cache against full recompute, and the FLOP count."""
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import loss as loss_lib
from loss import LossKernels, per_token_loss, weighted_loss
from model import GPT, GPTConfig, T5Config, T5Lite, evaluating


def loss_inputs(N=50, C=16, V=37, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = 0.5 * torch.randn(V, C, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignore)] = -1
    upstream = torch.rand(N, generator=g)  # a weighted sum, so each token's gradient is checked
    return h, w, targets, upstream


def loss_and_grads(fn, h, w, targets, upstream):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, targets)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def reference(h, w, targets):
    return F.cross_entropy(h @ w.t(), targets, reduction='none', ignore_index=-1)


def assert_close(got, want, atol=1e-5):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize('chunk', [2048, 50, 7, 1])
def test_eager_per_token_loss_equals_cross_entropy(chunk):
    inputs = loss_inputs()
    got = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=chunk, use_compile=False), *inputs)
    assert_close(got, loss_and_grads(reference, *inputs))


def test_small_chunks_equal_one_chunk():
    inputs = loss_inputs(N=203, ignore=(0, 5, 202))
    one = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=4096, use_compile=False), *inputs)
    small = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=16, use_compile=False), *inputs)
    assert_close(small, one)  # the lm_head gradient sums over chunks in another order


def test_ignored_targets_give_zero_loss_and_no_gradient():
    ignore = (1, 2, 30, 49)
    inputs = loss_inputs(ignore=ignore)
    loss, gh, gw = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=8, use_compile=False), *inputs)
    assert loss[list(ignore)].abs().max() == 0 and gh[list(ignore)].abs().max() == 0
    assert (loss[[0, 3, 48]] > 0).all()
    assert_close((loss, gh, gw), loss_and_grads(reference, *inputs))
    h, w, targets, upstream = inputs
    kept = targets >= 0  # the ignored tokens contribute nothing to the lm_head gradient either
    assert_close(loss_and_grads(reference, h[kept], w, targets[kept], upstream[kept])[2:], (gw,))


def test_compiled_kernels_equal_cross_entropy():
    """The one compiled test of this module: the torch.compile'd chunk kernels of both loss paths."""
    inputs, kernels = loss_inputs(N=64, ignore=(3,)), LossKernels(use_compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=32, kernels=kernels), *inputs)
        fused = fused_and_grads(lambda h, w, t, wt: weighted_loss(h, w, t, wt, chunk=32, kernels=kernels), *inputs)
    if any('torch.compile of the per-token loss failed' in str(c.message) for c in caught):
        pytest.skip('torch.compile is unavailable here: the eager fallback ran (tested above)')
    assert kernels.compiled and loss_lib.compiled_kernels()['loss'] is not loss_lib._chunk_loss
    assert_close(got, loss_and_grads(reference, *inputs))
    assert_close(fused, fused_and_grads(weighted_reference, *inputs))


def fused_and_grads(fn, h, w, targets, weight, scale=3.0):
    """The weighted loss and, for an upstream grad `scale` (as grad_accum's 1/n), the gradients of h and w."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, targets, weight)
    (scale * loss).backward()
    return loss.detach(), h.grad, w.grad


def weighted_reference(h, w, targets, weight):
    return (reference(h, w, targets) * weight).sum()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('chunk', [2048, 7])
@pytest.mark.parametrize('weights', ['mean', 'per_token', 'mask'])
def test_fused_loss_and_gradients_equal_weighted_cross_entropy(dtype, chunk, weights):
    h, w, targets, upstream = (t.to(dtype) if t.is_floating_point() else t for t in loss_inputs(ignore=(2, 9)))
    weight = {'mean': 1 / 48, 'per_token': upstream, 'mask': (upstream > 0.5).to(dtype) / 10}[weights]
    fused = lambda h, w, t, wt: weighted_loss(h, w, t, wt, chunk=chunk, use_compile=False)  # noqa: E731
    got, want = fused_and_grads(fused, h, w, targets, weight), fused_and_grads(weighted_reference, h, w, targets, weight)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_fused_loss_takes_a_gradient_through_its_weights():
    """Per-example weights (B, 1) broadcast over the targets (B, T); their gradient is each example's loss sum."""
    h, w, targets, _ = loss_inputs(N=48, ignore=(5,))
    targets = targets.view(4, 12)
    weight = torch.rand(4, 1, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weighted_loss(h, w, targets, weight, chunk=10, use_compile=False).backward()
    per_example = reference(h, w, targets.flatten()).view(4, 12).sum(1, keepdim=True)
    torch.testing.assert_close(weight.grad, per_example, atol=1e-5, rtol=0)


def test_fused_loss_does_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (or with nothing requiring grad) the fused path runs only the loss kernel."""
    ran, kernels = [], LossKernels(use_compile=False)
    monkeypatch.setattr(loss_lib, 'EAGER_KERNELS', {k: (lambda *a, f=f: ran.append(f.__name__) or f(*a))
                                                     for k, f in loss_lib.EAGER_KERNELS.items()})
    h, w, targets, upstream = loss_inputs(ignore=(1,))
    with torch.no_grad():
        loss = weighted_loss(h.requires_grad_(), w, targets, upstream, chunk=16, kernels=kernels)
    assert not loss.requires_grad and set(ran) == {'_chunk_loss'}
    torch.testing.assert_close(loss, weighted_reference(h.detach(), w, targets, upstream), atol=1e-5, rtol=0)
    weighted_loss(h.detach(), w, targets, upstream, chunk=16, kernels=kernels)
    assert set(ran) == {'_chunk_loss'}


def test_sampled_labels_are_scored_against_the_same_logits():
    """sample: the labels come from each chunk's own logits (argmax here), where targets >= 0."""
    h, w, targets, _ = loss_inputs(ignore=(0, 7))
    argmax = lambda logits: logits.argmax(-1)  # noqa: E731
    got = fused_and_grads(lambda h, w, t, wt: weighted_loss(h, w, t, wt, chunk=9, use_compile=False, sample=argmax),
                          h, w, targets, 0.1)
    labels = torch.where(targets >= 0, (h @ w.t()).argmax(-1), -1)
    assert_close(got, fused_and_grads(weighted_reference, h, w, labels, 0.1))


def test_float64_inputs_compute_in_float64():
    """fp64 stays fp64 end to end (the kernels used to round the logits to fp32: 3.6e-6 off); bf16 gives fp32."""
    h, w, targets, upstream = (t.double() if t.is_floating_point() else t for t in loss_inputs(ignore=(4,)))
    got = loss_and_grads(lambda h, w, t: per_token_loss(h, w, t, chunk=16, use_compile=False), h, w, targets, upstream)
    for a, b in zip(got, loss_and_grads(reference, h, w, targets, upstream)):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert per_token_loss(h.bfloat16(), w.bfloat16(), targets, use_compile=False).dtype == torch.float32


def test_a_compile_failure_falls_back_for_that_model_only(monkeypatch):
    """The compiled kernels are shared by the process, the fallback is not: the model whose compiled kernel
    raised turns eager (one warning), another model keeps running the compiled kernels."""
    broken, a, b = tiny_gpt(compile_loss=True, vocab_size=67), tiny_gpt(compile_loss=True), tiny_gpt(vocab_size=67)
    ran = []

    def fake_compile(fn):
        def kernel(logits, *args):
            if logits.size(1) == 67:  # the broken model's vocabulary
                raise RuntimeError('inductor: no such op')
            ran.append(fn.__name__)
            return fn(logits, *args)
        return kernel
    fakes = {name: fake_compile(fn) for name, fn in loss_lib.EAGER_KERNELS.items()}
    monkeypatch.setattr(loss_lib, 'compiled_kernels', lambda: fakes)
    x, y = tokens(), torch.roll(tokens(), -1, dims=1)
    with pytest.warns(UserWarning, match='torch.compile of the per-token loss failed .*no such op'):
        loss = broken(x, y)
    assert not broken.loss_kernels.compiled and a.loss_kernels.compiled
    torch.testing.assert_close(loss, b(x, y), atol=0, rtol=0)      # the eager kernels' result
    with warnings.catch_warnings():
        warnings.simplefilter('error')                              # no second warning
        a(x, y).sum().backward()
        broken(x, y).sum().backward()
    a(x, y, weight=0.5).backward()
    assert ran == ['_chunk_loss', '_chunk_grad_', '_chunk_fused_'] and a.loss_kernels.compiled


# -----------------------------------------------------------------------------
# GPT

def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(block_size=16, vocab_size=61, n_layer=3, n_head=2, n_embd=32, compile_loss=False)
    m = GPT(GPTConfig(**{**shape, **kw}))
    return m.eval()


def tokens(B=2, T=16, V=61, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_per_token_losses_of_its_logits():
    m, x = tiny_gpt(), tokens()
    y = torch.roll(x, -1, dims=1)
    y[0, -1] = -1
    loss = m(x, y)
    logits = m.logits(x)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32 and loss[0, -1] == 0
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none', ignore_index=-1).view(2, 16)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(m(x), logits[:, [-1], :])
    assert m.hidden(x).shape == (2, 16, 32)
    assert m.lm_head.weight is m.transformer.wte.weight


def model_grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('kind', ['gpt', 't5'])
def test_a_weighted_forward_equals_the_weighted_per_token_losses(kind):
    """model(..., targets, weight=w) == sum(w * model(..., targets)), with the same parameter gradients:
    the mean (a float), per-example weights (B, 1), for GPT and T5-lite."""
    if kind == 'gpt':
        m, x = tiny_gpt(), tokens()
        y = torch.roll(x, -1, dims=1)
        inputs = (x,)
    else:
        torch.manual_seed(0)
        m = T5Lite(T5Config(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32, compile_loss=False)).eval()
        inputs, y = (tokens(), tokens(T=6, seed=2)), tokens(T=6, seed=3)
    y[0, -1] = -1
    for weight in (1 / y.numel(), torch.tensor([[0.5], [2.0]])):
        fused = m(*inputs, y, weight=weight)
        two_pass = (m(*inputs, y) * weight).sum()
        assert fused.shape == () and fused.dtype == torch.float32
        torch.testing.assert_close(fused, two_pass, atol=1e-6, rtol=0)
        want = model_grads(m, two_pass)
        for name, grad in model_grads(m, fused).items():
            torch.testing.assert_close(grad, want[name], atol=1e-6, rtol=1e-5)


def test_a_weighted_forward_through_ddp_gives_eager_gradients(tmp_path):
    """The fused loss through a (1-rank gloo) DDP wrapper, weight passed as a keyword: the gradients DDP
    reduces are F.cross_entropy's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    try:
        m, x = tiny_gpt(), tokens()
        y = torch.roll(x, -1, dims=1)
        got = model_grads(m, DDP(m)(x, y, weight=1 / y.numel()))
        want = model_grads(m, F.cross_entropy(m.logits(x).flatten(0, 1), y.flatten()))
        for name, grad in got.items():
            torch.testing.assert_close(grad, want[name], atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


NANOGPT_BLOCK = {  # nanoGPT's parameter names and shapes, per block, for n_embd = C
    'ln_1.weight': lambda C: (C,), 'ln_1.bias': lambda C: (C,),
    'attn.c_attn.weight': lambda C: (3 * C, C), 'attn.c_attn.bias': lambda C: (3 * C,),
    'attn.c_proj.weight': lambda C: (C, C), 'attn.c_proj.bias': lambda C: (C,),
    'ln_2.weight': lambda C: (C,), 'ln_2.bias': lambda C: (C,),
    'mlp.c_fc.weight': lambda C: (4 * C, C), 'mlp.c_fc.bias': lambda C: (4 * C,),
    'mlp.c_proj.weight': lambda C: (C, 4 * C), 'mlp.c_proj.bias': lambda C: (C,),
}


def nanogpt_state(L=2, H=2, C=32, T=16, V=61, seed=3):
    """A state dict as nanoGPT writes it after torch.compile: '_orig_mod.' prefixes, the causal-mask
    buffer 'attn.bias' in every block, and the tied lm_head / wte weight stored under both names."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    state = {'transformer.wte.weight': rand(V, C), 'transformer.wpe.weight': rand(T, C),
             'transformer.ln_f.weight': 1 + rand(C), 'transformer.ln_f.bias': rand(C)}
    for i in range(L):
        for name, shape in NANOGPT_BLOCK.items():
            state[f'transformer.h.{i}.{name}'] = (1 + rand(*shape(C))) if name.startswith('ln') and name.endswith('weight') \
                else rand(*shape(C))
        state[f'transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    state['lm_head.weight'] = state['transformer.wte.weight']
    ckpt = {'model': {'_orig_mod.' + k: v for k, v in state.items()}, 'iter_num': 5000, 'best_val_loss': 1.5,
            'model_args': dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=True, vocab_size=V, dropout=0.0),
            'config': {'dataset': 'shakespeare_char'}}
    return ckpt, state


def nanogpt_logits(state, idx, L, H):
    """nanoGPT's forward written out by hand (manual masked attention, as without flash attention)."""
    B, T = idx.shape
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + '.weight'], state[p + '.bias'], 1e-5)  # noqa: E731
    lin = lambda x, p: x @ state[p + '.weight'].t() + state[p + '.bias']  # noqa: E731
    x = state['transformer.wte.weight'][idx] + state['transformer.wpe.weight'][:T]
    C = x.shape[-1]
    for i in range(L):
        p = f'transformer.h.{i}.'
        q, k, v = lin(ln(x, p + 'ln_1'), p + 'attn.c_attn').split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(state[p + 'attn.bias'][:, :, :T, :T] == 0, float('-inf')).softmax(dim=-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), p + 'attn.c_proj')
        x = x + lin(F.gelu(lin(ln(x, p + 'ln_2'), p + 'mlp.c_fc')), p + 'mlp.c_proj')
    return ln(x, 'transformer.ln_f') @ state['lm_head.weight'].t()


def test_nanogpt_checkpoint_loads_with_identical_outputs():
    ckpt, state = nanogpt_state()
    m = GPT.from_checkpoint(ckpt).eval()
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd, m.config.block_size, m.config.vocab_size) == (2, 2, 32, 16, 61)
    for name, value in m.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(m.logits(x), nanogpt_logits(state, x, 2, 2), atol=1e-5, rtol=0)


def test_compile_loss_is_a_config_field_that_from_checkpoint_can_override():
    m = tiny_gpt(compile_loss=True)
    assert m.loss_kernels.compiled and not hasattr(m, 'compile_loss')
    ckpt = {'model_args': dataclasses.asdict(m.config), 'model': m.state_dict()}
    assert GPT.from_checkpoint(ckpt).loss_kernels.compiled
    loaded = GPT.from_checkpoint(ckpt, compile_loss=False, dropout=0.25)
    assert loaded.config == dataclasses.replace(m.config, compile_loss=False, dropout=0.25)
    assert not loaded.loss_kernels.compiled and loaded.transformer.drop.p == 0.25
    old, _ = nanogpt_state()                     # model_args from before the field, plus a key we do not know
    old['model_args']['flash'] = True
    assert GPT.from_checkpoint(old).config.compile_loss is True
    assert GPT.from_checkpoint(old, compile_loss=False).config.compile_loss is False
    with pytest.raises(TypeError, match='compile_los'):
        GPT.from_checkpoint(old, compile_los=False)  # a misspelt override is an error, not ignored


def test_set_active_layers_runs_exactly_the_chosen_blocks():
    m, x = tiny_gpt(), tokens()
    with torch.no_grad():
        full = m.logits(x)
        for layers in ([0, 2], [1], 2):
            m.set_active_layers(layers)
            chosen = list(range(layers)) if isinstance(layers, int) else layers
            assert m.active_layers == chosen
            h = m.transformer.wte(x) + m.transformer.wpe(torch.arange(x.shape[1]))
            for i in chosen:
                h = m.transformer.h[i](h)
            manual = m.lm_head(m.transformer.ln_f(h))
            got = m.logits(x)
            torch.testing.assert_close(got, manual, atol=1e-6, rtol=0)
            assert (got - full).abs().max() > 1e-3, layers
        m.set_active_layers(3)
        torch.testing.assert_close(m.logits(x), full, atol=0, rtol=0)
    with pytest.raises(AssertionError):
        m.set_active_layers([3])


def test_generate_is_deterministic_with_a_seeded_generator():
    m = tiny_gpt()
    prompt = tokens(B=1, T=3)
    run = lambda seed, **kw: m.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b = run(0, temperature=1.5), run(0, temperature=1.5)
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert not torch.equal(a, run(1, temperature=1.5))
    greedy, idx = run(5, top_k=1), prompt
    for _ in range(20):  # top_k=1 is argmax decoding, whatever the seed
        idx = torch.cat([idx, m.logits(idx[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, idx)
    assert m.generate(prompt, 30).shape == (1, 33)  # longer than block_size: the context is cropped


def seeded(seed=7, device='cpu'):
    return torch.Generator(device).manual_seed(seed)


@pytest.mark.parametrize('layers', [3, [0, 2]])
@pytest.mark.parametrize('temperature', [0, 1.0])
def test_cached_generate_equals_full_recompute(layers, temperature, monkeypatch):
    m, prompt = tiny_gpt(), tokens(B=3, T=5)
    m.set_active_layers(layers)
    recomputed = m.generate(prompt, 20, temperature=temperature, generator=seeded(), use_cache=False)
    fed = []                                         # tokens per forward: the cache runs only the new one
    hidden = m.hidden
    monkeypatch.setattr(m, 'hidden', lambda idx, *a, **kw: fed.append(idx.size(1)) or hidden(idx, *a, **kw))
    cached = m.generate(prompt, 20, temperature=temperature, generator=seeded())
    assert cached.shape == (3, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    assert fed == [5] + [1] * 11 + [16] * 8      # positions 5..15 from the cache; past block_size 16: cropped


class StopAfter:
    """stop for generate: row i (of the original batch) is finished after ends[i] new tokens. It tracks which
    rows still run, as generate must hand it exactly those, and records the batch sizes it saw."""

    def __init__(self, ends):
        self.ends, self.running, self.sizes = ends, list(range(len(ends))), []

    def __call__(self, new):
        assert new.shape == (len(self.running), new.size(1)) and new.dtype == torch.long
        self.sizes.append(len(new))
        done = [self.ends[r] == new.size(1) for r in self.running]
        self.running = [r for r, d in zip(self.running, done) if not d]
        return torch.tensor(done)


@pytest.mark.parametrize('P', [4, 18])                # 18 > block_size: cropped and recomputed from the start
@pytest.mark.parametrize('temperature', [0, 1.0])
def test_stop_drops_finished_rows_and_pads_them(temperature, P):
    m, prompt, ends, pad = tiny_gpt(), tokens(B=4, T=P), [3, 1, 6, 2], 61   # 61: no token id of the vocabulary
    runs = {}
    for use_cache in (True, False):
        stop = StopAfter(ends)
        runs[use_cache] = m.generate(prompt, 9, temperature=temperature, generator=seeded(), stop=stop, pad_id=pad,
                                     use_cache=use_cache)
        assert stop.sizes == [4, 3, 2, 1, 1, 1]       # finished rows leave the batch
    out = runs[True]
    assert out.shape == (4, P + 6) and torch.equal(out, runs[False])  # ends once every row is finished
    for i, n in enumerate(ends):
        assert (out[i, P + n:] == pad).all() and (out[i, :P + n] != pad).all()
    if temperature == 0:                             # greedy rows do not depend on each other
        full = m.generate(prompt, 9, temperature=0)
        for i, n in enumerate(ends):
            assert torch.equal(out[i, :P + n], full[i, :P + n])


def test_generate_turns_dropout_off_and_restores_the_mode():
    m = tiny_gpt(dropout=0.5).train()
    prompt = tokens(B=2, T=3)
    out = m.generate(prompt, 8, generator=seeded())
    assert m.training and all(module.training for module in m.modules())
    assert torch.equal(out, m.generate(prompt, 8, generator=seeded(), use_cache=False))  # no dropout draws
    with pytest.raises(ZeroDivisionError), evaluating(m):
        assert not m.training and not m.transformer.h[0].mlp.dropout.training
        1 / 0
    assert m.training
    m.eval()
    with evaluating(m):
        pass
    assert not m.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cached_generate_on_cuda_with_a_cuda_generator():
    m, prompt = tiny_gpt().cuda(), tokens(B=3, T=5).cuda()
    run = lambda use_cache: m.generate(prompt, 20, generator=seeded(device='cuda'), use_cache=use_cache,  # noqa: E731
                                       stop=lambda new: (new[:, -1] % 7 == 0).cpu())
    out = run(True)
    assert out.device.type == 'cuda' and torch.equal(out, run(False))


def test_flops_per_token_is_nanogpts_formula_at_the_active_depth():
    m = tiny_gpt(block_size=16, n_embd=32, n_layer=3, vocab_size=61)
    C, T, V, H = 32, 16, 61, 2
    per_block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj weights + biases, two layer norms
    want = lambda L: 6 * (L * per_block + V * C + 2 * C) + 12 * L * H * (C // H) * T  # noqa: E731  (+ ln_f)
    assert m.flops_per_token() == 6 * m.num_params() + 12 * 3 * H * (C // H) * T  # nanoGPT's estimate_mfu
    assert [m.flops_per_token(L) for L in (1, 2, 3)] == [want(1), want(2), want(3)]
    m.set_active_layers([0, 2])
    assert m.flops_per_token() == want(2)
    assert m.estimate_mfu(1000.0, want(2) * 1000.0 * 4) == pytest.approx(0.25)


def test_per_token_backward_under_bf16_autocast_recomputes_the_logits_as_the_forward_did():
    """The backward runs outside the autocast block (train.py's accumulate; on CUDA in another thread):
    recomputing a chunk's logits in fp32 against the forward's bf16 log-sum-exp gives a softmax that does
    not sum to 1 (gradients off by ~5% for confident tokens). Under the forward's autocast it agrees with
    the fused path, which computes its gradients in the forward."""
    h, w, targets, _ = loss_inputs(N=64, C=32, V=41, seed=3)
    h = h * 2.0  # large logits: a bf16 lse is coarse there
    upstream = torch.ones(len(h))

    def under_bf16(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = fn(hh, ww)
        loss.backward()  # outside the autocast block, as the loop does
        return hh.grad, ww.grad
    per_token = under_bf16(lambda hh, ww: (per_token_loss(hh, ww, targets, chunk=16, use_compile=False) * upstream).sum())
    fused = under_bf16(lambda hh, ww: weighted_loss(hh, ww, targets, upstream, chunk=16, use_compile=False))
    for got, want in zip(per_token, fused):
        assert (got - want).norm() <= 0.01 * want.norm()


@pytest.mark.parametrize('data_vocab, padded', [(256, 256), (300, 320), (50257, 50304)])
def test_gpt_vocabulary_is_padded_to_a_multiple_of_64_and_the_padding_is_never_sampled(tiny_cfg, data_vocab, padded):
    """nanoGPT's 50304 for GPT-2's 50257; a byte vocabulary (256) is one already. The padded rows of the head
    are made the largest logits: sampling (cached or not, any temperature) still draws only the data's ids."""
    from runs import build_model
    model = build_model(tiny_cfg(), data_vocab, torch.device('cpu'))
    assert model.config.vocab_size == padded and model.lm_head.weight.shape[0] == padded
    assert model.config.n_tokens == data_vocab
    if padded == data_vocab:
        return
    with torch.no_grad():
        model.lm_head.weight[data_vocab:] = 10.0  # tied to wte: every padded logit is huge
    idx = torch.zeros(4, 3, dtype=torch.long)
    for temperature, use_cache in ((1.0, True), (2.0, False), (0.0, True)):
        out = model.generate(idx, 20, temperature=temperature, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        assert out.max() < data_vocab
    unpadded = build_model(tiny_cfg(vocab_multiple=1), data_vocab, torch.device('cpu'))
    assert unpadded.config.vocab_size == data_vocab


@pytest.mark.parametrize('arch', ['full', 'stack', 'drop'])
def test_compile_keeps_layer_dropping_compiled_block_by_block(tiny_cfg, arch):
    """Layer dropping draws a new set of blocks every step, which a whole-model graph would be recompiled for
    until dynamo's limit (then run eagerly, silently): its blocks are compiled one by one instead, and the
    model stays the module the loop steps."""
    import train
    from runs import build_model
    model = build_model(tiny_cfg(), 256, torch.device('cpu'))
    out = train.compiled(model, arch)
    if arch == 'drop':
        assert out is model and all(b._compiled_call_impl is not None for b in model.blocks())
    else:
        assert isinstance(out, torch._dynamo.eval_frame.OptimizedModule) and out._orig_mod is model
        assert all(b._compiled_call_impl is None for b in model.blocks())
