"""The one training loop: baseline, optimizer choice, budgets, eval, checkpoints, resume, DDP.

    python train.py                                        # small GPT on the embedded stdlib corpus, CPU
    python train.py config/gpt2_124m.py --compile=True     # a config file, then overrides
    python train.py config/t5_lite.py                      # T5-lite on span corruption, same loop and budget
    torchrun --standalone --nproc_per_node=2 train.py      # DDP (gloo on CPU, nccl on GPU)

Methods plug into this loop, they never copy it. A method supplies an *objective*: a callable
`objective(model, data, budget) -> Step` that draws the examples it needs from `data`, returns the loss
to backpropagate (and what to log), and charges the budget for any extra passes it makes (a scoring
forward, a reference model). The loop charges the forward+backward of the trained examples, the
optimizer update and Sophia's Hessian step, and stops when the budget is spent, which is exactly when
the learning rate reaches min_lr.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import budget as budget_lib
from configurator import ConfigError, UserError, cli, require
from data.loader import Batches, Corpus, DataError, data_dir, get_examples, get_tokenizer, prepare_command, val_ids
from data.spans import SpanVocab, raw_length_for, span_corrupt, span_vocab
from model import ARCHS, MODELS, PRESETS, build_arch, device_peak_flops

OPTIMIZERS = ('adamw', 'lion', 'sophiag')


@dataclass(frozen=True)
class TrainConfig:
    # run
    out_dir: str = 'out/default'     # checkpoint, log.jsonl and config.json go here
    label: str = ''                  # the method's name in `budget.py compare`; '' = derived from the config
    init_from: str = 'scratch'       # 'scratch', 'resume' (out_dir/ckpt.pt), or a ckpt.pt to start from
    overwrite: bool = False          # allow a scratch run over an out_dir that holds a run
    seed: int = 1337
    # data
    dataset: str = 'stdlib'          # a folder under data/ (prepared on first use for stdlib) or a path
    tokenizer: str = 'byte'          # 'byte' or a tiktoken encoding name
    batch_size: int = 32             # examples per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    # model
    model_type: str = 'gpt'          # 'gpt' (next-token loss) or 't5' (T5-lite on span corruption)
    model: str = 'small'             # a preset in model.PRESETS: tiny, small, base, gpt2, gpt2-medium, t5-tiny, t5-small-cpu, t5-small
    n_layer: int = 0                 # 0 = the preset's
    n_head: int = 0                  # 0 = the preset's
    n_embd: int = 0                  # 0 = the preset's
    block_size: int = 0              # 0 = the preset's
    dropout: float = 0.0
    bias: bool = True
    # dynamic architecture (No Train No Gain section 3.1)
    arch: str = 'full'               # full, stack (layer stacking) or drop (progressive layer dropping)
    stack_init_layers: int = 0       # stack: blocks active at the start; 0 = n_layer // 4
    stack_fracs: tuple = (0.125, 0.3)  # stack: budget fractions at which the active depth doubles
    stack_optim: str = 'fresh_new'   # stack: 'fresh_new' (new blocks start with no state), 'reset' (all), 'keep'
    theta_bar: float = 0.5           # drop: the keep probability theta(t) decays to this
    gamma_f: float = 100.0           # drop: decay speed of theta(t) (100 BERT-like, 20 for T5)
    # optimizer
    optimizer: str = 'adamw'         # adamw, lion or sophiag
    lr: float = 2e-3                 # peak learning rate
    min_lr: float = 0.0              # reached exactly when the budget is spent
    weight_decay: float = 0.1        # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 = off
    rho: float = 0.04                # Sophia-G: clipping scale of the preconditioned step
    hess_interval: int = 10          # Sophia-G: Hessian estimate every k steps
    free_hessian: bool = False       # Sophia-G: do not charge Hessian steps (the paper's ablation)
    # budget and schedule
    budget_unit: str = 'rst'         # rst, tokens, iters, flops or wall
    budget: float = 180.0            # in budget_unit
    schedule: str = 'cosine'         # cosine, linear, onecycle, wsd, rex (see budget.py)
    warmup_frac: float = 0.02        # of the budget
    warmup_units: float = 0.0        # > 0: warm-up in budget units instead (the same for every budget)
    cooldown_frac: float = 0.2       # wsd: the cooldown's share of the budget
    cooldown_shape: str = '1-sqrt'   # wsd: '1-sqrt' or 'linear'
    branch_budgets: tuple = ()       # wsd: multiples of --budget, e.g. (1, 2, 4): one trunk, a cooldown branch each
    rst_table: str = ''              # '' = config/rst/<shape>.json
    # eval, logging, checkpoints
    eval_interval: int = 250         # optimizer steps between evals (and checkpoints)
    eval_batches: int = 16           # fixed val set: eval_batches x batch_size examples
    log_interval: int = 25
    sample_tokens: int = 300         # generated at the end; 0 = none
    # system
    device: str = 'auto'             # auto, cpu, cuda, cuda:1, mps
    dtype: str = 'auto'              # auto (bf16 on GPU, else float32), float32, bfloat16, float16
    compile: bool = False            # torch.compile the whole model
    compile_loss: bool = True        # torch.compile the per-token loss kernels
    peak_flops: float = 0.0          # for MFU; 0 = the device's (a measured matmul peak on CPU)
    skip_nonfinite: bool = False     # skip (and count) steps whose loss is nan/inf instead of stopping

    def __post_init__(self):
        require(self.init_from in ('scratch', 'resume') or self.init_from.endswith('.pt'),
                f"--init_from must be 'scratch', 'resume' or a checkpoint path (.pt), got '{self.init_from}'")
        require(self.model in PRESETS, f"--model must be one of {', '.join(PRESETS)}, got '{self.model}'")
        require(self.model_type in MODELS, f"--model_type must be one of {', '.join(MODELS)}, got '{self.model_type}'")
        require(self.model_type != 't5' or self.model_dims()['block_size'] >= 3,
                '--block_size (the encoder input length) must be >= 3 for T5')
        require(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        require(self.schedule in budget_lib.SCHEDULES, f"--schedule must be one of {', '.join(budget_lib.SCHEDULES)}")
        require(self.budget_unit in budget_lib.UNITS, f"--budget_unit must be one of {', '.join(budget_lib.UNITS)}")
        require(self.budget > 0, f'--budget must be > 0, got {self.budget}')
        require(self.lr > 0 and self.min_lr >= 0, f'--lr must be > 0 and --min_lr >= 0, got {self.lr}, {self.min_lr}')
        require(self.min_lr <= self.lr, f'--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})')
        require(0 <= self.warmup_frac < 1 and 0 < self.cooldown_frac <= 1, '--warmup_frac must be in [0, 1), --cooldown_frac in (0, 1]')
        require(0 <= self.warmup_units < self.budget, f'--warmup_units must be in [0, budget), got {self.warmup_units}')
        require(self.cooldown_shape in ('1-sqrt', 'linear'), "--cooldown_shape must be '1-sqrt' or 'linear'")
        require(not self.branch_budgets or (self.schedule == 'wsd' and all(m > 0 for m in self.branch_budgets)),
                '--branch_budgets needs --schedule=wsd and positive multiples of --budget')
        for key in ('batch_size', 'grad_accum', 'eval_interval', 'eval_batches', 'log_interval', 'hess_interval'):
            require(getattr(self, key) > 0, f'--{key} must be positive, got {getattr(self, key)}')
        require(0 <= self.dropout < 1, f'--dropout must be in [0, 1), got {self.dropout}')
        require(self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got '{self.arch}'")
        require(self.stack_optim in ('fresh_new', 'reset', 'keep'), "--stack_optim must be 'fresh_new', 'reset' or 'keep'")
        require(list(self.stack_fracs) == sorted(self.stack_fracs) and all(0 < f < 1 for f in self.stack_fracs),
                f'--stack_fracs must be increasing fractions in (0, 1), got {self.stack_fracs}')
        require(0 < self.theta_bar <= 1 and self.gamma_f >= 0, '--theta_bar must be in (0, 1] and --gamma_f >= 0')
        require(self.weight_decay >= 0 and self.grad_clip >= 0, '--weight_decay and --grad_clip must be >= 0')
        dims = self.model_dims()
        require(dims['n_embd'] % dims['n_head'] == 0,
                f"--n_head={dims['n_head']} must divide --n_embd={dims['n_embd']}")

    def model_dims(self):
        preset = PRESETS[self.model] if self.model in PRESETS else PRESETS['small']
        return {k: getattr(self, k) or preset[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size')}


class NonFiniteLoss(UserError):
    pass


@dataclass
class Step:
    """What an objective returns for one micro-batch."""
    loss: torch.Tensor       # scalar to backpropagate
    examples: int            # examples forwarded+backwarded (charged as training)
    logs: dict = dataclasses.field(default_factory=dict)  # floats or 0-d tensors, averaged per log line


class CausalLM:
    """The baseline objective: mean next-token loss over every token of a micro-batch.

    Method objectives subclass it. Optional hooks: `setup(trainer)` runs once before any resume (to
    restrict the data, add parameters to the optimizer, load caches); `evaluate(model)` replaces the
    val loss with the method's own (it must still return a loss, lower is better).
    """
    evaluate = None

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def setup(self, trainer):
        pass

    def __call__(self, model, data, budget):
        x, y, _ = data.next(self.batch_size)
        return Step(model(x, y).mean(), len(x))

    def sample_logits(self, model, data):
        """Vocabulary logits on a fresh batch, for Sophia's Hessian estimate."""
        return model.logits(data.next(self.batch_size)[0])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class SpanCorruption(CausalLM):
    """T5's objective (data/spans.py): an example is a raw chunk (x and y's last token) that span
    corruption turns into encoder input, decoder input and targets; the loss is the mean over the
    targets. The val set is corrupted once with a fixed seed; the training corruption's generator is
    checkpointed, so a resumed run corrupts exactly as an uninterrupted one."""

    def __init__(self, batch_size, seed):
        super().__init__(batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, trainer):
        self.vocab = SpanVocab(trainer.corpus.vocab_size, trainer.model.config.vocab_size)
        enc_in, dec_in, targets = self.corrupt(trainer.val_x, trainer.val_y, torch.Generator().manual_seed(0))
        trainer.val_x, trainer.val_y = (enc_in, dec_in), targets  # evaluate() takes a tuple of model inputs

    def corrupt(self, x, y, generator):
        return span_corrupt(torch.cat([x, y[:, -1:]], dim=1), generator, self.vocab)

    def __call__(self, model, data, budget):
        x, y, _ = data.next(self.batch_size)
        enc_in, dec_in, targets = self.corrupt(x, y, self.generator)
        return Step(model(enc_in, dec_in, targets).mean(), len(x))

    def sample_logits(self, model, data):
        x, y, _ = data.next(self.batch_size)
        return model.logits(*self.corrupt(x, y, self.generator)[:2])

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])


def build_objective(cfg):
    """The baseline objective of a model type: next-token loss for GPT, span corruption for T5."""
    return SpanCorruption(cfg.batch_size, cfg.seed) if cfg.model_type == 't5' else CausalLM(cfg.batch_size)


# -----------------------------------------------------------------------------
# setup: device, DDP, data, model, optimizer

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def print(self, *args):
        if self.master:
            print(*args, flush=True)


def setup_device(cfg):
    ddp = 'RANK' in os.environ
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    name = cfg.device
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if ddp and name.startswith('cuda'):
        name = f'cuda:{local}'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'") from None
    here = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if not here.get(device.type, False) or (device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f'--device={cfg.device} is not available on this machine: use --device=auto or --device=cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(cfg.dtype)
    if cfg.dtype == 'auto':
        dtype = torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else torch.float32
    if dtype is None:
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got '{cfg.dtype}'")
    return Runtime(device, dtype, rank, world, local)


def load_corpus(cfg):
    path = data_dir(cfg.dataset, cfg.tokenizer)
    if not (path / 'meta.json').exists():
        if cfg.dataset != 'stdlib':
            raise DataError(f'no prepared data in {path}: run `{prepare_command(cfg.dataset, cfg.tokenizer)}`')
        from data.stdlib.prepare import PrepareConfig, prepare
        print(f'preparing the embedded stdlib corpus in {path} (once)')
        prepare(PrepareConfig(tokenizer=cfg.tokenizer))
    return Corpus(path)


def model_vocab_size(model_type, vocab_size, block_size):
    """The data's vocabulary for GPT; T5-lite adds sentinels, a decoder start id and EOS (data/spans.py)."""
    return span_vocab(vocab_size, raw_length_for(block_size)).size if model_type == 't5' else vocab_size


def example_length(cfg, model):
    """The block_size of the loader's examples (each holds block_size + 1 tokens): GPT's context, or
    T5's raw chunk minus one, which span corruption shortens to the encoder's block_size."""
    T = model.config.block_size
    return raw_length_for(T) - 1 if cfg.model_type == 't5' else T


def build_model(cfg, vocab_size):
    """A fresh model from the config, or one initialised from --init_from=PATH (its shape wins)."""
    if cfg.init_from.endswith('.pt'):
        ckpt = load_checkpoint(Path(cfg.init_from))
        model_type = ckpt.get('config', {}).get('model_type', 'gpt')  # nanoGPT's checkpoints are GPTs
        if model_type != cfg.model_type:
            raise UserError(f"{cfg.init_from} holds a '{model_type}' model: pass --model_type={model_type}")
        want = model_vocab_size(model_type, vocab_size, ckpt['model_args']['block_size'])
        if ckpt['model_args']['vocab_size'] != want:
            raise UserError(f"{cfg.init_from} has vocab {ckpt['model_args']['vocab_size']}, the data needs {want}: "
                            f"use the dataset and tokenizer it was trained with")
        model = MODELS[model_type][0].from_checkpoint({**ckpt, 'model_args': {**ckpt['model_args'], 'dropout': cfg.dropout}})
    else:
        model_cls, config_cls = MODELS[cfg.model_type]
        dims = cfg.model_dims()
        model = model_cls(config_cls(vocab_size=model_vocab_size(cfg.model_type, vocab_size, dims['block_size']),
                                     dropout=cfg.dropout, bias=cfg.bias, **dims))
    model.compile_loss = cfg.compile_loss
    return model


def run_shape_key(cfg, model):
    c = model.config
    return budget_lib.shape_key(cfg.model_type, c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, cfg.batch_size)


def build_optimizer(cfg, model, name=None):
    """AdamW, Lion or Sophia-G by name, with weight decay on matrices only (not biases or norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    name, betas = name or cfg.optimizer, (cfg.beta1, cfg.beta2)
    if name == 'adamw':
        fused = next(model.parameters()).device.type == 'cuda'
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)
    if name == 'lion':
        from optim_lion import Lion
        return Lion(groups, lr=cfg.lr, betas=betas)
    from optim_sophia import SophiaG
    return SophiaG(groups, lr=cfg.lr, betas=betas, rho=cfg.rho)


class DataSource:
    """The training examples of this rank, moved to the device (ids stay on the CPU)."""

    def __init__(self, batches, device):
        self.batches, self.device = batches, device

    def next(self, n):
        x, y, ids = self.batches.next(n)
        if self.device.type == 'cuda':
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True), ids
        return x.to(self.device), y.to(self.device), ids


# -----------------------------------------------------------------------------
# checkpoints and logs

def save_checkpoint(path, ckpt):
    """Write to a temp file, fsync, rename: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(f'.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not path.exists():
        raise UserError(f'no checkpoint at {path}: check --init_from and --out_dir (or start with --init_from=scratch)')
    try:
        with warnings.catch_warnings():  # a garbage file can make the unpickler warn before it fails
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'checkpoint {path} is unreadable ({type(e).__name__}): it is corrupt or not ours') from None


def run_info(cfg):
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ''
    return {'config': dataclasses.asdict(cfg), 'argv': sys.argv, 'git_commit': commit,
            'python': sys.version.split()[0], 'torch': torch.__version__}


def prepare_out_dir(cfg, out_dir, master):
    """Refuse to train from scratch over an existing run unless asked to. Nothing is deleted here: with
    --overwrite=True the old log is replaced by the new run's first record (Trainer.log), so a call that
    fails a later check (data, checkpoint, device) leaves the old run as it was."""
    ckpt, log = out_dir / 'ckpt.pt', out_dir / 'log.jsonl'
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f'--out_dir={out_dir} is a file: give a folder')
    if cfg.init_from != 'resume' and (ckpt.exists() or log.exists()) and not cfg.overwrite:
        raise UserError(f'{out_dir} already holds a run: use --init_from=resume to continue it, '
                        f'--overwrite=True to replace it, or another --out_dir')
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)


def trim_log(log_path, iter_num):
    """After a resume, drop log records written after the checkpoint we resumed from."""
    if log_path.exists():
        lines = [l for l in log_path.read_text().splitlines() if l and json.loads(l).get('step', 0) <= iter_num]
        log_path.write_text(''.join(l + '\n' for l in lines))


# -----------------------------------------------------------------------------
# eval and sampling

@torch.no_grad()
def evaluate(model, val_x, val_y, batch_size, runtime, n_layers=None):
    """Mean per-token loss on the fixed val set, through the first n_layers blocks (default: all).
    val_x: the model's input, or a tuple of its inputs (T5: enc_in, dec_in)."""
    was_training, active = model.training, model.active_layers
    model.eval()
    model.set_active_layers(n_layers or model.n_layer)
    inputs = val_x if isinstance(val_x, tuple) else (val_x,)
    total, count = 0.0, 0
    for i in range(0, len(val_y), batch_size):
        x, y = [t[i:i + batch_size].to(runtime.device) for t in inputs], val_y[i:i + batch_size].to(runtime.device)
        with runtime.autocast():
            total += model(*x, y).sum().item()
        count += y.numel()
    model.set_active_layers(active)
    model.train(was_training)
    return total / count


def sample_text(model, tokenizer, runtime, n_tokens, prompt='\ndef '):
    start = torch.tensor([list(tokenizer.encode(prompt))], device=runtime.device)
    out = model.generate(start, n_tokens, temperature=0.8, top_k=40, generator=torch.Generator(runtime.device).manual_seed(0))
    return tokenizer.decode(out[0].tolist())


# -----------------------------------------------------------------------------
# the loop

def format_seconds(s):
    return '?' if s is None else f'{int(s // 60)}m{int(s % 60):02d}s'


class Trainer:
    """Holds one run's pieces; `run()` is the loop. Methods customise it through the objective."""

    def __init__(self, cfg, objective=None):
        self.cfg, self.rt = cfg, setup_device(cfg)
        torch.manual_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        prepare_out_dir(cfg, self.out_dir, self.rt.master)
        self.new_log = cfg.init_from != 'resume'  # the first record replaces an old run's log (--overwrite)
        self.corpus = load_corpus(cfg)
        self.tokenizer = get_tokenizer(self.corpus.meta['tokenizer'])
        self.model = build_model(cfg, self.corpus.vocab_size).to(self.rt.device)
        T, T_data = self.model.config.block_size, example_length(cfg, self.model)
        batches = Batches(self.corpus.splits['train'], T_data, cfg.seed, rank=self.rt.rank, world_size=self.rt.world_size)
        self.data = DataSource(batches, self.rt.device)
        ids = val_ids(self.corpus.splits['val'], T_data, cfg.eval_batches * cfg.batch_size)
        self.val_x, self.val_y = get_examples(self.corpus.splits['val'], ids, T_data)
        self.optimizer = build_optimizer(cfg, self.model)
        table = budget_lib.load_table(run_shape_key(cfg, self.model), cfg.rst_table) \
            if cfg.budget_unit == 'rst' or cfg.rst_table else self._optional_table()
        self.budget = budget_lib.Budget(cfg.budget_unit, cfg.budget, table,
                                        lambda L: self.model.flops_per_token(L), T, cfg.batch_size)
        self.objective = objective or build_objective(cfg)
        self.arch = build_arch(cfg, self.model.n_layer)
        self.iter_num, self.val_loss, self.evaluated_at = 0, float('inf'), None
        self.skipped_steps = 0
        self.branch_points = []  # (spent at which to save, path): set by train_wsd_branches
        self.objective.setup(self)
        if cfg.init_from == 'resume':
            self._resume()
        self.train_model = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.rt.world_size > 1:
            self.train_model = DDP(self.train_model, device_ids=[self.rt.local_rank] if self.rt.device.type == 'cuda' else None,
                                   find_unused_parameters=cfg.arch != 'full')  # skipped blocks get no grads
        self.peak_flops = cfg.peak_flops or device_peak_flops(self.rt.device)

    def _optional_table(self):
        try:
            return budget_lib.load_table(run_shape_key(self.cfg, self.model))
        except UserError:
            return None  # RST is then not counted; other units are

    def _resume(self):
        ckpt = load_checkpoint(self.out_dir / 'ckpt.pt')
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.budget.load_state_dict(ckpt['budget'])
        self.data.batches.load_state_dict(ckpt['data'])
        self.objective.load_state_dict(ckpt['objective'])
        self.arch.load_state_dict(ckpt['arch'])
        self.model.set_active_layers(ckpt['active_layers'])
        self.iter_num, self.val_loss = ckpt['iter_num'], ckpt['val_loss']
        # saved right after this step's eval, except a WSD branch point: a branch evaluates when it ends
        self.evaluated_at = self.iter_num if ckpt.get('evaluated', True) else None
        torch.set_rng_state(ckpt['rng']['cpu'])
        if self.rt.device.type == 'cuda' and ckpt['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
        if self.rt.master:
            trim_log(self.out_dir / 'log.jsonl', self.iter_num)
        self.rt.print(f'resumed from {self.out_dir / "ckpt.pt"} at step {self.iter_num}, '
                      f'{100 * self.budget.progress:.1f}% of the budget spent')

    def checkpoint(self, path=None):
        if not self.rt.master:
            return
        c = self.model.config
        ckpt = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'model_args': dataclasses.asdict(c), 'iter_num': self.iter_num, 'val_loss': self.val_loss,
                'best_val_loss': self.val_loss, 'config': dataclasses.asdict(self.cfg),
                'budget': self.budget.state_dict(), 'data': self.data.batches.state_dict(),
                'objective': self.objective.state_dict(), 'arch': self.arch.state_dict(),
                'active_layers': self.model.active_layers, 'evaluated': self.evaluated_at == self.iter_num,
                'rng': {'cpu': torch.get_rng_state(),
                        'cuda': torch.cuda.get_rng_state() if self.rt.device.type == 'cuda' else None}}
        save_checkpoint(path or self.out_dir / 'ckpt.pt', ckpt)

    def log(self, record):
        if self.rt.master:
            with open(self.out_dir / 'log.jsonl', 'w' if self.new_log else 'a') as f:
                f.write(json.dumps(record) + '\n')
            self.new_log = False

    def eval_and_save(self):
        if self.objective.evaluate is not None:
            self.val_loss = self.objective.evaluate(self.model)
        else:
            self.val_loss = evaluate(self.model, self.val_x, self.val_y, self.cfg.batch_size, self.rt,
                                     self.arch.eval_layers(self.model))
        self.log({'step': self.iter_num, 'val_loss': self.val_loss, **self.budget.spent})
        self.evaluated_at = self.iter_num
        self.checkpoint()
        self.rt.print(f'step {self.iter_num} | val loss {self.val_loss:.4f} | saved {self.out_dir / "ckpt.pt"}')

    def train_step(self, lr):
        """One optimizer step: grad_accum micro-batches from the objective, clip, update, charge."""
        cfg, model = self.cfg, self.train_model
        logs, loss_sum, depth = {}, 0.0, 0
        self.arch.before_step(self.model, self.optimizer, self.budget.progress)
        for micro in range(cfg.grad_accum):
            self.arch.before_micro_batch(self.model, self.budget.progress)
            depth += len(self.model.active_layers) / cfg.grad_accum
            if isinstance(model, DDP):  # sync gradients only on the last micro-batch
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with self.rt.autocast():
                step = self.objective(model, self.data, self.budget)
            (step.loss / cfg.grad_accum).backward()
            self.budget.charge_train(step.examples * self.rt.world_size, len(self.model.active_layers))
            loss_sum += step.loss.detach()
            for k, v in step.logs.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        loss = loss_sum / cfg.grad_accum
        if not math.isfinite(float(loss)):  # one sync a step: a nan must never reach the weights
            self.optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                raise NonFiniteLoss(f'loss is {float(loss)} at step {self.iter_num + 1}: the last good checkpoint '
                                    f'is kept; lower --lr, raise --warmup_frac, or pass --skip_nonfinite=True')
            self.skipped_steps += 1
            return loss, {**logs, 'skipped_steps': self.skipped_steps}
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        if cfg.optimizer == 'sophiag':
            tokens = cfg.batch_size * cfg.grad_accum * self.model.config.block_size * self.rt.world_size
            self.optimizer.step(bs=tokens)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.budget.charge_optimizer(cfg.optimizer)
        if cfg.optimizer == 'sophiag' and self.iter_num % cfg.hess_interval == cfg.hess_interval - 1:
            self.hessian_step()
        logs['active_layers'] = depth
        return loss, logs

    def hessian_step(self):
        """Sophia-G's Gauss-Newton-Bartlett estimate on a fresh batch, after the normal step."""
        from optim_sophia import gnb_hessian_step
        with self.rt.autocast():
            gnb_hessian_step(self.optimizer, lambda: self.objective.sample_logits(self.model, self.data))
        if not self.cfg.free_hessian:
            self.budget.charge_hessian('sophiag', len(self.model.active_layers))

    def run(self):
        cfg, rt = self.cfg, self.rt
        if rt.master:
            (self.out_dir / 'config.json').write_text(json.dumps(run_info(cfg), indent=1))
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.block_size * rt.world_size
        rt.print(f'{self.model.num_params() / 1e6:.2f}M params | {tokens_per_step:,} tokens per step | '
                 f'budget {cfg.budget:g} {cfg.budget_unit} | {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule} | '
                 f'arch {cfg.arch} | data {self.corpus.path} | device {rt.device} {str(rt.dtype).removeprefix("torch.")}')
        self.model.train()
        interrupted, t_start, meter = False, time.time(), Meter(self.budget)
        try:
            with signals_between_steps() as stop:
                while not self.budget.done:
                    if stop:
                        raise KeyboardInterrupt
                    lr = budget_lib.lr_at(self.budget.spent[cfg.budget_unit], self.budget.total, cfg)
                    t0 = time.time()
                    loss, logs = self.train_step(lr)
                    self.budget.add_wall(self._agree(time.time() - t0))
                    self.iter_num += 1
                    meter.add(loss, logs)
                    if self.iter_num % cfg.log_interval == 0 or self.budget.done:
                        self._log_progress(meter, lr)
                    if self.iter_num % cfg.eval_interval == 0 and not self.budget.done:
                        self.eval_and_save()
                    self.save_branch_points()  # after this step's log line: the branch's log must hold it
        except KeyboardInterrupt:
            interrupted = True
            rt.print(f'interrupted at step {self.iter_num}: saving a checkpoint')
        except NonFiniteLoss:
            self.log({'step': self.iter_num + 1, 'nonfinite': True, **self.budget.spent})
            raise
        if self.evaluated_at != self.iter_num:  # Ctrl-C just after an eval: that step is logged and saved
            self.eval_and_save()
        rt.print(f'done: {self.iter_num} steps, {self.budget.spent["tokens"]:,.0f} tokens, '
                 f'{format_seconds(time.time() - t_start)} wall, final val loss {self.val_loss:.4f}')
        if rt.master and cfg.sample_tokens and not interrupted:
            rt.print('--- sample ---' + sample_text(self.model, self.tokenizer, rt, cfg.sample_tokens) + '\n---')
        return {'steps': self.iter_num, 'val_loss': self.val_loss, 'spent': dict(self.budget.spent),
                'interrupted': interrupted}

    def save_branch_points(self):
        """WSD cooldown branches: checkpoint the trunk just before each smaller budget's cooldown begins."""
        while self.branch_points and self.budget.spent[self.cfg.budget_unit] > self.branch_points[0][0]:
            _, path = self.branch_points.pop(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.checkpoint(path)
            if self.rt.master:
                log = self.out_dir / 'log.jsonl'  # the trunk's log so far is the branch's
                (path.parent / 'log.jsonl').write_bytes(log.read_bytes() if log.exists() else b'')

    def _agree(self, seconds):
        """With DDP, all ranks must stop together: wall time is the slowest rank's."""
        if self.rt.world_size > 1 and self.cfg.budget_unit == 'wall':
            t = torch.tensor([seconds], device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()
        return seconds

    def _log_progress(self, meter, lr):
        loss, logs, rates = meter.read(self.peak_flops, self.rt.world_size)
        if self.cfg.optimizer == 'sophiag' and self.optimizer.win_rate is not None:
            logs['win_rate'] = self.optimizer.win_rate  # fraction of coordinates not clipped
        if self.rt.world_size > 1:
            loss = torch.tensor(loss, device=self.rt.device)
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            loss = loss.item()
        self.log({'step': self.iter_num, 'train_loss': loss, 'lr': lr, **rates, **self.budget.spent, **logs})
        extra = ''.join(f' | {k} {v:.4g}' for k, v in logs.items() if k != 'active_layers' or self.cfg.arch != 'full')
        self.rt.print(f"step {self.iter_num} | loss {loss:.4f} | lr {lr:.2e} | budget {100 * self.budget.progress:.1f}% "
                      f"eta {format_seconds(rates['eta_s'])} | {rates['tokens_per_s'] / 1e3:.1f}k tok/s | "
                      f"mfu {100 * rates['mfu']:.1f}%{extra}")


@contextlib.contextmanager
def signals_between_steps():
    """Ctrl-C and SIGTERM mostly land inside a step, after its batch (and layer-drop mask) was drawn:
    raising there would checkpoint the previous step with the data already advanced, and the resumed
    run would skip a batch. They are recorded instead and the loop stops at the next step boundary;
    a second Ctrl-C interrupts at once."""
    stop = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Meter:
    """Averages the train loss and the objective's logs over a log interval; rates use the training
    wall clock (budget.spent['wall']), which stops during eval and checkpoints."""

    def __init__(self, budget):
        self.budget = budget
        self._reset()

    def _reset(self):
        self.loss, self.logs, self.n = 0.0, {}, 0
        self.since = {k: self.budget.spent[k] for k in ('wall', 'tokens', 'flops')} | {'p': self.budget.progress}

    def add(self, loss, logs):
        self.loss, self.n = self.loss + loss, self.n + 1
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v

    def read(self, peak_flops, world_size):
        spent, n = self.budget.spent, max(self.n, 1)
        dt = max(spent['wall'] - self.since['wall'], 1e-9)
        tok_s = (spent['tokens'] - self.since['tokens']) / dt / world_size
        dp = self.budget.progress - self.since['p']
        flops_s = (spent['flops'] - self.since['flops']) / dt / world_size  # what ran: dropped blocks, scoring
        rates = {'tokens_per_s': tok_s, 'mfu': flops_s / peak_flops,
                 'eta_s': (1 - self.budget.progress) * dt / dp if dp > 0 else None}
        loss, logs = float(self.loss) / n, {k: float(v) / n for k, v in self.logs.items()}
        self._reset()
        return loss, logs, rates


def train(cfg, objective=None):
    """Run one budgeted training run; returns its summary. Method files call this with their objective."""
    trainer = Trainer(cfg, objective)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) saves a checkpoint like Ctrl-C


def main(cfg):
    signal.signal(signal.SIGTERM, _interrupt)
    return budget_lib.train_wsd_branches(cfg) if cfg.branch_budgets else train(cfg)


if __name__ == '__main__':
    cli(main, TrainConfig)
