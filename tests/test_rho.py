"""rho.py: RHO-LOSS and Selective Backprop against hand computations; the IL cache; RST; short runs."""
import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import budget as budget_lib
import rho
import train
from conftest import ROOT, Interrupting, run_script
from configurator import ConfigError, UserError, parse
from data.loader import Batches, Corpus, get_tokenizer, is_val, num_examples, write_corpus
from data.stdlib.prepare import stdlib_documents
from model import GPT
from runs import Runtime, read_run

TABLE = json.loads((ROOT / 'config' / 'rst' / 'gpt_L2_H2_D64_T64_V256_B8.json').read_text())  # tiny, B = 8
FWD, FWD_BWD, OPT = TABLE['fwd']['2'], TABLE['fwd_bwd']['2'], TABLE['optimizer']['adamw']
T = 64  # the tiny preset's block size
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # on a shared 2-core machine two threads per process thrash


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- the selection rules on constructed batches ------------------------------------------------------

class RowLoss(torch.nn.Module):
    """A stand-in model whose per-token loss is the input token itself (times a weight of 1), so an
    example's loss is what its row holds; it records each call's mode, grad state and rows."""

    def __init__(self, block_size=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.active_layers, self.config, self.calls = [0, 1], SimpleNamespace(block_size=block_size), []

    def forward(self, x, y, weight=None):
        """Per-token losses, or with weight their weighted sum (the model's fused path)."""
        self.calls.append((self.training, torch.is_grad_enabled(), x[:, 0].clone()))
        losses = x.float() * self.w
        return losses if weight is None else (losses * weight).sum()


def context(model, budget, tokens=None, world_size=1):
    """A real RunContext over the few trainer pieces an objective reads (model, budget, rt, the train split)."""
    trainer = SimpleNamespace(cfg=None, rt=Runtime(torch.device('cpu'), torch.float32, 0, world_size),
                              out_dir=None, corpus=SimpleNamespace(splits={'train': tokens}), model=model,
                              budget=budget, building=False)
    return train.RunContext(trainer)


class FixedBatch:
    def __init__(self, x, ids):
        self.x, self.ids = x, ids

    def next(self, n):
        assert n == len(self.x)
        return self.x, self.x, self.ids


def rho_objective(losses, il_by_example, ks, n_b, budget, block=4, world_size=1):
    """A RhoLoss over one constructed mega-batch (nB = its size): row i has loss losses[i], id ks[i] * block."""
    obj = rho.RhoLoss(rho.RhoConfig(batch_size=n_b))
    obj.n_B, obj.n_b = len(losses), n_b
    obj.block_size = block  # what setup() would set
    obj.irreducible_loss = torch.tensor(il_by_example, dtype=torch.float32)
    data = FixedBatch(torch.tensor(losses)[:, None].repeat(1, block), torch.tensor(ks) * block)
    return obj, data, context(RowLoss(block), budget, world_size=world_size)


def test_rho_selects_top_nb_by_reducible_loss_ties_to_earlier():
    losses = [3, 1, 4, 1, 5, 9, 2, 6]
    ks = [5, 2, 7, 0, 3, 6, 1, 4]                    # example index of each row: id = k * block_size
    il_by_k = [1, 0, 0, 1, 1, 3, 8, 3]               # IL loss of example k
    il = [il_by_k[k] for k in ks]                    # [3, 0, 3, 1, 1, 8, 0, 1]
    # reducible = [0, 1, 1, 0, 4, 1, 2, 5] -> 5 (row 7), 4 (row 4), 2 (row 6), then of the tied 1s row 1
    budget = budget_lib.Budget('iters', 10, TABLE, lambda L: 1.0, 4, 8)
    obj, data, ctx = rho_objective(losses, il_by_k, ks, n_b=4, budget=budget)
    step = obj(ctx.model, data, ctx)
    (score_mode, score_grad, _), (train_mode, train_grad, trained) = ctx.model.calls
    assert (score_mode, score_grad) == (False, False) and (train_mode, train_grad) == (True, True)
    assert trained.tolist() == [losses[i] for i in (7, 4, 6, 1)]
    assert step.examples == 4 and step.loss.item() == pytest.approx((6 + 5 + 2 + 1) / 4)
    assert float(step.logs['loss_selected']) == pytest.approx((6 + 5 + 2 + 1) / 4)
    assert float(step.logs['il_selected']) == pytest.approx((il[7] + il[4] + il[6] + il[1]) / 4)
    assert float(step.logs['loss_scored']) == pytest.approx(sum(losses) / 8)
    assert float(step.logs['selected_frac']) == 0.5
    assert budget.spent['rst'] == pytest.approx(8 / 8 * FWD) and budget.spent['scored_examples'] == 8


def test_rho_with_zero_il_is_highest_loss_selection():
    losses = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    budget = budget_lib.Budget('iters', 10, None, lambda L: 1.0, 4, 8)
    obj, data, ctx = rho_objective(losses, [0.0] * 10, list(range(10)), n_b=4, budget=budget, world_size=2)
    step = obj(ctx.model, data, ctx)
    assert ctx.model.calls[1][2].tolist() == [9, 6, 5, 5]  # rows 5, 7, 4, 8: the tie 5/5 in row order
    assert step.examples == 4
    assert budget.spent['scored_examples'] == 2 * 10  # the context charges every rank's scoring pass


def test_selection_sizes():
    assert rho.RhoConfig(batch_size=8).selection_sizes() == (16, 8)
    assert rho.RhoConfig(batch_size=32, select_frac=0.1).selection_sizes() == (320, 32)
    assert rho.RhoConfig(batch_size=8, mega_batch=10, select_frac=0.3).selection_sizes() == (10, 3)
    for bad in ({'select_frac': 0.0}, {'holdout_frac': 1.0}, {'method': 'sb', 'stage': 'il'}, {'sb_beta': 0.0},
                {'method': 'rhoo'}, {'il_out_dir': 'out/rho'}, {'optimizer': 'lion'}, {'stage': 'il', 'optimizer': 'sophiag'},
                {'model_type': 't5', 'model': 't5-tiny'}, {'schedule': 'wsd', 'branch_budgets': (1, 2)}):
        with pytest.raises(ConfigError):
            rho.RhoConfig(**bad)



def test_blank_il_paths_and_files_in_their_place_are_refused(tmp_path):
    """--il_out_dir='' would put the IL search and its model's files in the current folder; --il_cache=''
    is the default folder, but a blank one names a stray folder ' '; a file where either folder goes is
    refused before any training."""
    for bad, says in (({'il_out_dir': ''}, '--il_out_dir must be a non-empty path'),
                      ({'il_out_dir': '  '}, '--il_out_dir must be a non-empty path'),
                      ({'il_cache': ' '}, "--il_cache=' ' is blank")):
        with pytest.raises(ConfigError, match=says):
            rho.RhoConfig(**bad)
    out = run_script('rho.py', "--il_out_dir=''", env=ONE_THREAD)
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and 'il_out_dir' in out.stderr, out.stderr
    assert rho.RhoConfig(il_cache='').il_cache == ''
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='--il_cache=.*file is a file: give a folder'):
        rho.check_il_out_dir(rho.RhoConfig(il_out_dir=str(tmp_path / 'il'), il_cache=str(tmp_path / 'file')))


def test_sb_keep_prob_hand_computed():
    sb = rho.SelectiveBackprop(rho.RhoConfig(sb_history=4, sb_beta=2.0))
    sb.history = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # the new losses join the history first and the oldest two leave: [3, 4, 2.5, 10] -> sorted [2.5, 3, 4, 10]
    p = sb.keep_prob(torch.tensor([2.5, 10.0]))
    assert p.tolist() == [(1 / 4) ** 2, 1.0]
    assert sb.history.tolist() == [3.0, 4.0, 2.5, 10.0]


def sb_on_random_losses(beta, budget, seed=0, n_examples=40_000, block=4, batch_size=8):
    """A SelectiveBackprop over a random token stream whose tokens are the losses (RowLoss)."""
    g = np.random.default_rng(0)
    tokens = g.integers(0, 1_000_000, n_examples * block + 1)
    sb = rho.SelectiveBackprop(rho.RhoConfig(batch_size=batch_size, sb_beta=beta, seed=seed))
    ctx = context(RowLoss(block), budget, tokens)
    sb.setup(ctx)
    return sb, train.DataSource(Batches(tokens, block, seed), torch.device('cpu')), ctx


def test_sb_refuses_ddp():
    sb = rho.SelectiveBackprop(rho.RhoConfig(method='sb'))
    with pytest.raises(UserError, match='one process'):
        sb.setup(context(RowLoss(), None, world_size=2))


@pytest.mark.parametrize('arg', ['--select_frac=0.1', '--mega_batch=64'])
def test_sb_refuses_the_keys_it_does_not_read(arg):
    """RHO-LOSS's selection keys given to Selective Backprop changed nothing (its runs were identical): refused."""
    with pytest.raises(ConfigError, match=f"--{arg[2:].split('=')[0]} is RHO-LOSS's .*: Selective Backprop keeps"):
        parse(rho.RhoConfig, ['--method=sb', arg])
    parse(rho.RhoConfig, ['--method=rho', arg])
    parse(rho.RhoConfig, ['--method=sb'])  # the defaults pass (the check names them by value)


@pytest.mark.parametrize('beta, want', [(1.0, 1 / 2), (2.0, 1 / 3)])
def test_sb_long_run_kept_fraction(beta, want):
    budget = budget_lib.Budget('iters', 1e9, TABLE, lambda L: 1.0, 4, 8)
    sb, data, ctx = sb_on_random_losses(beta, budget)
    model, trained, above = ctx.model, 0, 0
    while budget.spent['scored_examples'] < 10_000:
        step = sb(model, data, ctx)
        trained += step.examples
        above += float(step.logs['loss_selected']) > float(step.logs['loss_scored'])
        assert step.examples == 8 and model.calls[-1][:2] == (True, True)
    kept = (trained + len(sb.buffer_ids)) / budget.spent['scored_examples']
    assert abs(kept - want) < 0.05
    assert budget.spent['rst'] == pytest.approx(budget.spent['scored_examples'] / 8 * FWD)
    assert above > 0.8 * trained / 8  # the kept examples are the high-loss ones


def test_sb_history_rule_keeps_about_half_while_the_loss_falls():
    """A training run's losses fall: here 1 + 3 exp(-t / 300) + U(0, 1) per example, 32 a step, 1000 steps.
    The rule's history (the last 10 micro-batches) keeps a mean 0.45-0.55 at beta = 1; the paper's 5000
    losses span the early, larger ones, so current losses rank low and far fewer are kept."""
    g = torch.Generator().manual_seed(0)

    def mean_keep(history):
        sb = rho.SelectiveBackprop(rho.RhoConfig(batch_size=32, sb_history=history))
        return np.mean([sb.keep_prob(1 + 3 * math.exp(-t / 300) + torch.rand(32, generator=g)).mean().item()
                        for t in range(1000)])
    assert 0.45 <= mean_keep(0) <= 0.55
    assert mean_keep(5000) < 0.4


def trained_rows(sb, data, ctx, n_steps):
    rows = []
    for _ in range(n_steps):
        sb(ctx.model, data, ctx)
        rows.append(ctx.model.calls[-1][2].tolist())
    return rows


def test_sb_state_round_trip_resumes_exactly():
    budget = budget_lib.Budget('iters', 1e9, None, lambda L: 1.0, 4, 8)
    sb, data, ctx = sb_on_random_losses(1.0, budget, seed=3)
    for _ in range(6):
        sb(ctx.model, data, ctx)
    buf = io.BytesIO()
    torch.save({'objective': sb.state_dict(), 'data': data.batches.state_dict()}, buf)
    assert sb.buffer_ids  # something to carry over (else the test proves less)
    want = trained_rows(sb, data, ctx, 5)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    sb2, data2, ctx2 = sb_on_random_losses(1.0, budget, seed=3)  # fresh: history, buffer and generator from the state
    sb2.load_state_dict(state['objective'])
    data2.batches.load_state_dict(state['data'])
    assert trained_rows(sb2, data2, ctx2, 5) == want
    assert trained_rows(sb_on_random_losses(1.0, budget, seed=3)[0], data2, ctx2, 5) != want  # state matters


def test_holdout_split_is_fixed_and_disjoint():
    train_k, hold_k = rho.split_examples(5000, 0.2)
    assert len(np.intersect1d(train_k, hold_k)) == 0 and len(train_k) + len(hold_k) == 5000
    assert abs(len(hold_k) / 5000 - 0.2) < 0.03
    assert np.array_equal(rho.split_examples(5000, 0.2)[1], hold_k)
    assert np.array_equal(rho.split_examples(9000, 0.2)[1][:len(hold_k)], hold_k)  # keyed by k, not by n


# ----- the IL model's search: doublings while its held-out loss improves -------------------------------

def test_il_search_doubles_while_the_val_loss_improves_and_keeps_the_best(tmp_path, monkeypatch, capsys):
    """Val losses 3.0 at budget 1, 2.5 at 2, 2.495 at 4: the 4x run gains 0.005 < il_tol 0.01, so the search
    stops there (not at 8x) and keeps the 4x run; the IL cost is all three runs'. A search cut short by
    --il_doublings while still improving says so."""
    losses, trained = {1.0: 3.0, 2.0: 2.5, 4.0: 2.495, 8.0: 2.0}, []

    def fake_train(run, objective):
        folder = Path(run.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        trained.append(run.budget)
        for name in ('ckpt.pt', 'log.jsonl', 'config.json'):
            (folder / name).write_text(f'{name} of {run.budget:g}')
        return {'val_loss': losses[run.budget], 'steps': int(10 * run.budget), 'interrupted': False,
                'spent': {'rst': run.budget, 'tokens': 100 * run.budget, 'flops': 1.0, 'wall': 0.5}}
    monkeypatch.setattr(train, 'train', fake_train)
    monkeypatch.setattr(rho, 'precompute_il', lambda cfg, result: None)
    cfg = rho.RhoConfig(il_out_dir=str(tmp_path / 'il'), budget=1.0, budget_unit='iters', il_doublings=3, il_tol=0.01)
    result = rho.train_il(cfg)
    assert trained == [1.0, 2.0, 4.0] and result['search'] == [(1.0, 3.0), (2.0, 2.5), (4.0, 2.495)]
    assert result['val_loss'] == 2.495 and result['spent'] == {'rst': 7.0, 'tokens': 700.0, 'flops': 3.0, 'wall': 1.5}
    assert (tmp_path / 'il' / 'ckpt.pt').read_text() == 'ckpt.pt of 4'
    assert not result['still_improving']
    one = rho.train_il(dataclasses.replace(cfg, il_doublings=0, il_out_dir=str(tmp_path / 'one')))
    assert one['search'] == [(1.0, 3.0)] and trained[-1] == 1.0 and not one['still_improving']
    cut = rho.train_il(dataclasses.replace(cfg, il_doublings=1, il_out_dir=str(tmp_path / 'cut')))
    assert cut['search'] == [(1.0, 3.0), (2.0, 2.5)] and cut['still_improving']  # 2x still gained 0.5: said so
    assert 'still improving at the last doubling allowed: raise --il_doublings' in capsys.readouterr().out
    frac = rho.train_il(dataclasses.replace(cfg, budget=8.0, il_budget_frac=0.25, il_doublings=0, il_out_dir=str(tmp_path / 'frac')))
    one_tol0 = rho.train_il(dataclasses.replace(cfg, il_doublings=0, il_tol=0.0, il_out_dir=str(tmp_path / 'tol0')))
    assert not one_tol0['still_improving']                # one run: nothing to say about doublings
    assert frac['search'] == [(2.0, 2.5)] and frac['spent']['rst'] == 2.0  # a quarter of this run's budget, one run


def test_il_budget_is_a_budget_or_a_fraction_of_the_run_s():
    assert rho.RhoConfig(budget=120.0, il_budget_frac=0.1).il_first_budget() == pytest.approx(12.0)
    assert rho.RhoConfig(budget=120.0, il_budget=480.0).il_first_budget() == 480.0
    assert rho.RhoConfig(budget=120.0).il_first_budget() == 120.0
    for bad in (dict(il_budget=480.0, il_budget_frac=0.1), dict(il_budget_frac=-0.1)):
        with pytest.raises(ConfigError, match='give one of them'):
            rho.RhoConfig(budget=120.0, **bad)


# ----- end to end: a small corpus, the IL stage, the target runs ---------------------------------------

def small_corpus(path, transform=lambda text: text):
    docs, sizes = [], {'train': 0, 'val': 0}
    for name, text in stdlib_documents():
        docs.append((name, transform(text[:20_000])))
        sizes['val' if is_val(name, 0.2) else 'train'] += len(docs[-1][1])
        if sizes['train'] >= 150_000 and sizes['val'] >= 20_000:
            break
    write_corpus(path, docs, get_tokenizer('byte'), source='test', val_frac=0.2)
    return path


def flags(corpus, **kw):
    base = dict(dataset=corpus, model='tiny', batch_size=8, compile_loss=False, sample_tokens=0, eval_batches=4,
                eval_interval=1000, log_interval=5, peak_flops=1e12, budget_unit='rst', budget=0.25)
    return [f'--{k}={v}' for k, v in {**base, **kw}.items()]


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The real entry point: RHO-LOSS with --stage=all (IL model, cache, target run) and SB."""
    d = tmp_path_factory.mktemp('rho')
    corpus = small_corpus(d / 'corpus')
    out = run_script('rho.py', *flags(corpus, out_dir=d / 'rho', il_out_dir=d / 'il', method='rho', stage='all'),
                     env=ONE_THREAD)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    out_sb = run_script('rho.py', *flags(corpus, out_dir=d / 'sb', method='sb'), env=ONE_THREAD)
    assert out_sb.returncode == 0, out_sb.stdout[-2000:] + out_sb.stderr[-2000:]
    return SimpleNamespace(dir=d, corpus=corpus, rho=d / 'rho', il=d / 'il', sb=d / 'sb', cache=corpus / 'il' / 'il',
                           stdout=out.stdout)


def test_short_runs_lower_val_loss(runs):
    for run in (runs.il, runs.rho, runs.sb):
        final = read_log(run)[-1]
        assert final['val_loss'] < math.log(256) - 1.0, run  # an untrained model is at ln 256 = 5.55
    rho_steps = [r for r in read_log(runs.rho) if 'train_loss' in r]
    assert rho_steps and all(r['selected_frac'] == 0.5 and 'loss_scored' in r and 'il_selected' in r for r in rho_steps)
    assert all(0 < r['selected_frac'] <= 1 and 'loss_selected' in r for r in read_log(runs.sb) if 'train_loss' in r)
    il_record = read_log(runs.rho)[0]
    assert il_record['step'] == 0 and il_record['il_train_rst'] >= 0.25 and not il_record['il_charged']
    assert il_record['il_val_loss'] == json.loads((runs.cache / 'il_loss.json').read_text())['il_val_loss']
    assert read_run(runs.rho)['stats']['il_val_loss'] == il_record['il_val_loss']  # compare's table of what methods log


def test_rst_accounting_is_scoring_plus_training(runs):
    per_step = 16 / 8 * FWD + 8 / 8 * FWD_BWD + OPT  # nB = 16 scored, nb = 8 trained, one AdamW update
    final = read_log(runs.rho)[-1]
    steps = int(final['iters'])
    assert final['rst'] == pytest.approx(steps * per_step, rel=1e-9)
    assert (steps - 1) * per_step < 0.25 <= final['rst']  # it stopped at the first step past the budget
    assert final['scored_examples'] == 16 * steps and final['tokens'] == 8 * T * steps
    # SB: everything the run drew from the data was scored once; each step trained one batch of 8
    sb_final, ckpt = read_log(runs.sb)[-1], torch.load(runs.sb / 'ckpt.pt', weights_only=True)
    n = num_examples(Corpus(runs.corpus).splits['train'], T)  # SB trains on every example
    drawn = ckpt['data']['epoch'] * n + ckpt['data']['pos']
    sb_steps = int(sb_final['iters'])
    assert sb_final['scored_examples'] == drawn
    assert sb_final['rst'] == pytest.approx(drawn / 8 * FWD + sb_steps * (FWD_BWD + OPT), rel=1e-9)
    leftovers = len(ckpt['objective']['buffer_ids'])  # kept but not yet trained: fewer than a batch
    assert leftovers < 8 and drawn - 8 * sb_steps - leftovers > 0


def test_il_cache_lines_up_with_the_stream(runs):
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    cache = np.memmap(runs.cache / 'il_loss.f16', dtype=np.float16, mode='r')
    tokens = Corpus(runs.corpus).splits['train']
    assert len(cache) == num_examples(tokens, T) == info['identity']['num_examples']
    train_k, hold_k = rho.split_examples(len(cache), 0.2)
    assert np.isnan(cache[hold_k]).all() and np.isfinite(cache[train_k]).all()
    assert info['identity']['il_ckpt_sha256'] == hashlib.sha256((runs.il / 'ckpt.pt').read_bytes()).hexdigest()
    assert info['il_precompute']['examples'] == len(train_k)
    assert info['il_precompute']['rst'] == pytest.approx(len(train_k) / 8 * FWD)
    search = sorted((runs.il / 'search').iterdir(), key=lambda p: float(p.name[1:]))   # b0.25, b0.5, ...
    assert [b for b, _ in info['il_search']] == [float(p.name[1:]) for p in search][:len(info['il_search'])]
    assert info['il_train']['rst'] == pytest.approx(sum(read_log(p)[-1]['rst'] for p in search[:len(info['il_search'])]))
    best = min(info['il_search'], key=lambda t: t[1])  # the IL model is the search's best run, copied
    assert info['il_val_loss'] == best[1] and (runs.il / 'ckpt.pt').read_bytes() == (runs.il / 'search' / f'b{best[0]:g}' / 'ckpt.pt').read_bytes()
    model = GPT.from_checkpoint(torch.load(runs.il / 'ckpt.pt', weights_only=True)).eval()
    for k in train_k[[0, 1, len(train_k) // 2, -1]]:
        chunk = torch.from_numpy(tokens[k * T:k * T + T + 1].astype(np.int64))
        with torch.no_grad():  # an independent path: full logits and F.cross_entropy
            want = F.cross_entropy(model.logits(chunk[None, :-1])[0], chunk[1:]).item()
        assert float(cache[k]) == pytest.approx(want, abs=3e-3), k


SCORE_EXAMPLES = rho.score_examples


def scoring_calls(monkeypatch, stop_at=None):
    """rho.score_examples, recording each call's batch size; the call after stop_at calls raises Ctrl-C."""
    calls = []

    def counted(model, x, y):
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(len(x))
        return SCORE_EXAMPLES(model, x, y)
    monkeypatch.setattr(rho, 'score_examples', counted)
    return calls


def test_a_killed_il_precompute_resumes_from_its_partial_cache(runs, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM in the IL precompute saves the losses so far (as does every progress line, so a
    kill -9 loses at most PROGRESS_EVERY seconds); the same command scores only the rest, and the cache is
    bit for bit the one the fixture computed in one go. A partial cache of another scoring batch is not
    continued."""
    cfg = parse(rho.RhoConfig, flags(runs.corpus, out_dir=runs.rho, il_out_dir=runs.il, il_cache=tmp_path / 'cache',
                                     method='rho', stage='il'))
    n = len(rho.split_examples(num_examples(Corpus(runs.corpus).splits['train'], T), 0.2)[0])
    il = {'val_loss': 1.0, 'steps': 1, 'spent': {u: 0.0 for u in ('rst', 'tokens', 'flops', 'wall')}}
    monkeypatch.setattr(rho, 'PROGRESS_EVERY', 0.0)  # a progress line and a save after every mega-batch of nB = 16
    scoring_calls(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        rho.precompute_il(cfg, il)
    out = capsys.readouterr().out
    assert re.search(rf'IL precompute: 16/{n:,} examples \(\d+%\) \| [\d,]+ examples/s \| eta \d+m\d\ds', out), out
    assert f'IL precompute: 32/{n:,} examples' in out and f'interrupted after 32 of {n:,} examples' in out
    assert json.loads((tmp_path / 'cache' / 'il_loss.partial.json').read_text())['done'] == 32
    # saved while fingerprints named the first 2**20 tokens (as this short corpus's whole-stream hash does; a
    # longer corpus's whole-stream hash, faked here, differs): continued, not started over
    real = Corpus.fingerprint
    monkeypatch.setattr(Corpus, 'fingerprint', lambda self, whole=True: 'f' * 16 if whole else real(self, whole))
    calls = scoring_calls(monkeypatch)
    info = rho.precompute_il(cfg, il)
    assert 'resuming after 32 examples' in capsys.readouterr().out and sum(calls) == n - 32
    monkeypatch.setattr(Corpus, 'fingerprint', real)
    got, want = (np.fromfile(folder / 'il_loss.f16', dtype=np.float16) for folder in (tmp_path / 'cache', runs.cache))
    assert np.array_equal(got, want, equal_nan=True) and info['il_precompute']['examples'] == n
    assert not list((tmp_path / 'cache').glob('il_loss.partial.*'))  # the partial cache is gone with the final one
    scoring_calls(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        rho.precompute_il(cfg, il)
    calls = scoring_calls(monkeypatch)
    rho.precompute_il(dataclasses.replace(cfg, mega_batch=8), il)  # another batch: other low bits, not continued
    assert 'stale partial IL cache' in capsys.readouterr().out and sum(calls) == n


def test_a_rerun_reads_the_finished_il_search_instead_of_training(runs, monkeypatch):
    cfg = parse(rho.RhoConfig, flags(runs.corpus, out_dir=runs.rho, il_out_dir=runs.il, method='rho', stage='il'))
    monkeypatch.setattr(train, 'train', lambda *a, **k: pytest.fail('a finished IL run was trained again'))
    monkeypatch.setattr(rho, 'precompute_il', lambda cfg, result: None)
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    result = rho.train_il(cfg)
    assert [list(t) for t in result['search']] == info['il_search'] and result['val_loss'] == info['il_val_loss']
    assert result['spent']['rst'] == pytest.approx(info['il_train']['rst'])


def test_a_search_restored_from_its_logs_trains_only_its_best_run_again(runs, tmp_path, monkeypatch):
    """Logs and configs are committed, checkpoints are not: with every search run's checkpoint gone, the
    search is read from the logs and only the best run (the IL model's weights) is trained again, its cost
    counted once."""
    il = tmp_path / 'il'
    shutil.copytree(runs.il, il)
    for run in (il / 'search').iterdir():  # restored here: its config names this folder, not the fixture's
        saved = json.loads((run / 'config.json').read_text())
        saved['config']['out_dir'] = str(run)
        (run / 'config.json').write_text(json.dumps(saved))
        (run / 'ckpt.pt').unlink()
    (il / 'ckpt.pt').unlink()
    cfg = parse(rho.RhoConfig, flags(runs.corpus, out_dir=runs.rho, il_out_dir=il, method='rho', stage='il'))
    trained, real_train = [], train.train
    monkeypatch.setattr(train, 'train', lambda run, objective: trained.append(run.budget) or real_train(run, objective))
    monkeypatch.setattr(rho, 'precompute_il', lambda cfg, result: None)
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    result = rho.train_il(cfg)
    best = min(info['il_search'], key=lambda t: t[1])
    assert trained == [best[0]] and (il / 'ckpt.pt').exists()
    assert [b for b, _ in result['search']] == [b for b, _ in info['il_search']]
    # the same run trained again, in this process (the fixture's ran in a one-thread subprocess): close, not equal
    assert result['val_loss'] == pytest.approx(info['il_val_loss'], rel=1e-3)
    logged = {b: l for b, l in info['il_search'] if b != best[0]}
    assert {b: l for b, l in result['search'] if b != best[0]} == logged  # the others: their logs' val losses
    assert all(result['spent'][u] == pytest.approx(info['il_train'][u]) for u in ('rst', 'tokens', 'flops'))


def test_a_cache_whose_sidecar_names_the_corpus_by_its_first_tokens_still_loads(runs, tmp_path):
    """IL caches written before whole-stream corpus fingerprints hold the hash of each split's first 2**20
    tokens: they still load (the data did not change), and a hash of neither kind is stale."""
    cfg = rho.RhoConfig(dataset=str(runs.corpus), model='tiny', batch_size=8, il_out_dir=str(runs.il))
    corpus, old = Corpus(runs.corpus), tmp_path / 'cache'
    shutil.copytree(runs.cache, old)
    side = json.loads((old / 'il_loss.json').read_text())
    # this corpus is shorter than 2**20 tokens a split, so both hashes read every token and agree; a longer one's differ:
    assert side['identity']['corpus_fingerprint'] == corpus.fingerprint() == corpus.fingerprint(whole=False)
    corpus._fingerprint = 'f' * 16  # as a longer corpus's whole-stream hash would
    for fingerprint, loads in ((corpus.fingerprint(whole=False), True), ('0' * 16, False), ('f' * 16, True)):
        side['identity']['corpus_fingerprint'] = fingerprint
        (old / 'il_loss.json').write_text(json.dumps(side))
        if loads:
            rho.load_il_cache(dataclasses.replace(cfg, il_cache=str(old)), corpus, T)
        else:
            with pytest.raises(UserError, match='stale IL cache.*corpus_fingerprint'):
                rho.load_il_cache(dataclasses.replace(cfg, il_cache=str(old)), corpus, T)


def test_stale_cache_is_refused(runs, tmp_path):
    cfg = rho.RhoConfig(dataset=str(runs.corpus), model='tiny', batch_size=8, il_out_dir=str(runs.il))
    corpus = Corpus(runs.corpus)
    rho.load_il_cache(cfg, corpus, T)  # the fresh cache loads
    with pytest.raises(UserError, match='holdout_frac'):
        rho.load_il_cache(dataclasses.replace(cfg, holdout_frac=0.3), corpus, T)
    other_il = tmp_path / 'il'  # the same IL run with one weight changed
    shutil.copytree(runs.il, other_il)
    ckpt = torch.load(other_il / 'ckpt.pt', weights_only=True)
    ckpt['model']['lm_head.weight'][0, 0] += 1.0
    torch.save(ckpt, other_il / 'ckpt.pt')
    with pytest.raises(UserError, match='stale IL cache.*il_ckpt_sha256'):
        rho.load_il_cache(dataclasses.replace(cfg, il_out_dir=str(other_il), il_cache=str(runs.cache)),
                          corpus, T)
    # a damaged sidecar: not JSON, or a key of the wrong shape (read later by report_il) -> one line
    damaged = tmp_path / 'cache'
    shutil.copytree(runs.cache, damaged)
    info = json.loads((damaged / 'il_loss.json').read_text())
    for text, says in (('{"trunc', 'is not a readable JSON object'),
                       (json.dumps({**info, 'il_train': []}), r'is damaged \(no valid il_train\)')):
        (damaged / 'il_loss.json').write_text(text)
        with pytest.raises(UserError, match=f'il_loss.json {says}.*rebuild it with'):
            rho.load_il_cache(dataclasses.replace(cfg, il_cache=str(damaged)), corpus, T)
    # other data, through the command line: exit 2 and one clear line, before any training
    other = small_corpus(tmp_path / 'upper', transform=str.upper)
    out = run_script('rho.py', *flags(other, out_dir=tmp_path / 'rho', il_out_dir=runs.il, il_cache=runs.cache,
                                      stage='train'), env=ONE_THREAD)
    assert out.returncode == 2 and 'stale IL cache' in out.stderr and 'corpus_fingerprint' in out.stderr, out.stderr
    assert not (tmp_path / 'rho' / 'ckpt.pt').exists()


def target_cfg(runs, out_dir, **kw):
    """A RHO-LOSS target run of a few steps on the fixture's IL cache, for the real train.Trainer."""
    base = dict(dataset=str(runs.corpus), model='tiny', batch_size=8, compile_loss=False, sample_tokens=0,
                eval_batches=4, eval_interval=1000, log_interval=1, peak_flops=1e12, budget_unit='iters',
                budget=2, out_dir=str(out_dir), il_out_dir=str(runs.il), stage='train', charge_il=True)
    return rho.RhoConfig(**{**base, **kw})


def test_charge_il_adds_il_costs_and_target_never_sees_holdout(runs, tmp_path):
    cfg = target_cfg(runs, tmp_path / 'run')
    trainer = train.Trainer(cfg, rho.RhoLoss(cfg))
    n = num_examples(trainer.corpus.splits['train'], T)
    assert torch.equal(trainer.data.batches.examples, torch.from_numpy(rho.split_examples(n, 0.2)[0]))
    spent = trainer.run()['spent']
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    il_rst = info['il_train']['rst'] + info['il_precompute']['rst']
    assert spent['rst'] == pytest.approx(il_rst + 2 * (16 / 8 * FWD + FWD_BWD + OPT), rel=1e-9)
    assert spent['tokens'] == info['il_train']['tokens'] + 2 * 8 * T
    assert read_log(tmp_path / 'run')[0]['il_charged'] is True


def test_charged_il_costs_leave_a_whole_schedule_for_the_budget_left(runs, tmp_path):
    """Charged its IL model before the first step, the target's schedule spans what is left of the budget: it
    warms up from its first step and reaches min_lr on the last, instead of starting partway down a cosine sized
    for the whole budget (which left an IL-charged row's target at a fraction of its peak lr)."""
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    paid, step = info['il_train']['rst'] + info['il_precompute']['rst'], 16 / 8 * FWD + FWD_BWD + OPT
    cfg = target_cfg(runs, tmp_path / 'run', budget_unit='rst', budget=paid + 9.5 * step, schedule='cosine',
                     warmup_frac=0.2, lr=1e-3, min_lr=0.0)
    assert train.Trainer(cfg, rho.RhoLoss(cfg)).run()['spent']['iters'] == 10  # the tenth passes the budget
    lrs = [r['lr'] for r in read_log(tmp_path / 'run') if 'lr' in r]
    warm = 0.2 * 9.5 * step  # the warm-up: a fraction of the budget left
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * step / warm, rel=1e-6)  # the first step's middle, on the rise
    assert max(lrs) > 0.9e-3 and lrs[-1] == 0.0  # the last step's middle is where the budget ends
    assert lrs == [budget_lib.lr_at((i + 0.5) * step, 9.5 * step, cfg) for i in range(10)]
    assert budget_lib.lr_at(paid + 0.5 * step, paid + 9.5 * step, cfg) < 0.3e-3  # the whole budget's: near its end


def test_a_run_whose_costs_before_the_start_use_its_budget_says_it_trains_no_step(runs, tmp_path, capsys):
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    cfg = target_cfg(runs, tmp_path / 'run', budget_unit='rst', budget=0.5 * info['il_train']['rst'])
    assert train.Trainer(cfg, rho.RhoLoss(cfg)).run()['steps'] == 0
    assert 'use the whole budget: this run trains no step' in capsys.readouterr().out


class StopRho(Interrupting, rho.RhoLoss):
    """RhoLoss, interrupted after `steps` steps."""

    def __init__(self, cfg, steps):
        super().__init__(cfg)
        self.steps = steps


def test_resume_restores_the_restricted_order_and_charges_il_once(runs, tmp_path):
    """Interrupted after 2 of 4 steps and resumed == uninterrupted, bit for bit: the resumed stream draws
    the same non-holdout examples from where it stopped (setup only asks; the loop restores the position
    after building the restricted stream), and the IL costs and record come from the fresh run only."""
    whole = target_cfg(runs, tmp_path / 'whole', budget=4)
    want = train.Trainer(whole, rho.RhoLoss(whole)).run()
    part = dataclasses.replace(whole, out_dir=str(tmp_path / 'part'))
    assert train.Trainer(part, StopRho(part, 2)).run()['interrupted']
    part = dataclasses.replace(part, init_from='resume')
    got = train.Trainer(part, rho.RhoLoss(part)).run()
    a, b = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True) for run in ('whole', 'part'))
    assert a['data'] == b['data'] and a['iter_num'] == b['iter_num'] == 4
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for unit in ('rst', 'tokens', 'flops', 'scored_examples', 'iters'):  # wall differs: it is measured
        assert got['spent'][unit] == want['spent'][unit], unit
    info = json.loads((runs.cache / 'il_loss.json').read_text())
    assert got['spent']['tokens'] == info['il_train']['tokens'] + 4 * 8 * T  # IL tokens charged once
    assert [r['il_charged'] for r in read_log(tmp_path / 'part') if 'il_charged' in r] == [True]


def test_il_model_is_a_full_depth_adamw_baseline(runs, tmp_path):
    """The target run's --arch keys never reach the IL model, and a non-AdamW --optimizer is refused in one
    line where the IL model would train (before issue 15 both silently applied to the IL model too)."""
    il = tmp_path / 'il'
    out = run_script('rho.py', *flags(runs.corpus, out_dir=tmp_path / 'rho', il_out_dir=il, il_cache=tmp_path / 'cache',
                                      stage='il', arch='drop', theta_bar=0.1, budget_unit='iters', budget=3),
                     env=ONE_THREAD)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    config = json.loads((il / 'config.json').read_text())['config']
    assert (config['arch'], config['theta_bar'], config['optimizer'], config['label']) == ('full', 0.5, 'adamw', 'rho_il')
    assert all(r['active_layers'] == 2 for r in read_log(il) if 'train_loss' in r)
    assert (tmp_path / 'cache' / 'il_loss.json').exists()
    out = run_script('rho.py', *flags(runs.corpus, out_dir=tmp_path / 'rho', il_out_dir=tmp_path / 'il2',
                                      optimizer='lion'), env=ONE_THREAD)
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and '--stage=il' in out.stderr, out.stderr
    assert not (tmp_path / 'il2').exists() and not (tmp_path / 'rho').exists()
    # the target run takes them: --stage=train with another optimizer and layer dropping
    cfg = target_cfg(runs, tmp_path / 'lion_drop', optimizer='lion', arch='drop', theta_bar=0.1)
    assert train.Trainer(cfg, rho.RhoLoss(cfg)).run()['steps'] == 2
