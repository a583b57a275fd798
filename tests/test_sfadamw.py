"""Schedule-free AdamW: the schedulefree package's numbers (y, and x after eval()), exact eval/train switching,
and through the loop: the loss falls, every val loss is the model's at x, resume is bit-identical, and a point
of a longer run is the standalone run of that budget."""
import copy
import io
import json
import math

import pytest
import torch

import train
from configurator import ConfigError, UserError
from conftest import ROOT, StopAfter, load, read_log, without_timing
from model import evaluate
from optim_sfadamw import SFAdamW, average_weight
from runs import model_from_checkpoint

SHAPES = [(6, 5), (7,), (3, 4, 2)]


def random_params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_() for s in SHAPES]


def groups(ps):  # weight decay on the matrices, none on the vector, as the loop's groups
    return [{'params': [ps[0], ps[2]], 'weight_decay': 0.1}, {'params': [ps[1]], 'weight_decay': 0.0}]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize('foreach', [True, False])
@pytest.mark.parametrize('r, weight_lr_power', [(0.0, 2.0), (1.0, 1.0)])
def test_equals_schedulefree_adamw(foreach, r, weight_lr_power):
    """float64, 20 steps with weight decay and the optimizer's warm-up: y after every step, x after each eval()
    and y after the train() that follows (every 5 steps) are the reference's within 1e-12."""
    schedulefree = pytest.importorskip('schedulefree', reason='the reference needs `pip install schedulefree` (tests only)')
    ref, ours = random_params(0), random_params(0)
    hyper = dict(lr=0.02, betas=(0.9, 0.999), warmup_steps=5, r=r, weight_lr_power=weight_lr_power)
    opt_ref = schedulefree.AdamWScheduleFree(groups(ref), foreach=foreach, **hyper)
    opt = SFAdamW(groups(ours), **hyper)
    opt_ref.train()
    opt.train()
    g, worst = torch.Generator().manual_seed(1), 0.0
    for step in range(1, 21):
        for a, b in zip(ref, ours):
            a.grad = torch.randn(a.shape, dtype=torch.float64, generator=g)
            b.grad = a.grad.clone()
        opt_ref.step()
        opt.step()
        worst = max(worst, max_diff(ref, ours))
        if step % 5 == 0:
            opt_ref.eval(), opt.eval()
            worst = max(worst, max_diff(ref, ours))   # x
            opt_ref.train(), opt.train()
            worst = max(worst, max_diff(ref, ours))   # y
    assert max_diff(ours, random_params(0)) > 0.1  # the weights moved
    assert worst <= 1e-12, worst


def test_average_weight_follows_the_peak_lr():
    """c_t = w_t / sum(w): during a warm-up the small early lrs weigh little; at a constant lr, 1/t."""
    c, total = average_weight(1, 0.5, 0.0)
    assert (c, total) == (1.0, 0.25)
    c, total = average_weight(2, 1.0, total)
    assert c == pytest.approx(1 / 1.25)
    assert average_weight(3, 1.0, 2.0) == (pytest.approx(1 / 3), 3.0)
    assert average_weight(1, 0.0, 0.0) == (0.0, 0.0)  # lr 0 so far: no weight, no division by zero


def test_eval_train_round_trip_is_exact_and_step_refuses_x():
    ps = random_params(2)
    opt = SFAdamW(groups(ps), lr=0.05, weight_decay=0.0)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    y = [p.detach().clone() for p in ps]
    opt.eval()
    x = [p.detach().clone() for p in ps]
    assert max_diff(x, y) > 1e-3  # x and y differ after a few steps
    with pytest.raises(RuntimeError, match='train'):
        opt.step()
    opt.eval()  # twice: still x
    assert all(torch.equal(p, a) for p, a in zip(ps, x))
    opt.train()
    assert all(torch.equal(p, b) for p, b in zip(ps, y))


def test_state_dict_at_x_resumes_at_y_exactly():
    """Saved in eval mode (parameters at x, y in the state), loaded into fresh parameters set to x, train():
    ten steps equal ten uninterrupted ones, bit for bit."""
    def run(opt, ps, first, steps):
        for t in range(first, first + steps):
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=g)
            opt.step()

    full = random_params(3)
    run(SFAdamW(groups(full), lr=0.02, warmup_steps=3), full, 0, 10)
    cut = random_params(3)
    opt = SFAdamW(groups(cut), lr=0.02, warmup_steps=3)
    run(opt, cut, 0, 5)
    opt.eval()
    buf = io.BytesIO()
    torch.save({'params': [p.detach().clone() for p in cut], 'opt': opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = [x.clone().requires_grad_() for x in saved['params']]
    opt2 = SFAdamW(groups(fresh), lr=0.02, warmup_steps=3)
    opt2.load_state_dict(saved['opt'])
    opt2.train()
    run(opt2, fresh, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(full, fresh))


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match='betas'):
        SFAdamW([torch.zeros(2, requires_grad=True)], betas=(0.0, 0.999))
    with pytest.raises(ValueError, match='lr'):
        SFAdamW([torch.zeros(2, requires_grad=True)], lr=-1.0)


# -----------------------------------------------------------------------------
# through the loop

KW = dict(optimizer='sfadamw', warmup_units=2.0, lr=3e-3)





def assert_same_state(a, b):
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert sa.keys() == sb.keys() == {'z', 'exp_avg_sq', 'y'} and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_needs_an_absolute_warm_up(tiny_cfg):
    with pytest.raises(ConfigError, match=r'--optimizer=sfadamw needs a warm-up the same for every budget: give --warmup_units'):
        tiny_cfg(optimizer='sfadamw')  # the default warm-up is 2% of the budget
    with pytest.raises(ConfigError, match='onecycle'):
        tiny_cfg(optimizer='sfadamw', warmup_units=2.0, schedule='onecycle')
    tiny_cfg(optimizer='sfadamw', warmup_frac=0.0)  # no warm-up is the same for every budget


def test_every_val_loss_is_the_model_at_x_and_the_lr_stays_at_its_peak(tiny_cfg, monkeypatch):
    kept = []
    save = train.save_checkpoint
    monkeypatch.setattr(train, 'save_checkpoint', lambda path, ckpt: (kept.append(copy.deepcopy(ckpt)), save(path, ckpt)))
    cfg = tiny_cfg(budget=12, eval_interval=4, **KW)
    trainer = train.Trainer(cfg)
    trainer.run()
    log = read_log(cfg.out_dir)
    evals = {r['step']: r['val_loss'] for r in log if 'val_loss' in r}
    assert list(evals) == [4, 8, 12] and evals[12] < evals[4] < math.log(256), evals
    assert all(r['rst'] is None for r in log)  # this shape's committed table has no optimizer:sfadamw: RST uncounted
    lrs = [r['lr'] for r in log if 'lr' in r]
    assert lrs[:2] == [pytest.approx(3e-3 * 0.25), pytest.approx(3e-3 * 0.75)] and lrs[2:] == [3e-3] * 10  # no decay

    assert [c['iter_num'] for c in kept] == [4, 8, 12]
    args = (trainer.val_inputs, trainer.val_targets, cfg.batch_size, trainer.rt)
    for ckpt in kept:
        model = model_from_checkpoint(ckpt, cfg.out_dir, compile_loss=False)  # the checkpoint's weights: x
        assert evaluate(model, *args) == evals[ckpt['iter_num']] == ckpt['val_loss']
        opt, _ = train.build_optimizer(cfg, model, bs=1)
        opt.load_state_dict(ckpt['optimizer'])
        opt.train()  # the model at y, where the gradients were taken: another loss
        assert evaluate(model, *args) != pytest.approx(ckpt['val_loss'], rel=1e-6)


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    N = 10
    kw = dict(budget=N, eval_interval=3, **KW)  # evals at 3, 6, 9: round trips x <-> y inside the run
    full = train.train(tiny_cfg(out_dir=str(tmp_path / 'a'), **kw))
    cut = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), **kw), StopAfter(8, 5))  # stopped off an eval step
    assert cut['interrupted'] and cut['steps'] == 5
    resumed = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), init_from='resume', **kw))
    assert resumed['steps'] == N and resumed['val_loss'] == full['val_loss']
    a, b = read_log(tmp_path / 'a'), [r for r in read_log(tmp_path / 'b') if r.get('step') != 5 or 'val_loss' not in r]
    assert without_timing(a) == without_timing(b)  # but the stopped run's own eval at step 5
    assert_same_state(load(tmp_path / 'a'), load(tmp_path / 'b'))


def test_a_point_of_a_longer_run_is_the_standalone_run(tiny_cfg, tmp_path):
    """With an absolute warm-up and a constant lr, nothing before step N depends on the budget: a 2N-step run
    stopped at step N holds the weights (at x) and optimizer state of an N-step run, bit for bit; its log up
    to step N is the N-step run's, and its val loss at N (an eval, 2N run's eval_interval N) the same number."""
    N = 6
    short = train.train(tiny_cfg(out_dir=str(tmp_path / 'short'), budget=N, **KW))
    long = train.train(tiny_cfg(out_dir=str(tmp_path / 'long'), budget=2 * N, eval_interval=N, **KW))
    at_n = next(r['val_loss'] for r in read_log(tmp_path / 'long') if r['step'] == N and 'val_loss' in r)
    assert at_n == short['val_loss'] and long['val_loss'] < short['val_loss']
    train_records = lambda d: without_timing([r for r in read_log(d) if 'train_loss' in r and r['step'] <= N])
    assert train_records(tmp_path / 'long') == train_records(tmp_path / 'short')
    stopped = train.train(tiny_cfg(out_dir=str(tmp_path / 'stopped'), budget=2 * N, **KW), StopAfter(8, N))
    assert stopped['steps'] == N and stopped['val_loss'] == short['val_loss']
    assert_same_state(load(tmp_path / 'short'), load(tmp_path / 'stopped'))


def test_rst_needs_an_optimizer_sfadamw_entry(tiny_cfg):
    """A table without optimizer:sfadamw (the tiny shape's; the ablation's has one, calibrate.py --rst_add): an rst
    budget stops with the one-line calibrate error (a budget in another unit runs, RST uncounted: the tests above)."""
    assert 'sfadamw' not in json.loads((ROOT / 'config/rst/gpt_L2_H2_D64_T64_V256_B8.json').read_text())['optimizer']
    with pytest.raises(UserError, match=r'no optimizer entry for sfadamw: price it with `python calibrate\.py'):
        train.train(tiny_cfg(budget_unit='rst', budget=1.0, optimizer='sfadamw', warmup_frac=0.0))
