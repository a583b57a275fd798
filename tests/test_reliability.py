"""Reliability and bad input across the entry points: train.py, budget.py, calibrate.py, rho.py, slm.py,
madpo.py, the studies (python -m studies.ntng, studies.slm) and data/{stdlib,text,mathmix,reviews}/prepare.py.

Entry points run as real processes, but forked from a *zygote*: this file run as a script
(`python tests/test_reliability.py --zygote DIR`) imports torch and the project once, then for each request
forks a child that sets sys.argv and runs the script with runpy as __main__, exactly as `python SCRIPT
ARGS` would, with the child's own stdout/stderr files and exit code. A fork costs milliseconds where a
fresh interpreter costs seconds on this machine, which is what lets ~140 bad inputs and several kill -9
trials fit in the time budget. The parent can SIGKILL a child at a chosen time; hooks (named in the
request) let a child SIGKILL itself at an exact point, e.g. halfway through writing a checkpoint.

- bad inputs: (script, argv) -> exit code 2, exactly one non-empty stderr line, no traceback, an expected
  phrase in it, and every file of the protected folders (a finished run, an IL model and its cache, the
  corpora) byte-identical afterwards;
- non-finite loss: stops with the step named, the last good checkpoint kept, the step logged; or skipped and
  counted with --skip_nonfinite=True;
- kill -9 at random moments and mid-checkpoint, restart with --init_from=resume: the final weights and log
  equal an uninterrupted run's bit for bit; killed prepare/IL-precompute writes are never half-read;
- Ctrl-C then resume is bit-identical for every method (baseline, stack, drop, lion, sophiag, sb, rho, slm),
  and so is a real SIGINT/SIGTERM landing mid-step;
- checkpoints load with weights_only=True, caches with numpy; no source file unpickles.
"""
import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {'wall', 'tokens_per_s', 'mfu', 'eta_s'}  # measured, so they differ between runs
RUN_DIRS = []  # tmp folders of this module's runs: every checkpoint in them must load with weights_only=True
TINY = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--compile_loss=False', '--sample_tokens=0',
        '--eval_batches=2', '--peak_flops=1e12']


# -----------------------------------------------------------------------------
# the zygote (runs in its own process; no pytest there)

def _child(script, argv, hooks, out_path, err_path):
    """In the forked child: redirect fds, install hooks, run the script as __main__, exit like python."""
    import runpy
    import traceback
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdout = sys.__stdout__  # the zygote pointed it at stderr
    os.chdir(ROOT)
    module = argv[0] if script == '-m' else None  # `python -m studies.ntng ...`: a module of the lab
    sys.argv = [str(ROOT / (module.replace('.', '/') + '.py')), *argv[1:]] if module else [script, *argv]
    for hook in hooks:
        _install_hook(*hook.split(':', 1))
    code = 0
    try:
        if module:
            runpy.run_module(module, run_name='__main__', alter_sys=True)
        else:
            runpy.run_path(str(ROOT / script), run_name='__main__')
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_hook(kind, arg):
    """die_in_save:N      the N-th torch.save writes half its bytes, then the process is SIGKILLed;
    die_in_write:NAME  atomic_write_bytes of a file named NAME writes half its temp file, then SIGKILL;
    die_before:NAME    SIGKILL just before atomic_write_bytes writes NAME (everything before it complete);
    nan_at:K           the model's K-th training forward returns nan losses;
    signal_at:SIG:K    the process sends itself SIGINT/SIGTERM as the K-th training forward starts."""
    import torch
    if kind == 'die_in_save':
        real_save, calls = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] < int(arg):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            _die()
        torch.save = save
    elif kind in ('die_in_write', 'die_before'):
        import data.loader
        real_write = data.loader.atomic_write_bytes

        def write(path, data):
            if Path(path).name == arg:
                if kind == 'die_in_write':
                    with open(f'{path}.tmp{os.getpid()}', 'wb') as f:
                        f.write(data[:len(data) // 2])
                _die()
            return real_write(path, data)
        data.loader.atomic_write_bytes = write
        for name in ('rho', 'slm', 'runs'):  # they imported the function by name (runs: the caches)
            if name in sys.modules:
                sys.modules[name].atomic_write_bytes = write
    elif kind == 'nan_at':  # on the model class: the script's own CausalLM is __main__'s, not train's
        import model
        real_forward, calls = model.GPT.forward, [0]

        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            if self.training and torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == int(arg):
                    out = out * float('nan')
            return out
        model.GPT.forward = forward
    elif kind == 'signal_at':  # a real Ctrl-C (or a scheduler's SIGTERM) in the middle of step K
        import model
        name, k = arg.split(':')
        real_forward, calls = model.GPT.forward, [0]

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == int(k):
                    os.kill(os.getpid(), getattr(signal, name))
            return real_forward(self, *args, **kwargs)
        model.GPT.forward = forward
    else:
        raise ValueError(kind)


def zygote(work):
    """Serve requests (JSON lines on stdin) until stdin closes; answer each with one JSON line."""
    os.environ['OMP_NUM_THREADS'] = '1'
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(1)
    for name in ('budget', 'configurator', 'data.loader', 'rho', 'slm'):  # loaded once, shared by every fork
        importlib.import_module(name)
    import train
    # Building an optimizer imports torch._dynamo (~800 modules, seconds here): do it once, before forking.
    # Nothing is computed, so no thread pool exists yet that a fork could break.
    for name in train.OPTIMIZERS:
        train.build_optimizer(train.TrainConfig(), torch.nn.Linear(1, 1), 1, name=name)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else the zygote prints stays off the answer channel
    for n, line in enumerate(sys.stdin):
        req = json.loads(line)
        out_path, err_path = Path(work) / f'{n}.out', Path(work) / f'{n}.err'
        out_path.touch()  # a child killed before it opens them still leaves them
        err_path.touch()
        out.flush()
        sys.stderr.flush()
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            _child(req['script'], req['argv'], req.get('hooks', []), out_path, err_path)
        killed, deadline = False, t0 + req.get('timeout', 300)
        kill_at = t0 + req['kill_after'] if req.get('kill_after') is not None else None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.time()
            if (kill_at is not None and now >= kill_at) or now >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        rc = os.waitstatus_to_exitcode(status)
        answer = {'rc': rc, 'killed': killed, 'seconds': time.time() - t0,
                  'stdout': out_path.read_text(errors='replace'), 'stderr': err_path.read_text(errors='replace')}
        out_path.unlink()
        err_path.unlink()
        out.write(json.dumps(answer) + '\n')
        out.flush()


if __name__ == '__main__' and sys.argv[1:2] == ['--zygote']:
    zygote(sys.argv[2])
    sys.exit(0)


# -----------------------------------------------------------------------------
# the tests (pytest side)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import rho  # noqa: E402
import train  # noqa: E402
from data.loader import Corpus, DataError, get_tokenizer, is_val, write_corpus  # noqa: E402


class Zygote:
    def __init__(self, work):
        self.proc = subprocess.Popen([sys.executable, __file__, '--zygote', str(work)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, 'OMP_NUM_THREADS': '1'})

    def run(self, script, *argv, kill_after=None, hooks=(), timeout=300):
        req = {'script': script, 'argv': [str(a) for a in argv], 'kill_after': kill_after, 'hooks': list(hooks),
               'timeout': timeout}
        self.proc.stdin.write(json.dumps(req) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f'the zygote died (exit {self.proc.poll()})'
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_log(out_dir):
    path = Path(out_dir) / 'log.jsonl'
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, what=''):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}{k} differs'


def snapshot(folders):
    """{path: sha256} of every file under the folders."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob('*')):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def split_names(n_train, n_val, val_frac, prefix):
    """Document names that is_val puts n_train in train and n_val in val."""
    train_names, val_names, i = [], [], 0
    while len(train_names) < n_train or len(val_names) < n_val:
        name, i = f'{prefix}{i}', i + 1
        (val_names if is_val(name, val_frac) else train_names).append(name)
    return train_names[:n_train], val_names[:n_val]


@pytest.fixture(scope='module')
def zyg(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp('zygote'))
    yield z
    z.close()


@pytest.fixture(scope='module')
def world(tmp_path_factory, stdlib_corpus):
    """Protected things a failed call must leave alone: two corpora, a finished run, an IL model + cache,
    a run whose checkpoint is garbage, a truncated corpus, a corpus with broken meta.json, a truncated IL
    cache. Built in-process (tiny, seconds)."""
    root = tmp_path_factory.mktemp('world')
    w = {'root': root}
    tok = get_tokenizer('byte')
    source = (Path(train.__file__).parent / 'model.py').read_text() + (Path(train.__file__).parent / 'train.py').read_text()
    names_t, names_v = split_names(14, 3, 0.2, 'doc')
    docs = [(name, source[3000 * i:3000 * (i + 1)]) for i, name in enumerate(names_t + names_v)]
    w['corpus'] = root / 'corpus'
    write_corpus(w['corpus'], docs, tok, 'test: model.py + train.py', val_frac=0.2)
    names_t, names_v = split_names(1, 1, 0.5, 'm')
    w['micro'] = root / 'micro'  # 100 train tokens, 100 val tokens: smaller than the tiny model's block of 64 + 64
    write_corpus(w['micro'], [(names_t[0], 'a' * 100), (names_v[0], 'b' * 100)], tok, 'test: micro', val_frac=0.5)
    base = dict(model='tiny', batch_size=8, budget_unit='iters', compile_loss=False, sample_tokens=0, eval_batches=2,
                peak_flops=1e12, log_interval=1, dataset=str(w['corpus']))
    w['base'] = base
    w['good'] = root / 'good'
    train.train(train.TrainConfig(out_dir=str(w['good']), budget=3, eval_interval=2, **base))
    w['il'], w['cache'] = root / 'il', root / 'ilcache'
    rho_cfg = rho.RhoConfig(out_dir=str(root / 'rho_target'), il_out_dir=str(w['il']), il_cache=str(w['cache']),
                            budget=4, eval_interval=1000, **base)
    assert rho.train_il(rho_cfg) is not None
    w['rho_cfg'] = rho_cfg
    import slm  # here, not at the top: slm imports the mathmix generator
    from data.mathmix.prepare import PrepareConfig, prepare
    w['mathmix'] = root / 'mathmix'  # a small mathmix, a 4-step reference on it, and its reference-loss cache
    prepare(PrepareConfig(out_dir=str(w['mathmix']), n_ref_docs=40, n_train_docs=200, noise_levels=(0.2,)))
    slm_cfg = slm.SLMConfig(out_dir=str(root / 'slm'), mathmix_dir=str(w['mathmix']), block_size=36, budget=4,
                            ref_budget=4, eval_interval=1000, **{**base, 'dataset': 'stdlib'})
    slm.stage_ref(slm_cfg, slm.get_paths(slm_cfg))
    w['slm_ref'] = root / 'slm' / 'ref'
    slm.build_cache(slm_cfg, slm.get_paths(slm_cfg))
    w['slm_cfg'] = slm_cfg
    w['corrupt'] = root / 'corrupt'  # a run folder whose checkpoint is garbage
    shutil.copytree(w['good'], w['corrupt'])
    (w['corrupt'] / 'ckpt.pt').write_bytes(b'\x80\x04garbage, not a checkpoint' * 50)
    w['half_ckpt'] = root / 'half_ckpt'  # a run folder whose checkpoint is cut in half (a torn write)
    shutil.copytree(w['good'], w['half_ckpt'])
    data = (w['good'] / 'ckpt.pt').read_bytes()
    (w['half_ckpt'] / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    w['trunc'] = root / 'trunc_corpus'  # train.bin shorter than meta.json says
    shutil.copytree(w['corpus'], w['trunc'])
    data = (w['trunc'] / 'train.bin').read_bytes()
    (w['trunc'] / 'train.bin').write_bytes(data[:len(data) // 2])
    w['badmeta'] = root / 'badmeta_corpus'
    shutil.copytree(w['corpus'], w['badmeta'])
    (w['badmeta'] / 'meta.json').write_text('{"tokenizer": "byte", "vocab')
    w['cache_trunc'] = root / 'ilcache_trunc'
    shutil.copytree(w['cache'], w['cache_trunc'])
    data = (w['cache_trunc'] / 'il_loss.f16').read_bytes()
    (w['cache_trunc'] / 'il_loss.f16').write_bytes(data[:len(data) // 2])
    w['a_file'] = root / 'a_file.txt'
    w['a_file'].write_text('a file where a folder is expected\n')
    w['sweep'] = root / 'sweep.py'  # a sweep file that forgot METHODS
    w['sweep'].write_text("COMMON = dict(model='tiny')\nBUDGETS = (1.0,)\nQUICK_BUDGETS = (1.0,)\n")
    w['empty_dir'] = root / 'empty_dir'
    w['empty_dir'].mkdir()
    w['protected'] = [w[k] for k in ('corpus', 'micro', 'good', 'il', 'cache', 'mathmix', 'slm_ref', 'corrupt', 'half_ckpt', 'trunc', 'badmeta',
                                     'cache_trunc', 'empty_dir')] + [w['a_file'], w['sweep']]
    w['pristine'] = root / 'pristine'
    for p in w['protected']:
        (shutil.copytree if p.is_dir() else shutil.copy)(p, w['pristine'] / p.name)
    w['fresh'] = root / 'fresh'
    w['fresh'].mkdir()
    return w


def restore(w):
    for p in w['protected']:
        if p.is_dir():
            shutil.rmtree(p)
            shutil.copytree(w['pristine'] / p.name, p)
        else:
            shutil.copy(w['pristine'] / p.name, p)


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no traceback, nothing saved touched

TEXT_NAME = f'reltest_{os.getpid()}'  # data/text/<name> folders a case might create; removed afterwards


def bad_cases(w):
    """(id, script, argv, expected phrases). {name} in an argument is a world path; {fresh} a new empty folder."""
    G, C, M = w['good'], w['corpus'], w['micro']
    il = [f"--il_out_dir={w['il']}", f"--il_cache={w['cache']}", f'--dataset={C}']
    t = ['train.py', *TINY, '--budget=4']
    r = ['rho.py', *TINY, '--budget=4', *il]
    s = ['slm.py', *TINY, '--block_size=36', '--budget=4', f"--mathmix_dir={w['mathmix']}",
         f"--ref_ckpt={w['slm_ref']}/ckpt.pt", '--out_dir={fresh}']
    ss = ['-m', 'studies.slm', *s[1:]]  # the SLM study: its sweep, gate and compare keys
    mm = ['data/mathmix/prepare.py', '--out_dir={fresh}']
    mp = ['madpo.py', '--out_dir={fresh}', '--threads=1']
    rv = ['data/reviews/prepare.py', '--out_dir={fresh}']
    return [
        # madpo.py
        ('madpo-unknown-key', *mp, '--lrr=1', ['unknown config key --lrr', 'closest: rm_lr, po_lr']),
        ('madpo-type', *mp, '--n_pairs=abc', ['--n_pairs must be int']),
        ('madpo-beta-negative', *mp, '--beta=-1', ['--beta must be > 0']),
        ('madpo-lr-negative', *mp, '--po_lr=-1', ['--po_lr must be > 0']),
        ('madpo-c-max', *mp, '--c_max=0.5', ['--c_max must be > 1']),
        ('madpo-bdpo-keep', *mp, '--bdpo_keep=1.5', ['--bdpo_keep must be in (0, 1]']),
        ('madpo-loss', *mp, '--loss=foo', ['--loss must be one of']),
        ('madpo-tier', *mp, '--tier=foo', ['--tier must be one of']),
        ('madpo-stage', *mp, '--stage=foo', ['--stage must be']),
        ('madpo-rm-pool', *mp, '--rm_pool=first', ['--rm_pool must be one of last, mean, sum']),
        ('madpo-block-size', *mp, '--block_size=50', ['must be <= --block_size']),
        ('madpo-po-without-sft', *mp, '--stage=po',  # without the optional extra, that is what it says first
         ['holds no finished SFT run'] if importlib.util.find_spec('vaderSentiment') else ['pip install vaderSentiment']),
        # data/reviews/prepare.py
        ('reviews-unknown-key', *rv, '--n_review=5', ['closest: n_reviews']),
        ('reviews-too-few', *rv, '--n_reviews=5', ['--n_reviews must be >= 100']),
        ('reviews-source', *rv, '--source=web', ["--source must be 'generated' or 'imdb'"]),
        ('reviews-valence', *rv, '--min_valence=5', ['--min_valence must be in (0, 3)']),
        # train.py: parsing
        ('train-unknown-key', *t, f'--out_dir={G}', '--lrr=1', ['unknown config key --lrr', 'closest: lr']),
        ('train-unknown-key-2', *t, f'--out_dir={G}', '--buget=3', ['unknown config key --buget', 'closest: budget']),
        ('train-no-equals', *t, f'--out_dir={G}', '--lr', ['expected --key=value']),
        ('train-positional-not-py', *t, f'--out_dir={G}', 'notes.txt', ['expected a config file']),
        ('train-missing-config-file', *t, f'--out_dir={G}', '/nope/cfg.py', ['config file /nope/cfg.py not found']),
        ('train-type-lr', *t, f'--out_dir={G}', '--lr=fast', ['--lr must be float']),
        ('train-type-unit', *t, f'--out_dir={G}', '--budget_unit=3', ['--budget_unit']),
        ('train-type-bool', *t, f'--out_dir={G}', '--compile=maybe', ['--compile must be bool']),
        ('train-type-int', *t, f'--out_dir={G}', '--batch_size=8.5', ['--batch_size must be int']),
        ('train-type-tuple', *t, f'--out_dir={G}', '--stack_fracs=0.5', ['--stack_fracs must be tuple']),
        # train.py: ranges and names
        ('train-lr-negative', *t, f'--out_dir={G}', '--lr=-0.001', ['--lr must be > 0']),
        ('train-lr-zero', *t, f'--out_dir={G}', '--lr=0', ['--lr must be > 0']),
        ('train-min-lr-above-lr', *t, f'--out_dir={G}', '--lr=0.001', '--min_lr=0.01', ['--min_lr']),
        ('train-budget-zero', *t, f'--out_dir={G}', '--budget=0', ['--budget must be > 0']),
        ('train-budget-negative', *t, f'--out_dir={G}', '--budget=-10', ['--budget must be > 0']),
        ('train-budget-unit', *t, f'--out_dir={G}', '--budget_unit=hours', ['--budget_unit must be one of']),
        ('train-n-head', *t, f'--out_dir={G}', '--n_head=3', ['--n_head=3 must divide --n_embd=64']),
        ('train-n-head-2', *t, f'--out_dir={G}', '--n_embd=100', '--n_head=8', ['must divide --n_embd=100']),
        ('train-optimizer', *t, f'--out_dir={G}', '--optimizer=sgd', ['--optimizer must be one of']),
        ('train-arch', *t, f'--out_dir={G}', '--arch=wide', ['--arch must be one of']),
        ('train-schedule', *t, f'--out_dir={G}', '--schedule=step', ['--schedule must be one of']),
        ('train-model', *t, f'--out_dir={G}', '--model=huge', ['--model must be one of']),
        ('train-init-from', *t, f'--out_dir={G}', '--init_from=latest', ['--init_from must be']),
        ('train-warmup-high', *t, f'--out_dir={G}', '--warmup_frac=1.5', ['--warmup_frac must be in [0, 1)']),
        ('train-warmup-negative', *t, f'--out_dir={G}', '--warmup_frac=-0.1', ['--warmup_frac must be in [0, 1)']),
        ('train-warmup-units', *t, f'--out_dir={G}', '--warmup_units=10', ['--warmup_units must be below --budget']),
        ('train-stack-fracs-order', *t, f'--out_dir={G}', '--arch=stack', '--stack_fracs=(0.5,0.2)',
         ['--stack_fracs must increase']),
        ('train-stack-fracs-range', *t, f'--out_dir={G}', '--arch=stack', '--stack_fracs=(0.2,1.5)',
         ['--stack_fracs must be in (0, 1)']),
        ('train-theta-zero', *t, f'--out_dir={G}', '--arch=drop', '--theta_bar=0', ['--theta_bar must be in (0, 1]']),
        ('train-theta-high', *t, f'--out_dir={G}', '--arch=drop', '--theta_bar=1.5', ['--theta_bar must be in (0, 1]']),
        ('train-batch-zero', *t, f'--out_dir={G}', '--batch_size=0', ['--batch_size must be > 0']),
        ('train-grad-accum', *t, f'--out_dir={G}', '--grad_accum=0', ['--grad_accum must be > 0']),
        ('train-eval-interval', *t, f'--out_dir={G}', '--eval_interval=-1', ['--eval_interval must be > 0']),
        ('train-dropout', *t, f'--out_dir={G}', '--dropout=1', ['--dropout must be in [0, 1)']),
        ('train-cooldown-shape', *t, f'--out_dir={G}', '--cooldown_shape=cube', ['--cooldown_shape']),
        ('train-branches-not-wsd', *t, f'--out_dir={G}', '--branch_budgets=(1,2)', ['--branch_budgets needs --schedule=wsd']),
        ('train-stack-optim', *t, f'--out_dir={G}', '--stack_optim=copy', ['--stack_optim']),
        # train.py: the run folder, data, checkpoints, devices (with --overwrite=True on the finished run
        # where the check comes after the folder is prepared: a bad call must not delete its log)
        ('train-out-dir-is-a-file', *t, f"--out_dir={w['a_file']}", ['--out_dir']),
        ('train-same-out-dir', *t, f'--out_dir={G}', ['already holds a run', '--init_from=resume', '--overwrite=True']),
        ('train-dtype', *t, f'--out_dir={G}', '--overwrite=True', '--dtype=fp8', ['--dtype must be']),
        ('train-device-unknown', *t, f'--out_dir={G}', '--overwrite=True', '--device=tpu', ['--device']),
        ('train-device-no-cuda', *t, f'--out_dir={G}', '--overwrite=True', '--device=cuda', ['--device']),
        ('train-block-larger-than-data', *t, f'--out_dir={G}', '--overwrite=True', f'--dataset={M}',
         '--block_size=128', ['is larger than the']),
        ('train-block-larger-fresh', *t, '--out_dir={fresh}', f'--dataset={M}', '--block_size=128', ['is larger than the']),
        ('train-missing-data', *t, '--out_dir={fresh}', '--dataset=nonexistent', ['no prepared data', 'prepare.py']),
        ('train-missing-data-overwrite', *t, f'--out_dir={G}', '--overwrite=True', '--dataset=nonexistent',
         ['no prepared data']),
        ('train-truncated-corpus', *t, '--out_dir={fresh}', f"--dataset={w['trunc']}", ['prepare it again']),
        ('train-corrupt-meta', *t, '--out_dir={fresh}', f"--dataset={w['badmeta']}", ['unreadable']),
        ('train-unknown-tokenizer', *t, '--out_dir={fresh}', '--tokenizer=nope', ['cannot load tokenizer']),
        ('train-resume-empty-dir', *t, '--out_dir={fresh}', '--init_from=resume', ['no checkpoint at']),
        ('train-init-from-missing', *t, '--out_dir={fresh}', '--init_from=/nope.pt', ['no checkpoint at /nope.pt']),
        ('train-init-from-missing-overwrite', *t, f'--out_dir={G}', '--overwrite=True', '--init_from=/nope.pt',
         ['no checkpoint at /nope.pt']),
        ('train-resume-corrupt', *t, f"--out_dir={w['corrupt']}", '--init_from=resume', ['unreadable']),
        ('train-resume-torn-ckpt', *t, f"--out_dir={w['half_ckpt']}", '--init_from=resume', ['unreadable']),
        ('train-init-from-corrupt', *t, '--out_dir={fresh}', f"--init_from={w['corrupt']}/ckpt.pt", ['unreadable']),
        ('train-rst-no-table', *t, '--out_dir={fresh}', '--budget_unit=rst', '--n_layer=3', ['no RST cost table']),
        # rho.py
        ('rho-unknown-key', *r, '--out_dir={fresh}', '--selct_frac=0.5', ['closest: select_frac']),
        ('rho-type', *r, '--out_dir={fresh}', '--select_frac=half', ['--select_frac must be float']),
        ('rho-select-frac-zero', *r, '--out_dir={fresh}', '--select_frac=0', ['--select_frac must be in (0, 1]']),
        ('rho-select-frac-high', *r, '--out_dir={fresh}', '--select_frac=1.5', ['--select_frac must be in (0, 1]']),
        ('rho-select-frac-negative', *r, '--out_dir={fresh}', '--select_frac=-0.5', ['--select_frac must be in (0, 1]']),
        ('rho-method', *r, '--out_dir={fresh}', '--method=foo', ['--method must be']),
        ('rho-stage', *r, '--out_dir={fresh}', '--stage=foo', ['--stage must be']),
        ('rho-holdout', *r, '--out_dir={fresh}', '--holdout_frac=1', ['--holdout_frac must be in (0, 1)']),
        ('rho-mega-batch', *r, '--out_dir={fresh}', '--mega_batch=-1', ['--mega_batch must be >= 0']),
        ('rho-sb-beta', *r, '--out_dir={fresh}', '--method=sb', '--sb_beta=0', ['--sb_beta']),
        ('rho-lr-negative', *r, '--out_dir={fresh}', '--lr=-1', ['--lr must be > 0']),
        ('rho-budget-zero', *r, '--out_dir={fresh}', '--budget=0', ['--budget must be > 0']),
        ('rho-n-head', *r, '--out_dir={fresh}', '--n_head=3', ['must divide']),
        ('rho-sb-stage-il', *r, '--out_dir={fresh}', '--method=sb', '--stage=il', ['no IL model']),
        ('rho-il-dir-is-out-dir', *r, f"--out_dir={w['il']}", ['--il_out_dir must differ from --out_dir']),
        ('rho-no-cache', *r, '--out_dir={fresh}', '--stage=train', f"--il_cache={w['empty_dir']}", ['no IL cache']),
        ('rho-stale-cache-other-data', *r, '--out_dir={fresh}', '--stage=train', '--dataset=stdlib',
         ['stale IL cache', 'corpus_fingerprint']),
        ('rho-stale-cache-other-block', *r, '--out_dir={fresh}', '--stage=train', '--block_size=32',
         ['stale IL cache', 'block_size']),
        ('rho-stale-cache-other-ckpt', *r, '--out_dir={fresh}', '--stage=train', f'--il_out_dir={G}',
         ['stale IL cache', 'il_ckpt_sha256']),
        ('rho-truncated-cache', *r, '--out_dir={fresh}', '--stage=train', f"--il_cache={w['cache_trunc']}", ['truncated']),
        ('rho-missing-data', *r, '--out_dir={fresh}', '--stage=train', '--dataset=nonexistent', ['no prepared data']),
        ('rho-block-larger-than-data', *r, '--out_dir={fresh}', '--method=sb', f'--dataset={M}', '--block_size=128',
         ['is larger than the']),
        ('rho-il-over-finished-run', *r, '--out_dir={fresh}', '--stage=il', f'--il_out_dir={G}', ['already holds a run']),
        ('rho-resume-corrupt', *r, f"--out_dir={w['corrupt']}", '--method=sb', '--init_from=resume', ['unreadable']),
        # slm.py
        ('slm-unknown-key', *s, '--select_byy=excess', ['closest: select_by']),
        ('slm-type', *s, '--k=most', ['--k must be float']),
        ('slm-k-zero', *s, '--k=0', ['--k must be in (0, 1]']),
        ('slm-k-high', *s, '--k=1.5', ['--k must be in (0, 1]']),
        ('slm-k-negative', *s, '--k=-0.2', ['--k must be in (0, 1]']),
        ('slm-select-by', *s, '--select_by=loss', ['--select_by must be one of']),
        ('slm-stage', *s, '--stage=foo', ['--stage must be one of']),
        ('slm-ref-mode', *s, '--ref_mode=foo', ['--ref_mode must be']),
        ('slm-tokenizer', *s, '--tokenizer=gpt2', ["--tokenizer must be 'byte'"]),
        ('slm-lr-negative', *s, '--lr=-1', ['--lr must be > 0']),
        ('slm-budget-zero', *s, '--budget=0', ['--budget must be > 0']),
        ('slm-budget-unit', *s, '--budget_unit=epochs', ['--budget_unit must be one of']),
        ('slm-n-head', *s, '--n_head=3', ['must divide']),
        ('slm-block-not-lines', *s, '--block_size=100', ['--block_size must be a multiple of 9']),
        ('slm-noise-high', *s, '--noise=1', ['--noise must be in [0, 1)']),
        ('slm-k-sweep', *ss, '--k_sweep=(0.5,0)', ['--k_sweep must be in (0, 1]']),
        ('slm-gate', *ss, '--gate_ref=2', ['--gate_ref must be in [0, 1]']),
        ('slm-missing-data', *s, '--mathmix_dir=/nope/mathmix', ['mathmix data missing in /nope/mathmix']),
        # another reference than the one scored: its losses are looked for beside it (each reference keeps its own)
        ('slm-missing-cache', *s, '--stage=train', f"--ref_ckpt={w['il']}/ckpt.pt", ['no reference-loss cache at', 'stage=score']),
        ('slm-missing-ref-ckpt', *s, '--stage=score', '--ref_ckpt=/nope/ckpt.pt', ['no reference model at /nope/ckpt.pt']),
        ('slm-ref-named-otherwise', *s, '--stage=ref', '--ref_ckpt=/nope/mine.pt',
         ["--stage=ref trains into a folder's ckpt.pt: give --ref_ckpt=/nope/ckpt.pt"]),
        ('slm-missing-ref-named-otherwise', *s, '--stage=score', '--ref_ckpt=/nope/mine.pt',
         ['no reference model at /nope/mine.pt: give the checkpoint you have, or train one with', '--ref_ckpt=/nope/ckpt.pt']),
        ('slm-corrupt-ref-ckpt', *s, '--stage=score', f"--ref_ckpt={w['corrupt']}/ckpt.pt", ['unreadable']),
        ('slm-train-no-ref', *s, '--stage=train', '--ref_ckpt=/nope/ckpt.pt', ['no reference model at /nope/ckpt.pt']),
        ('slm-compare-nothing', *ss, '--stage=compare', ['no finished runs under']),
        # data/mathmix/prepare.py
        ('mathmix-unknown-key', *mm, '--n_contexts=5', ['closest: n_context']),
        ('mathmix-type', *mm, '--seed=abc', ['--seed must be int']),
        ('mathmix-noise-high', *mm, '--noise_levels=(0.2,1)', ['--noise_levels must be fractions in [0, 1)']),
        ('mathmix-noise-negative', *mm, '--noise_levels=(-1,)', ['--noise_levels must be fractions in [0, 1)']),
        ('mathmix-counts', *mm, '--n_context=0', ['must be positive']),
        ('mathmix-tokenizer', *mm, '--tokenizer=gpt2', ["--tokenizer must be 'byte'"]),
        ('mathmix-too-few-docs', *mm, '--n_ref_docs=3', '--n_train_docs=3', ['no documents landed']),
        ('mathmix-out-dir-is-a-file', 'data/mathmix/prepare.py', f"--out_dir={w['a_file']}", ['--out_dir']),
        # budget.py
        ('budget-no-command', 'budget.py', ['usage: python budget.py']),
        ('ntng-no-command', '-m', 'studies.ntng', ['usage: python -m studies.ntng']),
        ('ntng-unknown-command', '-m', 'studies.ntng', 'frobnicate', ['usage: python -m studies.ntng']),
        ('budget-unknown-command', 'budget.py', 'frobnicate', ['usage: python budget.py']),
        ('calibrate-unknown-key', 'calibrate.py', *TINY, '--lrr=1', ['closest: lr']),
        ('calibrate-type', 'calibrate.py', *TINY, '--batch_size=abc', ['--batch_size must be int']),
        ('calibrate-missing-data', 'calibrate.py', *TINY, '--dataset=nonexistent', ['no prepared data']),
        ('calibrate-n-head', 'calibrate.py', *TINY, '--n_head=3', ['must divide']),
        ('calibrate-budget', 'calibrate.py', *TINY, '--budget=0', ['--budget must be > 0']),
        ('calibrate-dtype', 'calibrate.py', *TINY, '--dtype=fp8', ['--dtype must be']),
        ('compare-no-dirs', '-m', 'studies.ntng', 'compare', ['compare needs run folders']),
        ('compare-missing-dir', '-m', 'studies.ntng', 'compare', '/nope/run', '--out={fresh}/x', ['/nope/run does not exist']),
        ('compare-target', '-m', 'studies.ntng', 'compare', G, '--target=abc', '--out={fresh}/x', ['--target']),
        ('compare-unknown-key', '-m', 'studies.ntng', 'compare', G, '--outt=x', ['closest: out']),
        ('ablate-missing-config', '-m', 'studies.ntng', 'ablate', '--config=/nope/ablation.py', ['/nope/ablation.py', 'not found']),
        ('ablate-config-without-methods', '-m', 'studies.ntng', 'ablate', f"--config={w['sweep']}", '--out_dir={fresh}',
         ['METHODS']),
        ('ablate-unknown-method', '-m', 'studies.ntng', 'ablate', "--methods=('nope',)", '--out_dir={fresh}', ['unknown method(s) nope']),
        ('ablate-schedule', '-m', 'studies.ntng', 'ablate', '--baseline_schedule=foo', ['--baseline_schedule']),
        ('ablate-type', '-m', 'studies.ntng', 'ablate', '--seeds=abc', ['--seeds must be tuple']),
        ('ablate-unknown-key', '-m', 'studies.ntng', 'ablate', '--sedes=(1,)', ['closest: seeds']),
        ('schedules-schedule', 'budget.py', 'schedules', '--schedule=foo', ['--schedule must be one of']),
        ('schedules-warmup', 'budget.py', 'schedules', '--warmup_frac=2', ['--warmup_frac']),
        ('schedules-unknown-key', 'budget.py', 'schedules', '--lrr=1', ['closest: lr']),
        # data/stdlib/prepare.py
        ('stdlib-tokenizer', 'data/stdlib/prepare.py', '--tokenizer=nope', '--out_dir={fresh}', ['cannot load tokenizer']),
        ('stdlib-val-frac', 'data/stdlib/prepare.py', '--val_frac=0', '--out_dir={fresh}', ['--val_frac must be in (0, 1)']),
        ('stdlib-unknown-key', 'data/stdlib/prepare.py', '--vl_frac=0.1', ['closest: val_frac']),
        ('stdlib-type', 'data/stdlib/prepare.py', '--val_frac=abc', ['--val_frac must be float']),
        ('stdlib-out-dir-is-a-file', 'data/stdlib/prepare.py', f"--out_dir={w['a_file']}", ['--out_dir']),
        # data/text/prepare.py
        ('text-no-input', 'data/text/prepare.py', ['--input=PATH is required']),
        ('text-missing-input', 'data/text/prepare.py', '--input=/nope/book.txt', ['does not exist']),
        ('text-tokenizer', 'data/text/prepare.py', f"--input={w['a_file']}", f'--name={TEXT_NAME}', '--tokenizer=nope',
         ['cannot load tokenizer']),
        ('text-doc-chars', 'data/text/prepare.py', f"--input={w['a_file']}", '--doc_chars=0', ['--doc_chars must be positive']),
        ('text-unknown-key', 'data/text/prepare.py', '--inptu=x', ['closest: input']),
        ('text-val-frac', 'data/text/prepare.py', f"--input={w['a_file']}", '--val_frac=1', ['--val_frac must be in (0, 1)']),
        ('text-empty-folder', 'data/text/prepare.py', f"--input={w['empty_dir']}", f'--name={TEXT_NAME}b',
         ['no documents']),
    ]


def _case_ids():
    return [c[0] for c in bad_cases({k: Path('/x') for k in ('good', 'corpus', 'micro', 'il', 'cache', 'mathmix', 'slm_ref', 'corrupt', 'half_ckpt',
                                                              'trunc', 'badmeta', 'cache_trunc', 'a_file', 'empty_dir',
                                                              'sweep')})]


@pytest.fixture(scope='module')
def bad_results(zyg, world):
    """Every bad case through its entry point; per case: rc, stderr and the protected files it changed."""
    results = {}
    try:
        for case_id, script, *argv, expect in bad_cases(world):
            fresh = world['fresh'] / case_id
            argv = [str(a).replace('{fresh}', str(fresh)) for a in argv]
            before = snapshot(world['protected'])
            out = zyg.run(script, *argv, timeout=120)
            after = snapshot(world['protected'])
            touched = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
            if touched:
                restore(world)
            results[case_id] = {**out, 'touched': touched, 'expect': expect, 'cmd': ' '.join([script, *argv])}
    finally:
        for name in (TEXT_NAME, TEXT_NAME + 'b'):
            shutil.rmtree(ROOT / 'data' / 'text' / name, ignore_errors=True)
    return results


@pytest.mark.parametrize('case_id', _case_ids())
def test_bad_input_is_one_line_exit_2_and_touches_nothing(bad_results, case_id):
    r = bad_results[case_id]
    lines = r['stderr'].strip().splitlines()
    what = f"`python {r['cmd']}`\n  exit {r['rc']}, stderr:\n{r['stderr'][-1500:]}"
    assert 'Traceback' not in r['stderr'], f'a traceback instead of a one-line error: {what}'
    assert r['rc'] == 2, f'exit code {r["rc"]}, want 2: {what}'
    assert len(lines) == 1 and lines[0].strip(), f'want exactly one stderr line: {what}'
    for phrase in r['expect']:
        assert phrase in lines[0], f'the error should say {phrase!r}: {what}'
    assert not r['touched'], f'the failed call changed saved files {r["touched"]}: {what}'


def test_bad_input_count_and_no_data_folder_left(bad_results):
    """The report's figure: how many bad inputs, per entry point, and how many behaved."""
    per_script = {}
    for r in bad_results.values():
        script = r['cmd'].split()[0]
        ok = (r['rc'] == 2 and 'Traceback' not in r['stderr'] and len(r['stderr'].strip().splitlines()) == 1
              and all(p in r['stderr'] for p in r['expect']) and not r['touched'])
        per_script.setdefault(script, [0, 0])[0] += 1
        per_script[script][1] += ok
    print('\nbad inputs (tried, passed): ' + ', '.join(f'{s} {n}/{k}' for s, (k, n) in per_script.items()))
    assert sum(k for k, _ in per_script.values()) >= 100
    assert not (ROOT / 'data' / 'text' / TEXT_NAME).exists()


def test_overwrite_true_replaces_a_run(zyg, world, tmp_path):
    out_dir = tmp_path / 'again'
    shutil.copytree(world['good'], out_dir)
    r = zyg.run('train.py', *TINY, f"--dataset={world['corpus']}", '--budget=2', '--log_interval=1', f'--out_dir={out_dir}',
                '--overwrite=True')
    assert r['rc'] == 0, r['stderr'][-2000:]
    assert [x['step'] for x in read_log(out_dir) if 'train_loss' in x] == [1, 2]  # the old run's log is gone
    assert load_ckpt(out_dir / 'ckpt.pt')['iter_num'] == 2


def test_compare_takes_a_number_as_target(zyg, world, tmp_path):
    """--target is documented as 'auto', 'none' or a number: --target=4.5 must be taken, not refused as a
    float where a str is expected."""
    r = zyg.run('-m', 'studies.ntng', 'compare', world['good'], '--target=4.5', f"--out={tmp_path / 'cmp'}")
    assert r['rc'] == 0 and 'target val loss 4.5000' in r['stdout'], (
        f"exit {r['rc']}: {r['stderr'][-500:]} (configurator.parse: a str key should take a number as its text)")


# -----------------------------------------------------------------------------
# non-finite loss

class NanAt(train.CausalLM):
    """The baseline objective, whose loss is nan at the given steps (1-based); records the checkpoint's
    bytes when the first nan step begins."""

    def __init__(self, batch_size, steps, ckpt_path):
        super().__init__(batch_size)
        self.steps, self.calls, self.ckpt_path, self.ckpt_bytes = set(steps), 0, ckpt_path, None

    def __call__(self, model, data, budget):
        self.calls += 1
        step = super().__call__(model, data, budget)
        if self.calls in self.steps:
            if self.ckpt_bytes is None and self.ckpt_path.exists():
                self.ckpt_bytes = self.ckpt_path.read_bytes()
            step.loss = step.loss * float('nan')
        return step


def test_nonfinite_loss_stops_at_that_step_and_keeps_the_last_checkpoint(world, tmp_path):
    cfg = train.TrainConfig(out_dir=str(tmp_path / 'nan'), budget=10, eval_interval=2, **world['base'])
    objective = NanAt(8, {5}, tmp_path / 'nan' / 'ckpt.pt')
    with pytest.raises(train.NonFiniteLoss, match=r'at step 5\b'):
        train.train(cfg, objective)
    assert (tmp_path / 'nan' / 'ckpt.pt').read_bytes() == objective.ckpt_bytes  # not rewritten after the nan
    ckpt = load_ckpt(tmp_path / 'nan' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    log = read_log(tmp_path / 'nan')
    assert [r['step'] for r in log if 'train_loss' in r] == [1, 2, 3, 4]
    assert log[-1]['step'] == 5 and log[-1]['nonfinite'] is True


def test_nonfinite_loss_through_the_script_exits_2_naming_the_step(zyg, world, tmp_path):
    RUN_DIRS.append(tmp_path)
    out_dir = tmp_path / 'nan_cli'
    r = zyg.run('train.py', *TINY, f"--dataset={world['corpus']}", '--budget=10', '--eval_interval=3', '--log_interval=1',
                f'--out_dir={out_dir}', hooks=['nan_at:7'])
    lines = r['stderr'].strip().splitlines()
    assert r['rc'] == 2 and len(lines) == 1 and 'Traceback' not in r['stderr'], r['stderr'][-2000:]
    assert 'at step 7' in lines[0] and '--skip_nonfinite=True' in lines[0], lines[0]
    assert load_ckpt(out_dir / 'ckpt.pt')['iter_num'] == 6
    assert read_log(out_dir)[-1] == {**read_log(out_dir)[-1], 'step': 7, 'nonfinite': True}


def test_skip_nonfinite_skips_and_counts(world, tmp_path):
    RUN_DIRS.append(tmp_path)
    cfg = train.TrainConfig(out_dir=str(tmp_path / 'skip'), budget=8, eval_interval=100, skip_nonfinite=True, **world['base'])
    result = train.train(cfg, NanAt(8, {3, 4}, tmp_path / 'skip' / 'ckpt.pt'))
    assert result['spent']['iters'] == 8 and result['steps'] == 10  # 8 updates; 2 steps skipped on top
    log = [r for r in read_log(tmp_path / 'skip') if 'train_loss' in r]
    assert [r.get('skipped_steps') for r in log if r['step'] in (3, 4)] == [1, 2]
    assert all(np.isfinite(r['train_loss']) for r in log if r['step'] not in (3, 4))
    ckpt = load_ckpt(tmp_path / 'skip' / 'ckpt.pt')
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values()) and ckpt['iter_num'] == 10


# -----------------------------------------------------------------------------
# kill -9 and restart

KILL_REPORT = []  # (what, outcome) lines for the report; printed with -s


def test_kill_9_at_random_moments_then_resume_is_bit_identical(zyg, world, tmp_path):
    RUN_DIRS.append(tmp_path)
    args = [*TINY, f"--dataset={world['corpus']}", '--budget=60', '--eval_interval=5', '--log_interval=1']
    ref = zyg.run('train.py', *args, f"--out_dir={tmp_path / 'ref'}")
    assert ref['rc'] == 0, ref['stderr'][-2000:]
    out_dir, rng = tmp_path / 'killed', random.Random(10)
    plan = [('time', 0.01), ('save', 2), ('time', 0.5), ('save', 1), ('time', 0.5), ('time', 0.7), ('finish', None)]
    trials = []
    for kind, arg in plan:
        resume = (out_dir / 'ckpt.pt').exists()
        if kind == 'time' and arg < 0.1:  # very early: a fixed moment
            pass
        elif kind == 'time':  # a random moment within the part of the run still to do
            done = load_ckpt(out_dir / 'ckpt.pt')['iter_num'] if resume else 0
            arg = rng.uniform(0.1, arg) * ref['seconds'] * (60 - done) / 60
        argv = [*args, f'--out_dir={out_dir}'] + (['--init_from=resume'] if resume else ['--overwrite=True'])
        r = zyg.run('train.py', *argv, kill_after=arg if kind == 'time' else None,
                    hooks=[f'die_in_save:{arg}'] if kind == 'save' else [])
        step = load_ckpt(out_dir / 'ckpt.pt')['iter_num'] if (out_dir / 'ckpt.pt').exists() else None
        if kind == 'finish':
            assert r['rc'] == 0, r['stderr'][-2000:]
        else:
            assert r['rc'] in (0, -9), r['stderr'][-2000:]
        trials.append((kind, arg, 'resume' if resume else 'scratch', r['rc'], step,
                       len(list(out_dir.glob('*.tmp*'))) if out_dir.exists() else 0))
    KILL_REPORT.extend(f'train kill ({kind} {arg if arg is None else round(arg, 2)}): started {how}, exit {rc}, '
                       f'checkpoint then at step {step}, temp files {tmp}' for kind, arg, how, rc, step, tmp in trials)
    print('\n' + '\n'.join(KILL_REPORT[-len(trials):]))
    assert sum(rc == -9 for _, _, _, rc, _, _ in trials) >= 4, trials  # the kills happened
    assert any(kind == 'save' and rc == -9 for kind, _, _, rc, _, _ in trials)  # one of them mid-checkpoint
    a, b = load_ckpt(tmp_path / 'ref' / 'ckpt.pt'), load_ckpt(out_dir / 'ckpt.pt')
    assert b['iter_num'] == a['iter_num'] == 60
    assert_same_tensors(a['model'], b['model'], 'weights: ')
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_same_tensors(sa, sb, 'optimizer: ')
    assert without_timing(read_log(out_dir)) == without_timing(read_log(tmp_path / 'ref'))


def test_kill_9_mid_corpus_write_is_never_half_read(zyg, world, tmp_path, stdlib_corpus):
    """stdlib prepare SIGKILLed halfway through writing train.bin, then just before meta.json: the folder
    is refused (no meta.json), never read half-written; a rerun rebuilds the same corpus."""
    out_dir = tmp_path / 'stdlib'
    r = zyg.run('data/stdlib/prepare.py', f'--out_dir={out_dir}', hooks=['die_in_write:train.bin'])
    build = out_dir.parent / f'.{out_dir.name}.build'  # the corpus is built beside its target, then swapped in
    assert r['rc'] == -9 and not (out_dir / 'meta.json').exists() and list(build.glob('train.bin.tmp*'))
    with pytest.raises(DataError, match='meta.json missing'):
        Corpus(out_dir)
    r = zyg.run('data/stdlib/prepare.py', f'--out_dir={out_dir}')
    assert r['rc'] == 0, r['stderr'][-2000:]
    assert not build.exists() and not (out_dir.parent / f'.{out_dir.name}.lock').exists()  # taken over, removed
    corpus = Corpus(out_dir)
    assert corpus.meta['counts'] == stdlib_corpus.meta['counts']
    for split in ('train', 'val'):
        assert (out_dir / f'{split}.bin').read_bytes() == (stdlib_corpus.path / f'{split}.bin').read_bytes()
    KILL_REPORT.append('stdlib prepare killed mid train.bin: no meta.json, Corpus refuses; rerun == the session corpus')


def test_kill_9_during_text_prepare_at_random_moments(zyg, world, tmp_path):
    """data/text/prepare.py over a complete corpus, SIGKILLed at random moments: after every kill the folder
    has no meta.json or a complete corpus equal to the first one."""
    name = f'reltest_kill_{os.getpid()}'
    folder = ROOT / 'data' / 'text' / name / 'byte'
    book = tmp_path / 'book.txt'
    book.write_text(''.join(p.read_text() for p in sorted(ROOT.glob('*.py'))) * 20)  # a few MB
    try:
        r = zyg.run('data/text/prepare.py', f'--input={book}', f'--name={name}', '--doc_chars=5000')
        assert r['rc'] == 0, r['stderr'][-2000:]
        want = {n: (folder / n).read_bytes() for n in ('train.bin', 'val.bin')}
        rng, outcomes, full = random.Random(3), [], r['seconds']
        for _ in range(4):
            at = rng.uniform(0.0, 1.1 * full)
            r = zyg.run('data/text/prepare.py', f'--input={book}', f'--name={name}', '--doc_chars=5000', kill_after=at)
            if (folder / 'meta.json').exists():
                assert {n: (folder / n).read_bytes() for n in want} == want
                Corpus(folder)
                outcomes.append('complete')
            else:
                with pytest.raises(DataError):
                    Corpus(folder)
                outcomes.append('no meta.json (refused)')
            outcomes[-1] += f" (kill at {at:.2f}s of a {full:.2f}s run, exit {r['rc']})"
        KILL_REPORT.append(f'text prepare killed at 4 random moments: {outcomes}')
        print('\n' + KILL_REPORT[-1])
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def test_kill_9_mid_il_cache_write_is_never_half_read(zyg, world, tmp_path):
    RUN_DIRS.append(tmp_path)
    il, cache = tmp_path / 'il', tmp_path / 'cache'
    shutil.copytree(world['il'], il)
    shutil.copytree(world['cache'], cache)
    cmd = ['rho.py', *TINY, '--budget=4', f"--dataset={world['corpus']}", f'--il_out_dir={il}', f'--il_cache={cache}',
           '--stage=il', '--init_from=resume', f"--out_dir={tmp_path / 'target'}"]
    r = zyg.run(*cmd, hooks=['die_in_write:il_loss.f16'])
    assert r['rc'] == -9 and not (cache / 'il_loss.json').exists(), r['stderr'][-2000:]
    cfg = dataclasses.replace(world['rho_cfg'], il_out_dir=str(il), il_cache=str(cache))
    with pytest.raises(rho.UserError, match='no IL cache'):
        rho.load_il_cache(cfg, Corpus(world['corpus']), 64)
    r = zyg.run(*cmd, hooks=['die_before:il_loss.json'])  # the losses written, the sidecar not yet
    assert r['rc'] == -9 and (cache / 'il_loss.f16').exists() and not (cache / 'il_loss.json').exists()
    with pytest.raises(rho.UserError, match='no IL cache'):
        rho.load_il_cache(cfg, Corpus(world['corpus']), 64)
    r = zyg.run(*cmd)  # the restart the error message names
    assert r['rc'] == 0, r['stderr'][-2000:]
    losses, _ = rho.load_il_cache(cfg, Corpus(world['corpus']), 64)
    assert np.asarray(losses).tobytes() == (world['cache'] / 'il_loss.f16').read_bytes()
    KILL_REPORT.append('rho IL precompute killed mid il_loss.f16 and before il_loss.json: refused both times; '
                       'the restart rebuilt an identical cache')


# -----------------------------------------------------------------------------
# Ctrl-C then resume, bit-identical, for every method; a real signal mid-step

METHODS = {
    'baseline': dict(dropout=0.1),
    'stack': dict(arch='stack', n_layer=4, stack_fracs=(0.25, 0.6)),
    'drop': dict(arch='drop', n_layer=4),
    'lion': dict(optimizer='lion', lr=3e-4),
    'sophiag': dict(optimizer='sophiag', hess_interval=2),
    'sb': dict(method='sb', sb_history=40),
    'rho': dict(method='rho', stage='train'),
    'slm': dict(k=0.6, select_by='excess'),
}


@pytest.mark.parametrize('method', METHODS)
def test_interrupt_then_resume_is_bit_identical(world, tmp_path, monkeypatch, method):
    RUN_DIRS.append(tmp_path)
    steps, cut = 12, 5
    kw = {**world['base'], 'budget': steps, 'eval_interval': 4, **METHODS[method]}
    if method == 'slm':  # Rho-1's SLM on the small mathmix, with the cached reference losses
        import slm
        paths = slm.get_paths(world['slm_cfg'])
        kw['dataset'] = str(paths.corpus(0.2))
        make = lambda d, **o: dataclasses.replace(world['slm_cfg'], **{**kw, 'out_dir': str(d), **o})  # noqa: E731
        objective = lambda c: slm.SelectiveLM(c, paths)  # noqa: E731
    elif 'method' in kw:
        make = lambda d, **o: rho.RhoConfig(**{**dataclasses.asdict(world['rho_cfg']), **kw, 'out_dir': str(d), **o})  # noqa: E731
        objective = lambda c: rho.SelectiveBackprop(c) if c.method == 'sb' else rho.RhoLoss(c)  # noqa: E731
    else:
        make = lambda d, **o: train.TrainConfig(**kw, out_dir=str(d), **o)  # noqa: E731
        objective = lambda c: train.CausalLM(c.batch_size)  # noqa: E731
    full_cfg, cut_cfg = make(tmp_path / 'full'), make(tmp_path / 'cut')
    full = train.train(full_cfg, objective(full_cfg))
    real_step = train.Trainer.train_step

    def train_step(self):  # Ctrl-C as step cut + 1 begins
        if self.iter_num == cut:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(train.Trainer, 'train_step', train_step)
    part = train.train(cut_cfg, objective(cut_cfg))
    monkeypatch.undo()
    assert part['interrupted'] and part['steps'] == cut
    resume_cfg = make(tmp_path / 'cut', init_from='resume')
    resumed = train.train(resume_cfg, objective(resume_cfg))
    assert resumed['steps'] == full['steps'] and resumed['spent'] == {**full['spent'], 'wall': resumed['spent']['wall']}
    cut_log = [r for r in read_log(tmp_path / 'cut') if not ('val_loss' in r and r['step'] == cut)]  # Ctrl-C's eval
    assert without_timing(cut_log) == without_timing(read_log(tmp_path / 'full'))
    a, b = load_ckpt(tmp_path / 'full' / 'ckpt.pt'), load_ckpt(tmp_path / 'cut' / 'ckpt.pt')
    assert_same_tensors(a['model'], b['model'], f'{method} weights: ')
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_same_tensors(sa, sb, f'{method} optimizer: ')
    assert a['arch'].keys() == b['arch'].keys() and a['active_layers'] == b['active_layers']
    assert a['data'] == b['data']


# -----------------------------------------------------------------------------
# nothing executes pickled code

def test_every_checkpoint_loads_weights_only_and_caches_with_numpy(world):
    ckpts = sorted(p for d in [world['root'], *RUN_DIRS] for p in Path(d).rglob('*.pt'))
    ckpts = [p for p in ckpts if '.tmp' not in p.name and p.parent.name not in ('corrupt', 'half_ckpt')]
    assert len(ckpts) >= 10, ckpts
    for path in ckpts:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert 'model' in ckpt, path
    info = json.loads((world['cache'] / 'il_loss.json').read_text())
    losses = np.fromfile(world['cache'] / 'il_loss.f16', dtype=np.float16)
    assert len(losses) == info['identity']['num_examples'] and np.isfinite(losses).sum() > 0


def test_no_source_file_unpickles():
    """No pickle.load(s), torch.load without weights_only=True, numpy allow_pickle, or eval/exec of data;
    config files are run as the user's own Python, and that is documented."""
    offenders = []
    files = [p for p in ROOT.rglob('*.py') if '.git' not in p.parts and 'venv' not in str(p)]
    for path in files:
        text = path.read_text(errors='replace')
        if path == Path(__file__).resolve():
            continue
        for m in re.finditer(r'torch\.load\(([^()]|\([^()]*\))*\)', text):
            if 'weights_only=True' not in m.group(0):
                offenders.append(f'{path.relative_to(ROOT)}: {m.group(0)[:80]}')
        for pattern in (r'\bpickle\.loads?\(', r'allow_pickle\s*=\s*True', r'\bdill\b', r'\bjoblib\.load\('):
            offenders += [f'{path.relative_to(ROOT)}: {m.group(0)}' for m in re.finditer(pattern, text)]
        # eval/exec as calls of the builtins (an optimizer's .eval() or a def eval is neither)
        offenders += [f'{path.relative_to(ROOT)}: {node.func.id}(' for node in ast.walk(ast.parse(text))
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ('eval', 'exec')]
    assert not offenders, offenders
    import configurator
    assert 'only use your own' in configurator.__doc__
    assert 'your own Python' in (ROOT / 'README.md').read_text()


@pytest.mark.parametrize('sig,args', [('SIGINT', ['--arch=drop', '--n_layer=4']), ('SIGTERM', [])], ids=['ctrl-c-drop', 'sigterm'])
def test_a_signal_mid_step_then_resume_is_bit_identical(zyg, world, tmp_path, sig, args):
    """A real Ctrl-C / SIGTERM lands inside a step (forward, backward: where the time goes), after the step
    drew its batch and its dropped layers. The checkpoint it leaves must be a step's end, or the resumed run
    skips that batch and that draw."""
    RUN_DIRS.append(tmp_path)
    cmd = ['train.py', *TINY, f"--dataset={world['corpus']}", '--budget=12', '--eval_interval=4', '--log_interval=1', *args]
    full = zyg.run(*cmd, f"--out_dir={tmp_path / 'full'}")
    assert full['rc'] == 0, full['stderr'][-2000:]
    cut = zyg.run(*cmd, f"--out_dir={tmp_path / 'cut'}", hooks=[f'signal_at:{sig}:6'])
    # a stopped run is not a finished one: the shell's status for its signal, and a record in its folder
    assert cut['rc'] == {'SIGINT': 130, 'SIGTERM': 143}[sig] and 'Traceback' not in cut['stderr'], cut['stderr'][-2000:]
    assert json.loads((tmp_path / 'cut' / 'stopped.json').read_text())['signal'] == sig
    assert 'stopped: ' in cut['stdout'] and 'done: ' not in cut['stdout']
    stopped = load_ckpt(tmp_path / 'cut' / 'ckpt.pt')['iter_num']
    assert stopped in (5, 6), stopped
    resumed = zyg.run(*cmd, f"--out_dir={tmp_path / 'cut'}", '--init_from=resume')
    assert resumed['rc'] == 0 and not (tmp_path / 'cut' / 'stopped.json').exists(), resumed['stderr'][-2000:]
    a, b = load_ckpt(tmp_path / 'full' / 'ckpt.pt'), load_ckpt(tmp_path / 'cut' / 'ckpt.pt')
    cut_log = [r for r in read_log(tmp_path / 'cut') if not ('val_loss' in r and r['step'] == stopped)]
    assert without_timing(cut_log) == without_timing(read_log(tmp_path / 'full')) and a['data'] == b['data'], (
        f'{sig} during step 6 saved a checkpoint at step {stopped} whose data position / RNG already include '
        f'step 6\'s draws, so the resumed run differs from an uninterrupted one. train.py: on SIGINT/SIGTERM set a '
        f'flag and stop at the next step boundary (see the reliability report)')
    assert_same_tensors(a['model'], b['model'], 'weights: ')
