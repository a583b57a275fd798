"""T5-lite: span corruption against T5's numbers and a hand reconstruction, the model against an
independent eager forward, and short runs through train.py (model_type='t5')."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import Interrupting, run_script
from data.spans import SpanVocab, noise_mask, raw_length_for, span_corrupt, span_vocab, t5_lengths
from model import T5Config, T5Lite, model_vocab_size, relative_position_bucket

BYTES = SpanVocab(256, 320)  # what span_vocab gives the byte tokenizer


def runs(mask_row):
    """Lengths of the runs of True in a 1-d bool tensor, in order."""
    out, n = [], 0
    for v in mask_row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def reconstruct(enc_in, targets, vocab):
    """The raw chunk back from one example: each sentinel of the input replaced by the tokens that
    follow the same sentinel in the targets (T5's format, read by hand)."""
    spans, current = {}, None
    for t in targets.tolist()[:-1]:  # the last target is EOS
        if vocab.base <= t < vocab.start:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in enc_in.tolist()[:-1]:
        out.extend(spans.pop(t) if vocab.base <= t < vocab.start else [t])
    assert not spans, 'a target span had no sentinel in the input'
    return out


# ----- span corruption ------------------------------------------------------------------------------

def test_lengths_are_t5s():
    assert t5_lengths(568) == (512, 114)      # T5's own sizes
    assert raw_length_for(512) == 568
    # 141 raw: noise round(21.15) = 21, spans round(21 / 3) = 7 -> input 141 - 21 + 7 + 1, target 21 + 7 + 1
    assert t5_lengths(141) == (128, 29) and raw_length_for(128) == 141
    for input_len in range(3, 700):  # the longest raw chunk with exactly that input length
        raw = raw_length_for(input_len)
        assert t5_lengths(raw)[0] == input_len < t5_lengths(raw + 1)[0]


def test_vocab_layout():
    assert span_vocab(256, 141) == BYTES and (BYTES.n_sentinels, BYTES.start, BYTES.eos) == (62, 318, 319)
    assert span_vocab(50257, 568).size == 50304  # GPT-2's tokenizer: the same padding nanoGPT uses


@pytest.mark.parametrize('raw_len', [12, 141, 568])
def test_corruption_shapes_ids_and_reconstruction(raw_len):
    g = torch.Generator().manual_seed(raw_len)
    raw = torch.randint(0, 256, (16, raw_len), generator=g)
    raw[0, :2] = torch.tensor([0, 255])  # the extreme byte ids survive too
    enc_in, dec_in, targets = span_corrupt(raw, g, BYTES)
    Li, Lt = t5_lengths(raw_len)
    assert enc_in.shape == (16, Li) and dec_in.shape == targets.shape == (16, Lt)
    assert enc_in.dtype == targets.dtype == torch.int64
    k = (Li + Lt - raw_len - 2) // 2  # spans: Li + Lt = raw_len + a sentinel per span in each + 2 EOS
    for b in range(16):
        sentinels = [t for t in enc_in[b].tolist() if t >= 256]
        assert sentinels == list(range(256, 256 + k)) + [BYTES.eos]
        assert [t for t in targets[b].tolist() if t >= 256] == list(range(256, 256 + k)) + [BYTES.eos]
        assert targets[b, 0] == 256 and enc_in[b, 0] < 256  # non-noise first, noise last
        assert enc_in[b, -2] == 256 + k - 1
        assert dec_in[b].tolist() == [BYTES.start] + targets[b, :-1].tolist()
        assert reconstruct(enc_in[b], targets[b], BYTES) == raw[b].tolist()


def test_noise_density_and_span_lengths():
    L = 30_000
    mask = noise_mask(4, L, torch.Generator().manual_seed(0))
    noise_lengths, clean_lengths = [], []
    for row in mask:
        assert abs(row.float().mean().item() - 0.15) <= 0.02
        noise_lengths += runs(row)
        clean_lengths += runs(~row)
        assert not row[0] and row[-1]
    assert len(noise_lengths) == len(clean_lengths) == 4 * round(0.15 * L / 3)
    assert abs(sum(noise_lengths) / len(noise_lengths) - 3) < 0.01
    # a uniformly random segmentation: span lengths about geometric with mean 3, P(1) = 1/3, P(2) = 2/9
    ones, twos = noise_lengths.count(1) / len(noise_lengths), noise_lengths.count(2) / len(noise_lengths)
    assert abs(ones - 1 / 3) < 0.02 and abs(twos - 2 / 9) < 0.02 and max(noise_lengths) > 10
    assert abs(sum(clean_lengths) / len(clean_lengths) - 0.85 * 3 / 0.15) < 0.1


def test_corruption_is_seeded():
    raw = torch.arange(141).repeat(4, 1)
    a = span_corrupt(raw, torch.Generator().manual_seed(1), BYTES)
    b = span_corrupt(raw, torch.Generator().manual_seed(1), BYTES)
    c = span_corrupt(raw, torch.Generator().manual_seed(2), BYTES)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0][0], a[0][1])  # each row draws its own spans


def test_too_few_sentinels_is_an_error():
    with pytest.raises(ValueError, match='sentinels'):
        span_corrupt(torch.zeros(2, 141, dtype=torch.long), torch.Generator(), SpanVocab(256, 264))


# ----- the model -------------------------------------------------------------------------------------

def test_relative_position_buckets_by_hand():
    rel = torch.tensor([-200, -127, -16, -8, -7, -1, 0, 1, 7, 8, 200])
    # bidirectional, 32 buckets, max 128: 16 per direction, 8 exact; 8 + int(log(d/8) / log(16) * 8) after
    assert relative_position_bucket(rel, True, 32, 128).tolist() == [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 31]
    # causal: the past only, 16 exact; 16 + int(log(d/16) / log(8) * 16) after; the future is bucket 0
    assert relative_position_bucket(rel, False, 32, 128).tolist() == [31, 31, 16, 8, 7, 1, 0, 0, 0, 0, 0]


def tiny_t5(n_layer=2, seed=0):
    """A tiny T5-lite with large random weights, so that every part of the forward moves the output."""
    torch.manual_seed(seed)
    model = T5Lite(T5Config(block_size=16, vocab_size=40, n_layer=n_layer, n_head=2, n_embd=16, d_ff=24,
                            rel_buckets=8, rel_max_distance=12, compile_loss=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if 'rel_bias' in name or 'ln' in name else 0.3))
    return model.eval()


def reference_losses(model, enc_in, dec_in, targets, layers):
    """T5-lite's per-token loss written out from the weights: explicit attention scores, bias tables
    indexed by a pure-python bucket, RMSNorm, tanh-GELU, F.cross_entropy."""
    cfg = model.config
    C, nh = cfg.n_embd, cfg.n_head

    def bucket(rel, bidirectional):
        n, base = cfg.rel_buckets, 0
        if bidirectional:
            n //= 2
            base, rel = (n if rel > 0 else 0), abs(rel)
        else:
            rel = max(-rel, 0)
        exact = n // 2
        if rel < exact:
            return base + rel
        return base + min(n - 1, exact + int(math.log(rel / exact) / math.log(cfg.rel_max_distance / exact) * (n - exact)))

    def rms(x, norm):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight

    def heads(t):
        return t.view(t.size(0), t.size(1), nh, C // nh).transpose(1, 2)

    def attention(a, x, memory=None, causal=False):
        if memory is None:
            wq, wk, wv = a.c_attn.weight.split(C)
            memory = x
        else:
            (wq, (wk, wv)) = a.c_q.weight, a.c_kv.weight.split(C)
        q, k, v = heads(x @ wq.T), heads(memory @ wk.T), heads(memory @ wv.T)
        s = q @ k.transpose(-1, -2) / math.sqrt(C // nh)
        T, S = s.shape[-2:]
        if a.rel_bias is not None:
            table = a.rel_bias.relative_attention_bias.weight
            idx = torch.tensor([[bucket(j - i, not causal) for j in range(S)] for i in range(T)])
            s = s + table[idx].permute(2, 0, 1)
        if causal:
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float('-inf'))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return y @ a.c_proj.weight.T

    def mlp(m, x):
        gate, up = (x @ m.c_fc.weight.T).chunk(2, dim=-1)
        gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
        return (gelu * up) @ m.c_proj.weight.T

    x = model.wte.weight[enc_in]
    for i in layers:
        b = model.encoder.h[i]
        x = x + attention(b.attn, rms(x, b.ln_1))
        x = x + mlp(b.mlp, rms(x, b.ln_2))
    memory = rms(x, model.encoder.ln_f)
    y = model.wte.weight[dec_in]
    for i in layers:
        b = model.decoder.h[i]
        y = y + attention(b.attn, rms(y, b.ln_1), causal=True)
        y = y + attention(b.cross_attn, rms(y, b.ln_cross), memory)
        y = y + mlp(b.mlp, rms(y, b.ln_2))
    logits = rms(y, model.decoder.ln_f) @ model.lm_head.weight.T
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction='none')


def batch(seed=0, B=3, Ti=14, Tt=9, V=40):
    g = torch.Generator().manual_seed(seed)
    enc_in, dec_in, targets = (torch.randint(0, V, (B, T), generator=g) for T in (Ti, Tt, Tt))
    targets[0, :2] = -1
    return enc_in, dec_in, targets


@pytest.mark.parametrize('layers', [[0, 1], [1]])
def test_per_token_loss_matches_reference(layers):
    model = tiny_t5()
    model.set_active_layers(layers)
    enc_in, dec_in, targets = batch()
    with torch.no_grad():
        got = model(enc_in, dec_in, targets)
        want = reference_losses(model, enc_in, dec_in, targets, layers)
        logits = model.logits(enc_in, dec_in)
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[0, :2] == 0).all()
    torch.testing.assert_close(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction='none'), got,
                               rtol=1e-5, atol=1e-5)


def test_encoder_is_bidirectional_and_decoder_causal():
    model = tiny_t5()
    enc_in, dec_in, _ = batch()
    enc2, dec2 = enc_in.clone(), dec_in.clone()
    enc2[:, -1] = (enc2[:, -1] + 1) % 40
    dec2[:, 5] = (dec2[:, 5] + 1) % 40
    with torch.no_grad():
        memory, memory2 = model.encode(enc_in), model.encode(enc2)
        assert (memory[:, 0] - memory2[:, 0]).abs().max() > 1e-3  # the first output sees the last input
        assert (model.logits(enc2, dec_in)[:, 0] - model.logits(enc_in, dec_in)[:, 0]).abs().max() > 1e-3
        a, b = model.logits(enc_in, dec_in), model.logits(enc_in, dec2)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)  # earlier positions never see token 5
    assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=-1).min() > 1e-4


def test_active_layers_act_on_both_stacks_and_every_block_has_its_own_bias():
    model = tiny_t5(n_layer=3).train()
    enc_in, dec_in, targets = batch()
    model.set_active_layers([0, 2])
    model(enc_in, dec_in, targets).mean().backward()
    for stack in (model.encoder, model.decoder):
        assert all(p.grad is None for p in stack.h[1].parameters())
        for i in (0, 2):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.h[i].parameters())
    tables = [b.attn.rel_bias.relative_attention_bias for s in (model.encoder, model.decoder) for b in s.h]
    assert len({id(t) for t in tables}) == 6 and all(b.cross_attn.rel_bias is None for b in model.decoder.h)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_t5()
    path = tmp_path / 'ckpt.pt'
    torch.save({'model_args': dataclasses.asdict(model.config),
                'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()}}, path)
    loaded = T5Lite.from_checkpoint(torch.load(path, weights_only=True)).eval()
    enc_in, dec_in, targets = batch(seed=1)
    with torch.no_grad():
        assert torch.equal(loaded.logits(enc_in, dec_in), model.logits(enc_in, dec_in))
    assert loaded.config == model.config
    ckpt = torch.load(path, weights_only=True)
    del ckpt['model_args']['compile_loss']          # a checkpoint from before the field: the default
    assert T5Lite.from_checkpoint(ckpt).config.compile_loss is True
    assert not T5Lite.from_checkpoint(ckpt, compile_loss=False).loss_kernels.compiled


def test_greedy_generate_is_the_argmax_of_the_logits():
    model = tiny_t5().train()
    enc_in = batch()[0]
    out = model.generate(enc_in, 7, temperature=0.0)
    assert model.training                                   # generate evaluates, then restores the mode
    assert out.shape == (3, 8) and (out[:, 0] == model.start_id).all()
    with torch.no_grad():
        want = model.logits(enc_in, out[:, :-1]).argmax(dim=-1)
    after_eos = (out[:, :-1] == model.eos_id).cumsum(dim=1) > 0
    assert torch.equal(torch.where(after_eos, model.eos_id, want), out[:, 1:])


def test_sampling_is_seeded_and_stops_at_eos():
    model = tiny_t5()
    enc_in = batch(B=8)[0]
    out = model.generate(enc_in, 60, temperature=100.0, generator=torch.Generator().manual_seed(0))  # ~uniform
    assert torch.equal(out, model.generate(enc_in, 60, temperature=100.0, generator=torch.Generator().manual_seed(0)))
    first_eos = [row.index(model.eos_id) if model.eos_id in row else None for row in out.tolist()]
    assert sum(i is not None and i < 40 for i in first_eos) >= 4  # most rows emit EOS early...
    for row, i in zip(out.tolist(), first_eos):
        assert i is None or set(row[i:]) == {model.eos_id}  # ...and nothing else after it


def test_flops_per_token_matches_a_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = T5Lite(T5Config(block_size=64, vocab_size=320, n_layer=2, n_head=2, n_embd=32, compile_loss=False))
    raw = torch.randint(0, 256, (2, raw_length_for(64)))
    enc_in, dec_in, targets = span_corrupt(raw, torch.Generator().manual_seed(0), BYTES)
    for n_active in (2, 1):
        model.set_active_layers(n_active)
        # the math backend: the counter has no formula for the CPU flash kernel (cross-attention's)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(enc_in, dec_in, targets).mean().backward()
        recompute = 2 * 320 * 32 * targets.numel()  # the chunked loss recomputes the logits in its backward
        counted = (counter.get_total_flops() - recompute) / enc_in.numel()
        assert abs(model.flops_per_token() - counted) / counted < 0.01, (n_active, model.flops_per_token(), counted)
        assert model.flops_per_token(n_active) == model.flops_per_token()


# ----- through train.py --------------------------------------------------------------------------------

def tiny_run_args(out_dir, **kw):
    args = dict(out_dir=str(out_dir), model='t5-tiny', batch_size=8, budget_unit='iters', budget=24,
                eval_interval=8, eval_batches=2, log_interval=8, compile_loss=False, sample_tokens=0, lr=3e-3,
                peak_flops=1e12)  # a given peak skips measuring this CPU's
    return {**args, **kw}


def test_short_run_lowers_val_loss(stdlib_corpus, tmp_path):
    args = tiny_run_args(tmp_path / 'run')
    proc = run_script('train.py', 'config/t5_lite.py', *(f'--{k}={v}' for k, v in args.items()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    val = [r['val_loss'] for r in map(json.loads, (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()) if 'val_loss' in r]
    # an untrained T5-lite predicts about uniformly: ln(320) = 5.77
    assert len(val) == 3 and val[-1] < val[0] - 0.3 and val[-1] < math.log(320) - 2, val


def test_interrupted_run_resumes_exactly(stdlib_corpus, tmp_path):
    import train

    class StopAt(Interrupting, train.SpanCorruption):
        steps = 3  # Ctrl-C as step 4 begins: what SIGTERM does, the loop saves a checkpoint and returns

    def cfg(name, **kw):
        return train.TrainConfig(**tiny_run_args(tmp_path / name, budget=6, model_type='t5', bias=False,
                                                 log_interval=1, **kw))

    straight = train.train(cfg('a'))
    T = cfg('b').model_dims()['block_size']
    vocab = SpanVocab(stdlib_corpus.vocab_size, model_vocab_size('t5', stdlib_corpus.vocab_size, T))
    stopped = train.Trainer(cfg('b'), StopAt(8, 1337, vocab)).run()
    resumed = train.train(cfg('b', init_from='resume'))
    assert stopped['interrupted'] and stopped['steps'] == 3 and resumed['steps'] == straight['steps'] == 6
    assert resumed['val_loss'] == straight['val_loss']
    losses = [[r['train_loss'] for r in map(json.loads, (tmp_path / n / 'log.jsonl').read_text().splitlines())
               if 'train_loss' in r] for n in 'ab']
    assert losses[0] == losses[1] and len(losses[0]) == 6
