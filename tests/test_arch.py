"""Dynamic architectures (issue 4): layer stacking doubles the depth by copying blocks at budget fractions,
with fresh optimizer state for the new blocks; progressive layer dropping keeps block i with probability
1 - (1 - theta(p)) (i+1)/L and evaluates with every block; under an RST budget both buy more steps, as
many as the cost table predicts; both learn."""
import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from arch import LayerDropping, LayerStacking
from conftest import ROOT
from model import GPT, GPTConfig, evaluate
from train import TrainConfig

TINY_TABLE = json.loads((ROOT / 'config' / 'rst' / 'gpt_L2_H2_D64_T64_V256_B8.json').read_text())


def read_log(out_dir):
    return [json.loads(l) for l in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


def block_params(model, i):
    return dict(model.transformer.h[i].named_parameters())


def adamw_steps(model, optimizer, x, y, n):
    for _ in range(n):
        model(x, y).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# layer stacking

@pytest.fixture
def four_blocks():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_layer=4, n_head=2, n_embd=64, block_size=32, compile_loss=False))
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (4, 32), generator=g) for _ in range(2))
    return model, x, y


@pytest.mark.parametrize('mode', ['fresh_new', 'reset', 'keep'])
def test_doubling_copies_blocks_and_sets_the_optimizer_state(four_blocks, mode):
    model, x, y = four_blocks
    cfg = TrainConfig(model='tiny', stack_init_layers=2, stack_fracs=(0.5,), stack_optim=mode, lr=1e-2)
    optimizer, _ = train.build_optimizer(cfg, model, bs=4 * 32)
    adamw_steps(model, optimizer, x, y, 2)          # every block has weights of its own and AdamW state
    assert not torch.equal(model.transformer.h[2].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    stacking = LayerStacking(cfg, 4)
    stacking.before_step(model, optimizer, 0.0)
    assert model.active_layers == [0, 1]
    stacking.before_step(model, optimizer, 0.49)       # not yet
    assert model.active_layers == [0, 1] and stacking.eval_layers(model) == 2
    stacking.before_step(model, optimizer, 0.5)
    assert model.active_layers == [0, 1, 2, 3] and stacking.eval_layers(model) == 4

    for new, old in ((2, 0), (3, 1)):                  # [A B] -> [A B A B]: equal values, separate tensors
        for name, p in block_params(model, new).items():
            q = block_params(model, old)[name]
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), (new, name)

    # the output is that of running the two original blocks twice in sequence
    with torch.no_grad():
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(32))
        for i in (0, 1, 0, 1):
            h = model.transformer.h[i](h)
        logits = model.lm_head(model.transformer.ln_f(h))
        want = F.cross_entropy(logits.view(-1, 256), y.view(-1), reduction='none').view(4, 32)
        assert torch.equal(model.logits(x), logits)
        assert torch.allclose(model(x, y), want, atol=1e-5, rtol=1e-6)

    new_params = [p for i in (2, 3) for p in model.transformer.h[i].parameters()]
    old_params = [p for i in (0, 1) for p in model.transformer.h[i].parameters()]
    if mode == 'reset':
        assert not optimizer.state, 'stack_optim=reset must clear the whole optimizer state'
    elif mode == 'fresh_new':
        assert not any(p in optimizer.state for p in new_params), 'new blocks must start with no optimizer state'
        assert all(optimizer.state[p]['step'] == 2 for p in old_params)
    else:  # keep: the new blocks' own (stale) state stays, which is what tells the modes apart
        assert all(optimizer.state[p]['step'] == 2 for p in new_params + old_params)

    adamw_steps(model, optimizer, x, y, 3)          # the copies then train independently
    for new, old in ((2, 0), (3, 1)):
        for name, p in block_params(model, new).items():
            assert not torch.equal(p, block_params(model, old)[name]), (new, name)
    if mode == 'fresh_new':
        assert all(optimizer.state[p]['step'] == 3 for p in new_params)
        assert all(optimizer.state[p]['step'] == 5 for p in old_params)


def test_stacking_schedule_in_a_run(tiny_cfg):
    """budget 40 iters, doublings at 25% and 50%: 1 block for steps 1-10, 2 for 11-20, 4 for 21-40."""
    cfg = tiny_cfg(arch='stack', n_layer=4, stack_init_layers=1, stack_fracs=(0.25, 0.5), budget=40)
    trainer = train.Trainer(cfg)
    assert trainer.run()['steps'] == 40
    depth = [r['active_layers'] for r in read_log(cfg.out_dir) if 'train_loss' in r]
    assert depth == [1] * 10 + [2] * 10 + [4] * 20, depth
    steps = {i: {float(trainer.optimizer.state[p]['step']) for p in trainer.model.transformer.h[i].parameters()}
             for i in range(4)}
    # AdamW state counts the steps each block trained: new blocks started fresh at their doubling
    assert steps == {0: {40.0}, 1: {30.0}, 2: {20.0}, 3: {20.0}}, steps
    ckpt = torch.load(Path(cfg.out_dir) / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['arch'] == {'n_active': 4, 'doublings': 2} and ckpt['active_layers'] == [0, 1, 2, 3]


def test_stacking_evaluates_the_stacked_depth(tiny_cfg):
    cfg = tiny_cfg(arch='stack', n_layer=4, stack_init_layers=1, stack_fracs=(0.5,), budget=4)
    trainer = train.Trainer(cfg)
    result = trainer.run()
    assert trainer.model.active_layers == [0, 1]       # 1 -> 2 of 4 blocks; blocks 2 and 3 never ran
    args = (trainer.model, trainer.val_inputs, trainer.val_targets, cfg.batch_size, trainer.rt)
    assert result['val_loss'] == evaluate(*args, 2)
    assert result['val_loss'] != pytest.approx(evaluate(*args, 4), rel=1e-4)  # untrained blocks would change it


# -----------------------------------------------------------------------------
# progressive layer dropping

class Recorder:
    """A stand-in model: LayerDropping only asks for n_layer and sets the active blocks."""
    n_layer = 8

    def set_active_layers(self, layers):
        self.active_layers = list(layers)


def draw(dropping, p, n, model=None):
    model = model or Recorder()
    masks = []
    for _ in range(n):
        dropping.before_micro_batch(model, p)
        masks.append(model.active_layers)
    return masks


def test_keep_prob():
    for gamma_f in (100.0, 20.0):
        d = LayerDropping(TrainConfig(theta_bar=0.5, gamma_f=gamma_f))
        assert d.keep_prob(0.0) == 1.0
        assert 0.5 <= d.keep_prob(1.0) <= 0.5 + math.exp(-gamma_f)
        assert d.keep_prob(0.02) == pytest.approx(0.5 + 0.5 * math.exp(-gamma_f * 0.02))
    assert LayerDropping(TrainConfig(theta_bar=0.3, gamma_f=0.0)).keep_prob(0.7) == 1.0  # gamma 0: no dropping


@pytest.mark.parametrize('theta_bar, p', [(0.5, 1.0), (0.2, 0.02)])
def test_dropping_rates_match_the_formula(theta_bar, p):
    L, n = 8, 4000
    d = LayerDropping(TrainConfig(theta_bar=theta_bar, gamma_f=50.0))
    theta = theta_bar + (1 - theta_bar) * math.exp(-50.0 * p)
    masks = draw(d, p, n)
    mean_active = sum(len(m) for m in masks) / n
    assert mean_active == pytest.approx(L - sum((1 - theta) * (i + 1) / L for i in range(L)), abs=0.1)
    for i in range(L):  # block i is kept with probability 1 - (1 - theta)(i + 1)/L (SE <= 0.008)
        kept = sum(i in m for m in masks) / n
        assert kept == pytest.approx(1 - (1 - theta) * (i + 1) / L, abs=0.035), (i, kept)
    assert all(m == sorted(m) and m for m in masks)  # blocks run in order, never none


def test_dropping_is_deterministic_and_resumable(tmp_path):
    a, b, c = (LayerDropping(TrainConfig(theta_bar=0.5, seed=s)) for s in (5, 5, 6))
    first = draw(a, 0.5, 50)
    assert first == draw(b, 0.5, 50) and first != draw(c, 0.5, 50)
    state = a.state_dict()
    torch.save(state, tmp_path / 's.pt')                # it must survive a weights_only checkpoint
    later = draw(a, 0.5, 30)
    resumed = LayerDropping(TrainConfig(theta_bar=0.5, seed=99))
    resumed.load_state_dict(torch.load(tmp_path / 's.pt', weights_only=True))
    assert draw(resumed, 0.5, 30) == later


def test_dropping_evaluates_every_block(tiny_cfg):
    cfg = tiny_cfg(arch='drop', n_layer=4, theta_bar=0.1, gamma_f=100.0, budget=6)
    trainer = train.Trainer(cfg)
    result = trainer.run()
    depth = [r['active_layers'] for r in read_log(cfg.out_dir) if 'train_loss' in r]
    assert min(depth) < 4, depth                        # blocks were dropped in training ...
    full = GPT(dataclasses.replace(trainer.model.config, compile_loss=False))
    full.load_state_dict(trainer.model.state_dict())    # ... and eval is a plain full-depth model's
    full.eval()
    (val_x,), val_y = trainer.val_inputs, trainer.val_targets
    with torch.no_grad():
        total = sum(full(val_x[i:i + 8], val_y[i:i + 8]).sum().item() for i in range(0, len(val_x), 8))
    assert result['val_loss'] == pytest.approx(total / val_y.numel(), rel=1e-6)
    full.set_active_layers([0, 1])
    with torch.no_grad():
        partial = full(val_x, val_y).mean().item()
    assert partial != pytest.approx(result['val_loss'], rel=1e-4)


def interrupted_then_resumed(make, monkeypatch, interrupt):
    """Run to the end in folder a; in folder b, Ctrl-C (as `interrupt` delivers it), then resume."""
    full = train.train(make(out_dir=make().out_dir + '_a'))
    with monkeypatch.context() as m:
        interrupt(m)
        cut = train.train(make(out_dir=make().out_dir + '_b'))
    assert cut['interrupted']
    resumed = train.train(make(out_dir=make().out_dir + '_b', init_from='resume'))
    logs = [[{k: r.get(k) for k in ('step', 'active_layers', 'train_loss', 'val_loss')} for r in read_log(d)]
            for d in (make().out_dir + '_a', make().out_dir + '_b')]
    return full, resumed, logs


STACK_DROP = dict(n_layer=4, stack_init_layers=1, stack_fracs=(0.25, 0.5), theta_bar=0.3, gamma_f=20.0,
                  budget=12, eval_interval=100)


@pytest.mark.parametrize('arch', ['stack', 'drop'])
def test_resume_continues_the_architecture(tiny_cfg, monkeypatch, arch):
    """Ctrl-C between steps (after step 7's log line, past the first doubling), resume: the same run."""
    log_progress = train.Trainer._log_progress

    def stop_after_step_7(self, meter, lr):
        log_progress(self, meter, lr)
        if self.iter_num == 7:
            raise KeyboardInterrupt
    full, resumed, (log_a, log_b) = interrupted_then_resumed(
        lambda **kw: tiny_cfg(arch=arch, **{**STACK_DROP, **kw}), monkeypatch,
        lambda m: m.setattr(train.Trainer, '_log_progress', stop_after_step_7))
    assert resumed['val_loss'] == full['val_loss'] and resumed['steps'] == 12
    assert [r for r in log_b if r['step'] != 7 or r['val_loss'] is None] == log_a   # + the interrupt's eval
    assert len({r['active_layers'] for r in log_a if r['train_loss']}) > 1


class SigintDuringForward(train.CausalLM):
    """A real Ctrl-C: SIGINT arrives while step 8's forward is running (after its batch was drawn). The
    run's method stays the baseline's, which resumes it."""
    wraps_objective = True

    def __call__(self, model, data, budget):
        step = super().__call__(model, data, budget)
        if budget.spent['iters'] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return step


def test_a_ctrl_c_mid_step_resumes_exactly(tiny_cfg, monkeypatch):
    full, resumed, (log_a, log_b) = interrupted_then_resumed(
        lambda **kw: tiny_cfg(arch='drop', **{**STACK_DROP, **kw}), monkeypatch,
        lambda m: m.setattr(train, 'CausalLM', SigintDuringForward))
    masks = [[r['active_layers'] for r in log if r['train_loss']] for log in (log_a, log_b)]
    assert masks[0] == masks[1] and resumed['val_loss'] == full['val_loss'], (
        f'a Ctrl-C that lands inside a step (here in the forward of step 8) checkpoints step 7 together with '
        f"the data position and the layer-drop generator already advanced by step 8's draws, so the resumed run "
        f'skips a batch and a mask (layers per step {masks[0]} uninterrupted vs {masks[1]} resumed): '
        f'train.py should act on SIGINT/SIGTERM between steps (see the report)')


# -----------------------------------------------------------------------------
# RST: cheaper steps buy more of them, exactly as the table says; and both methods learn

F1, F2, OPT = TINY_TABLE['fwd_bwd']['1'], TINY_TABLE['fwd_bwd']['2'], TINY_TABLE['optimizer']['adamw']
RST_BUDGET = 0.2


def steps_for(step_cost, budget=RST_BUDGET):
    """Optimizer steps until the budget is spent, charging step_cost(p) per step (p at the step's start)."""
    spent, steps = 0.0, 0
    while spent < budget:
        spent, steps = spent + step_cost(spent / budget), steps + 1
    return steps


def drop_cost(p, theta_bar, gamma_f):
    """Expected cost of a tiny (2-block) step: 2 blocks run when neither drops, else 1 (block 0 at least)."""
    theta = theta_bar + (1 - theta_bar) * math.exp(-gamma_f * p)
    both = (1 - (1 - theta) / 2) * (1 - (1 - theta))
    return OPT + F1 + both * (F2 - F1)


def test_rst_budget_buys_the_steps_the_table_predicts(tiny_cfg, tmp_path):
    base = steps_for(lambda p: F2 + OPT)
    stack = steps_for(lambda p: (F1 if p < 0.5 else F2) + OPT)
    drop = steps_for(lambda p: drop_cost(p, 0.2, 20.0))
    assert base == math.ceil(RST_BUDGET / (F2 + OPT))
    kw = dict(budget_unit='rst', budget=RST_BUDGET, lr=3e-3, eval_interval=10)
    got = {name: train.train(tiny_cfg(out_dir=str(tmp_path / name), **{**kw, **extra})) for name, extra in (
        ('base', dict(eval_interval=1000)),
        ('stack', dict(arch='stack', stack_fracs=(0.5,))),                 # tiny: 1 -> 2 blocks half-way
        ('drop', dict(arch='drop', theta_bar=0.2, gamma_f=20.0)))}
    assert got['base']['steps'] == base
    assert abs(got['stack']['steps'] - stack) <= 1, (got['stack']['steps'], stack)
    assert got['drop']['steps'] == pytest.approx(drop, rel=0.06), (got['drop']['steps'], drop)
    for name, want in (('stack', stack), ('drop', drop)):
        ratio = got[name]['steps'] / got['base']['steps']
        assert ratio > 1.15 and ratio == pytest.approx(want / base, rel=0.06), (name, ratio, want / base)
        assert got[name]['spent']['rst'] >= RST_BUDGET and got[name]['spent']['iters'] == got[name]['steps']
        # they learn: the last eval is below the first (at step 10)
        evals = [r['val_loss'] for r in read_log(tmp_path / name) if 'val_loss' in r]
        assert len(evals) >= 3 and evals[-1] < evals[0] - 0.1, (name, evals)
