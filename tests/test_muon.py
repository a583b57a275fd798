"""Muon: torch.optim.Muon's numbers, AdamW's on the rest, the split of GPT and T5-lite, a run through the loop
(loss falls, resume bit-identical, the schedule scales Muon's lr), DDP ranks identical, the RST entry."""
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from configurator import UserError
from conftest import ROOT, StopAfter, load, read_log, without_timing
from optim_muon import Muon, MuonWithAdamW, muon_update, newton_schulz5
from runs import build_model

SHAPES = [(8, 20), (20, 8), (12, 12)]  # wide, tall, square


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('nesterov', [True, False])
@pytest.mark.parametrize('scale', ['original', 'match_rms_adamw'])
def test_muon_equals_torch_muon(shape, nesterov, scale):
    """float64, 20 steps with weight decay: muon_update, Muon and MuonWithAdamW's Muon group all give
    torch.optim.Muon's weights (observed: bit for bit)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64, generator=g)
    ref, ours, mixed, pure = (w0.clone().requires_grad_() for _ in range(4))
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    opts = [torch.optim.Muon([ref], adjust_lr_fn=scale, **hyper), Muon([ours], scale=scale, **hyper),
            MuonWithAdamW([{'params': [mixed], 'muon': True}], muon_lr=0.02, weight_decay=0.1, nesterov=nesterov,
                          scale=scale)]
    buf = torch.zeros_like(w0)
    for _ in range(20):
        grad = torch.randn(shape, dtype=torch.float64, generator=g)
        for p in (ref, ours, mixed):
            p.grad = grad.clone()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            muon_update(pure, grad, buf, 0.02, 0.1, 0.95, nesterov, scale)
    assert (ref - w0).abs().max() > 0.1  # the weights moved
    for p in (ours, mixed, pure):
        assert (p - ref).abs().max().item() <= 1e-12


def test_adamw_groups_equal_torch_adamw():
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.randn(6, 5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g)
    ref, ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()], [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    groups = lambda ps: [{'params': [ps[0]], 'weight_decay': 0.1}, {'params': [ps[1]], 'weight_decay': 0.0}]
    opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    opt = MuonWithAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(20):
        for a, b in zip(ref, ours):
            a.grad = torch.randn(a.shape, dtype=torch.float64, generator=g)
            b.grad = a.grad.clone()
        opt_ref.step()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r'2-D weights only.*\(5,\)'):
        Muon([torch.zeros(5, requires_grad=True)])
    with pytest.raises(ValueError, match=r'\(2, 3, 4\)'):
        MuonWithAdamW([{'params': [torch.zeros(2, 3, 4, requires_grad=True)], 'muon': True}])
    MuonWithAdamW([{'params': [torch.zeros(5, requires_grad=True)]}])  # an AdamW group takes anything
    with pytest.raises(ValueError, match='scale'):
        Muon([torch.zeros(2, 2, requires_grad=True)], scale='spectral')


def test_bf16_weights_keep_their_momentum():
    """Without Nesterov the momentum buffer is what Newton-Schulz orthogonalises; for bf16 weights its
    bf16 copy is the buffer itself, so normalising it in place would corrupt the momentum."""
    p, grad = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.bfloat16)
    buf = torch.zeros_like(p)
    muon_update(p, grad, buf, 0.02, 0.0, mu=0.95, nesterov=False)
    assert torch.equal(buf, torch.zeros_like(p).lerp_(grad, 0.05))


def test_state_dict_round_trip_is_exact():
    """Five steps, save, load into a fresh optimizer, five more: the weights of ten uninterrupted steps."""
    def params():
        g = torch.Generator().manual_seed(2)
        return [torch.randn(7, 4, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]

    def make(ps):
        return MuonWithAdamW([{'params': [ps[0]], 'muon': True, 'weight_decay': 0.1}, {'params': [ps[1]]}], lr=1e-2)

    def run(opt, ps, steps, first):
        for t in range(first, first + steps):
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    full = params()
    run(make(full), full, 10, 0)
    cut = params()
    opt = make(cut)
    run(opt, cut, 5, 0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = make(cut)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run(opt2, cut, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(full, cut))


@pytest.mark.parametrize('shape', [(12, 7), (7, 12)])
def test_float32_newton_schulz_orthogonalises_like_bfloat16(shape):
    """The CPU's Newton-Schulz (float32) lands every singular value where torch's bfloat16 one does, in
    about [0.7, 1.2], with the same singular vectors: the polar factor P Q^T up to the quintic's spread."""
    U = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f32, bf16 = (newton_schulz5(U, dtype=d) for d in (torch.float32, torch.bfloat16))
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    for O in (f32.double(), bf16.double()):
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.6 and s.max() < 1.25, s
    P, _, Qh = torch.linalg.svd(U, full_matrices=False)
    polar = P @ Qh
    assert (f32.double() - polar).norm() / polar.norm() < 0.35  # the quintic's spread, not an error
    assert (f32.double() - bf16.double()).norm() / polar.norm() < 0.05  # bfloat16's rounding only


def test_loop_picks_the_newton_schulz_dtype_by_device(tiny_cfg, stdlib_corpus):
    """auto: float32 on a CPU (bfloat16 products are emulated there; studies/gpu_check.py runs CUDA's
    bfloat16); a key names either explicitly."""
    model = build_model(tiny_cfg(), stdlib_corpus.vocab_size, torch.device('cpu'))
    for key, want in (('auto', torch.float32), ('bfloat16', torch.bfloat16), ('float32', torch.float32)):
        opt, _ = train.build_optimizer(tiny_cfg(optimizer='muon', muon_ns_dtype=key), model, bs=1)
        assert {g['ns_dtype'] for g in opt.param_groups} == {want}


# -----------------------------------------------------------------------------
# the split the loop makes

END_NAMES = ('wte', 'wpe', 'lm_head', 'relative_attention_bias')  # embeddings and the head, by name


@pytest.mark.parametrize('model_type, preset, n_hidden', [('gpt', 'tiny', 2 * 4), ('t5', 't5-tiny', 2 * (4 + 7))])
def test_split_hidden_matrices_to_muon_the_rest_to_adamw(tiny_cfg, stdlib_corpus, model_type, preset, n_hidden):
    """GPT: attention and MLP matrices per block; T5-lite: the encoder's 4, the decoder's 7 (self- and
    cross-attention, MLP). Embeddings, the head (tied or not), norms and biases: AdamW. None twice or missing."""
    cfg = tiny_cfg(model_type=model_type, model=preset, optimizer='muon')
    model = build_model(cfg, stdlib_corpus.vocab_size, torch.device('cpu'))
    opt, hooks = train.build_optimizer(cfg, model, bs=1)
    assert isinstance(opt, MuonWithAdamW) and hooks == []
    named = dict(model.named_parameters())  # a tied weight once
    hidden = {n for n, p in named.items() if p.dim() == 2 and not any(e in n for e in END_NAMES)}
    assert len(hidden) == n_hidden, sorted(hidden)
    name_of = {id(p): n for n, p in named.items()}
    muon = [name_of[id(p)] for g in opt.param_groups if g['muon'] for p in g['params']]
    adamw = [name_of[id(p)] for g in opt.param_groups if not g['muon'] for p in g['params']]
    assert sorted(muon) == sorted(hidden)
    assert sorted(adamw) == sorted(set(named) - hidden) and not set(muon) & set(adamw)
    assert len(muon) + len(adamw) == len(named)
    decay = {name_of[id(p)]: g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert all(decay[n] == (cfg.weight_decay if named[n].dim() >= 2 else 0.0) for n in named)  # as AdamW's


def test_other_optimizers_keep_their_two_groups(tiny_cfg, stdlib_corpus):
    cfg = tiny_cfg()
    model = build_model(cfg, stdlib_corpus.vocab_size, torch.device('cpu'))
    opt, _ = train.build_optimizer(cfg, model, bs=1)
    assert len(opt.param_groups) == 2 and not any('muon' in g or 'lr_scale' in g for g in opt.param_groups)


def test_optimizer_key_offers_every_optimizer():
    assert set(train.TrainConfig.__dataclass_fields__['optimizer'].metadata['valid']) == set(train.OPTIMIZERS)


# -----------------------------------------------------------------------------
# through the loop




def test_muon_run_learns_resumes_bit_identically_and_schedules_both_lrs(tiny_cfg, tmp_path):
    N = 12
    # batch_size 4: a shape with no committed RST table (a table that exists must have optimizer:muon, whatever the unit)
    kw = dict(optimizer='muon', batch_size=4, budget=N, eval_interval=N // 2, lr=3e-3, muon_lr=0.02)
    full = train.train(tiny_cfg(out_dir=str(tmp_path / 'a'), **kw))
    evals = [r['val_loss'] for r in read_log(tmp_path / 'a') if 'val_loss' in r]
    assert evals[-1] < evals[0] < math.log(256), evals

    cut = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), **kw), StopAfter(4, N // 2))
    assert cut['interrupted'] and cut['steps'] == N // 2
    groups = load(tmp_path / 'b')['optimizer']['param_groups']  # mid-schedule: both lrs scaled by one factor
    muon_lr, adamw_lr = {g['lr'] for g in groups if g['muon']}, {g['lr'] for g in groups if not g['muon']}
    assert len(muon_lr) == len(adamw_lr) == 1 and 0 < adamw_lr.pop() < 3e-3
    lr = next(r['lr'] for r in read_log(tmp_path / 'b') if r['step'] == N // 2 and 'lr' in r)  # the schedule's
    assert muon_lr.pop() == pytest.approx(lr * 0.02 / 3e-3, rel=1e-12)

    resumed = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), init_from='resume', **kw))
    assert resumed['steps'] == N and resumed['val_loss'] == full['val_loss']
    assert without_timing(read_log(tmp_path / 'b')) == without_timing(read_log(tmp_path / 'a'))
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_rst_needs_an_optimizer_muon_entry(tiny_cfg, tmp_path):
    """A table measured before Muon (the committed ones): one line names the missing entry and the command."""
    table = json.loads((ROOT / 'config/rst/gpt_L2_H2_D64_T64_V256_B8.json').read_text())
    table['optimizer'].pop('muon', None)
    (tmp_path / 'table.json').write_text(json.dumps(table))
    with pytest.raises(UserError, match=r'no optimizer entry for muon: price it with `python calibrate\.py'):
        train.train(tiny_cfg(optimizer='muon', budget_unit='rst', budget=1.0, rst_table=str(tmp_path / 'table.json')))


def test_ddp_ranks_stay_identical(tmp_path):
    """Two gloo ranks with grad_accum 2: gradients are all-reduced before Muon's step, and Newton-Schulz is
    deterministic, so both ranks end with bit-identical parameters."""
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'tests/ddp_ranks.py',
           '--model=tiny', '--batch_size=4', '--grad_accum=2', '--optimizer=muon', '--budget_unit=iters', '--budget=4',
           '--compile_loss=False', '--sample_tokens=0', '--eval_batches=2', '--log_interval=1', '--peak_flops=1e12',
           f'--out_dir={out}']
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = [torch.load(out / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert len([r for r in read_log(out) if 'train_loss' in r]) == 4
