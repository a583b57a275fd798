"""WSD cooldown branches (issue 12): one trunk to the largest budget, a cooldown branch per smaller budget;
every branch equals a standalone WSD run at its budget bit for bit, a killed trunk resumes to the same
branches, and the script prints what the branches saved. The schedules' closed forms are in test_budget.py."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import budget as budget_lib
import runs
import train
from configurator import UserError
from conftest import StopAfter, run_script
from train import TrainConfig

BUDGET, MULTIPLES, WARMUP = 20, (1, 2, 4), 2
RUN = dict(model='tiny', batch_size=8, budget_unit='iters', schedule='wsd', warmup_units=WARMUP, compile_loss=False,
           sample_tokens=0, peak_flops=1e12, eval_batches=4, eval_interval=1000, log_interval=1)
ARGV = [f'--{k}={v}' for k, v in RUN.items()] + [f'--budget={BUDGET}', '--branch_budgets=(1,2,4)']
TIMING_KEYS = {'wall', 'tokens_per_s', 'mfu', 'eta_s'}


def branches_cfg(out_dir):
    return TrainConfig(out_dir=str(out_dir), budget=BUDGET, branch_budgets=MULTIPLES, **RUN)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def folders(out_dir):
    return {b: out_dir / f'budget_{b}' for b in (20, 40, 80)}


def read_log(path):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in path.read_text().splitlines()]


def assert_same_checkpoints(got_dir, want_dir):
    for b, folder in folders(got_dir).items():
        got, want = load(folder / 'ckpt.pt'), load(folders(want_dir)[b] / 'ckpt.pt')
        assert got['iter_num'] == want['iter_num'] == b, b
        assert got['model'].keys() == want['model'].keys()
        for k in want['model']:
            assert torch.equal(got['model'][k], want['model'][k]), (b, k)
        for sg, sw in zip(got['optimizer']['state'].values(), want['optimizer']['state'].values()):
            assert all(torch.equal(sg[k], sw[k]) for k in sw), b


@pytest.fixture(scope='module')
def reference(stdlib_corpus, tmp_path_factory):
    """The uninterrupted branches run: budgets 20, 40 and 80 iters from one trunk."""
    out_dir = tmp_path_factory.mktemp('branches') / 'ref'
    results = train.train_wsd_branches(branches_cfg(out_dir))
    return out_dir, results


# -----------------------------------------------------------------------------
# the schedule a branch relies on

def test_wsd_with_absolute_warm_up_agrees_across_budgets_until_the_cooldown():
    """Why a trunk at 4B can stand in for a run at B: with warm-up in absolute units, the two LR curves are
    identical up to B's cooldown start (1 - f) B, and the branch then follows B's own cooldown to min_lr."""
    cfg = TrainConfig(lr=1.0, min_lr=0.1, schedule='wsd', warmup_units=2.0, cooldown_frac=0.2, budget=80)
    spent = np.linspace(0, 16, 161)
    small = [budget_lib.lr_at(s, 20.0, cfg) for s in spent]
    assert small == [budget_lib.lr_at(s, 80.0, cfg) for s in spent]
    assert small[10] == pytest.approx(0.5) and small[20:] == [1.0] * 141        # warm-up over 2 units, then the plateau
    x = np.linspace(0, 1, 101)                                   # inside B's cooldown: 1 - sqrt(x), to min_lr
    lrs = np.array([budget_lib.lr_at(16 + 4 * xi, 20.0, cfg) for xi in x])
    assert lrs == pytest.approx(0.1 + 0.9 * (1 - np.sqrt(x)), abs=1e-12) and lrs[-1] == 0.1
    assert budget_lib.lr_at(17.0, 20.0, cfg) == pytest.approx(0.1 + 0.9 * 0.5)   # x = 0.25: half-way


# -----------------------------------------------------------------------------
# branches = standalone runs

def test_every_budget_gets_a_run_folder(reference):
    out_dir, results = reference
    assert sorted(results) == [20, 40]                          # the branches (80 is the trunk)
    for b, folder in folders(out_dir).items():
        ckpt = load(folder / 'ckpt.pt')
        assert runs.run_finished(folder) and ckpt['iter_num'] == b and ckpt['config']['budget'] == b
        assert json.loads((folder / 'config.json').read_text())['config']['budget'] == b
        steps = [r['step'] for r in read_log(folder / 'log.jsonl') if 'train_loss' in r]
        assert steps == list(range(1, b + 1)), (  # the trunk's log up to the branch point, then its own
            f'budget {b}: train records for steps {steps}: the trunk copies its log to the branch before it logs '
            f'the branch-point step, so that step is missing (train.py: save branch points after logging)')
        lrs = [r['lr'] for r in read_log(folder / 'log.jsonl') if 'train_loss' in r]
        # each step runs at the lr of its middle: steps 3..0.8b at the peak, then the cooldown
        assert lrs[WARMUP:int(0.8 * b)] == [2e-3] * (int(0.8 * b) - WARMUP) and lrs[-1] < 2e-3 / 4


@pytest.mark.parametrize('b', [20, 40])
def test_a_branch_equals_a_standalone_wsd_run(reference, tmp_path, b):
    out_dir, results = reference
    alone = train.train(TrainConfig(out_dir=str(tmp_path / 'alone'), budget=b, **RUN))
    assert results[b]['steps'] == alone['steps'] == b
    assert results[b]['val_loss'] == alone['val_loss']
    spent = {k: v for k, v in results[b]['spent'].items() if k != 'wall'}
    assert spent == {k: v for k, v in alone['spent'].items() if k != 'wall'}
    branch, ref = load(folders(out_dir)[b] / 'ckpt.pt'), load(tmp_path / 'alone' / 'ckpt.pt')
    for k in ref['model']:
        assert torch.equal(branch['model'][k], ref['model'][k]), k
    for sb, sr in zip(branch['optimizer']['state'].values(), ref['optimizer']['state'].values()):
        assert all(torch.equal(sb[k], sr[k]) for k in sr)
    logs = read_log(folders(out_dir)[b] / 'log.jsonl'), read_log(tmp_path / 'alone' / 'log.jsonl')
    assert logs[0] == logs[1], (  # every record but timing; weights, steps and spent are equal above
        f"the weights are equal but the branch's log is not the standalone run's: steps "
        f"{[r['step'] for r in logs[0]]} vs {[r['step'] for r in logs[1]]} (see test_every_budget_gets_a_run_folder)")


# -----------------------------------------------------------------------------
# interrupted trunks

def test_ctrl_c_in_the_trunk_then_the_same_call_again(reference, tmp_path):
    """Ctrl-C at trunk step 24 (past the budget-20 branch point at 16, before budget 40's at 32)."""
    cfg = branches_cfg(tmp_path / 'cut')
    try:
        train.train_wsd_branches(cfg, lambda c: StopAfter(8, 24) if c.budget == 80 else None)
        first_call = None
    except Exception as e:  # noqa: BLE001 -- reported below, after checking what a second call makes of it
        first_call = f'{type(e).__name__}: {e}'
    assert load(folders(tmp_path / 'cut')[80] / 'ckpt.pt')['iter_num'] == 24   # Ctrl-C saved the trunk
    train.train_wsd_branches(cfg)
    assert_same_checkpoints(tmp_path / 'cut', reference[0])
    assert first_call is None, (
        f'after Ctrl-C stopped the trunk, train_wsd_branches went on to the branches and failed ({first_call}): '
        f"it should return when the trunk's run() reports interrupted (see the report's diff)")


class Crash(BaseException):
    """The process dies (kill -9, power): nothing is saved on the way out."""


class CrashAfter(StopAfter):
    def __call__(self, model, data, ctx):
        if self.calls == self.steps:
            raise Crash
        return super().__call__(model, data, ctx)


def test_a_crashed_trunk_then_the_same_call_again(reference, tmp_path):
    """The trunk dies at step 20 (past the first branch checkpoint, before it saved one of its own)."""
    cfg = branches_cfg(tmp_path / 'crash')
    with pytest.raises(Crash):
        train.train_wsd_branches(cfg, lambda c: CrashAfter(8, 20) if c.budget == 80 else None)
    trunk = folders(tmp_path / 'crash')[80]
    assert (trunk / 'log.jsonl').exists() and not (trunk / 'ckpt.pt').exists()
    assert load(folders(tmp_path / 'crash')[20] / 'ckpt.pt')['iter_num'] == 16  # step 17 is budget 20's cooldown
    try:
        train.train_wsd_branches(cfg)
    except UserError as e:
        pytest.fail(f'running the same command again after the trunk died fails: {e} -- the trunk had written its '
                    f'log but no checkpoint, and train_wsd_branches restarts it with overwrite=False (see the report)')
    assert_same_checkpoints(tmp_path / 'crash', reference[0])


def test_a_branch_whose_cooldown_is_shorter_than_a_step(tmp_path):
    """Budget 5 iters: the cooldown (1 unit) starts after step 4, so the trunk's step-5 checkpoint already
    holds the whole budget; the branch must still end as a finished, evaluated run like a standalone one."""
    results = train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=MULTIPLES, **RUN))
    alone = train.train(TrainConfig(out_dir=str(tmp_path / 'alone'), budget=5, **RUN))
    assert results[5]['val_loss'] == alone['val_loss'] and runs.read_run(tmp_path / 'br' / 'budget_5')['complete'], (
        f"the budget-5 branch resumed with nothing left to train, skipped its final eval (val loss "
        f"{results[5]['val_loss']}) and kept the trunk's checkpoint, so it is never finished and compare leaves it "
        f'out: see the report')
    assert runs.run_finished(tmp_path / 'br' / 'budget_5')


def test_a_branch_budget_that_fails_a_check_is_refused_before_the_trunk_trains(tmp_path):
    """--budget=20 iters with --branch_budgets=(0.525, 1): the 10.5-iter branch is no whole number of steps.
    Refused in one line naming --branch_budgets before any step (the trunk trained to the branch point, then
    failed naming a --budget the user never gave), and no folder is left."""
    with pytest.raises(UserError) as e:
        train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=20, branch_budgets=(0.525, 1), **RUN))
    assert re.fullmatch(r'--branch_budgets=\(0.525, 1\): its 0.525 x --budget=20 is a budget of 10.5 iters, which fails a '
                        r'check \(--budget=10.5 iters is not a whole number[^:]*\): give other multiples', str(e.value)), \
        str(e.value)  # one fix: the check's own ("give 10 or 11") named a --budget never given
    assert not (tmp_path / 'br').exists()


def test_the_script_prints_what_the_branches_spend(reference, tmp_path):
    argv = [a for a in ARGV if not a.startswith('--budget=')] + ['--budget=10']
    out = run_script('train.py', *argv, f'--out_dir={tmp_path / "cli"}', timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if 'branches spent' in l]
    # 40 + 0.2 x (10 + 20) = 46 = 4.6 x 10, against 10 + 20 + 40 = 70 = 7 x 10 for three runs
    assert line == ['budgets 10, 20, 40 iters: branches spent 46, separate runs would spend 70 (0.66x)'], out.stdout
    # the script's trunk at 40 and branch at 20 are the reference's branches at 40 and 20, bit for bit
    for b in (20, 40):
        got, want = load(tmp_path / 'cli' / f'budget_{b}' / 'ckpt.pt'), load(folders(reference[0])[b] / 'ckpt.pt')
        assert got['iter_num'] == want['iter_num'] == b
        assert all(torch.equal(got['model'][k], want['model'][k]) for k in want['model']), b


def test_branches_of_another_config_are_refused_not_reused(tmp_path):
    """A finished set of branches in out_dir is reused only by the same config: with another lr the call is
    refused (it would have printed the old runs' results as this config's); --overwrite=True reruns them."""
    first = train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **RUN))
    other = TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **{**RUN, 'lr': 1e-3})
    with pytest.raises(UserError, match='budget_5 holds a run of another config: --overwrite=True'):
        train.train_wsd_branches(other)
    assert train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **RUN)) == {}
    again = train.train_wsd_branches(dataclasses.replace(other, overwrite=True))
    assert again[5]['val_loss'] != first[5]['val_loss']
    assert json.loads((tmp_path / 'br' / 'budget_10' / 'config.json').read_text())['config']['lr'] == 1e-3


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_overwrite_deletes_nothing_before_its_checks_or_under_a_live_run(tmp_path):
    """--overwrite=True replaces the branches only as the new trunk reaches them: a call that fails a check
    (a corpus that is not there) or finds a branch folder in use by another run leaves every saved run as it was."""
    train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **RUN))
    before = tree(tmp_path / 'br')
    bad = TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), overwrite=True, **{**RUN, 'dataset': 'nosuchdata'})
    with pytest.raises(UserError, match='nosuchdata'):
        train.train_wsd_branches(bad)
    assert tree(tmp_path / 'br') == before
    other = TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), overwrite=True, **{**RUN, 'lr': 1e-3})
    with runs.FolderLock(tmp_path / 'br' / 'budget_5' / 'lock', runs.in_use(tmp_path / 'br' / 'budget_5')):  # a live branch
        with pytest.raises(UserError, match='budget_5 is in use by another run'):
            train.train_wsd_branches(other)
        assert {k: v for k, v in tree(tmp_path / 'br').items() if k != 'budget_5/lock'} == before
    train.train_wsd_branches(other)
    for b in (5, 10):  # both replaced, each folder one run: its config, its log from step 0
        saved = json.loads((tmp_path / 'br' / f'budget_{b}' / 'config.json').read_text())['config']
        assert saved['lr'] == 1e-3 and saved['budget'] == b and runs.run_finished(tmp_path / 'br' / f'budget_{b}')


def test_an_overwrite_stopped_before_a_branch_point_resumes_without_overwrite(tmp_path):
    """--overwrite=True stopped before the first branch point: the old branches still hold the other config.
    The command without --overwrite resumes the new trunk (not refused, not restarted) and replaces them as reached."""
    train.train_wsd_branches(TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **RUN))
    other = TrainConfig(out_dir=str(tmp_path / 'br'), budget=5, branch_budgets=(1, 2), **{**RUN, 'lr': 1e-3})
    assert train.train_wsd_branches(dataclasses.replace(other, overwrite=True), lambda c: StopAfter(8, 2)) == {}
    assert load(tmp_path / 'br' / 'budget_10' / 'ckpt.pt')['iter_num'] == 2  # the new trunk, stopped at step 2
    results = train.train_wsd_branches(other)
    assert set(results) == {5}
    for b in (5, 10):
        assert json.loads((tmp_path / 'br' / f'budget_{b}' / 'config.json').read_text())['config']['lr'] == 1e-3
        assert runs.run_finished(tmp_path / 'br' / f'budget_{b}')
