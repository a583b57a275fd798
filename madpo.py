"""Preference optimization on an offline sentiment task: reward model, DPO, cDPO, IPO, beta-DPO and MADPO.

MADPO: "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization"
(arXiv 2510.05342 v1, Oct 2025). Baselines: DPO (Rafailov et al. 2023, arXiv 2305.18290) and its
conservative variant with label smoothing (cDPO), IPO (Azar et al. 2023, arXiv 2310.12036), beta-DPO
(Wu et al. 2024, arXiv 2407.08639).
The idea: a Bradley-Terry reward model gives each preference pair a margin m; MADPO multiplies the pair's
DPO loss by a detached weight w(m), which amplifies the target margin of hard pairs (small |m|) and damps
easy ones (large m), instead of one beta for every pair (DPO) or for a batch (beta-DPO).

The study (the paper's task, offline; data/reviews/): continue a review prompt positively, ground truth
r = 3 * VADER compound(prompt + continuation) in [-3, 3], Bradley-Terry labels, tiers high / medium / low.
Each arm (ARMS) runs at every beta of --betas; its policy is scored along training, and the arms are
compared by reward at matched KL to the SFT reference on their reward-vs-KL frontiers, over --seeds.
MADPO's margins come from the trained reward model, the true r_w - r_l (oracle) or the oracle plus noise.

    python madpo.py --jobs=2                          # the study: 3 seeds x 3 tiers x 9 arms x 3 betas = 243 po runs
    python madpo.py --quick=True                      # a few-minute smoke run (one seed, beta 0.1)
    python madpo.py --stage=po --loss=ipo --tier=low  # one stage (paths under --out_dir/seed<seed>/)
    python madpo.py --stage=compare                   # tables and figures from whatever has finished

--stage=all skips finished stages and resumes interrupted ones: rerun the same command to continue.
Keys are scoped by stage (sft_*, rm_*, po_*; `--help` says which stage reads which key).

Cost, from single-thread runs of each stage at the defaults (AMD EPYC, under other jobs' load): sft 232 s,
pairs 171 s (per seed), rm 149 s (per seed and tier, 9 runs), po 11.7 s (per run, 60 runs). The default study
is 3 + 3 + 9 + 243 runs, ~5,400 CPU-s: with --jobs=2 (stage by stage, so 2 + 2 + 5 rounds of the first
three stages) about 2*232 + 2*171 + 5*149 + 243*11.7/2 = 2,970 s, 50 minutes on 2 free cores. A bigger grid
costs per extra beta 81 po runs (~16 CPU-minutes, 8 minutes at --jobs=2), per extra seed ~1,800 CPU-s (one
sft, pairs, 3 rm and 81 po runs), per extra arm 27 po runs (~5 CPU-minutes); po run time grows with
--po_iters, --po_points and --n_eval. The betas (0.01, 0.03, 0.1) span the matched KLs of 2 and 5 nats: on
the high tier (3 seeds) DPO, cDPO, IPO and beta-DPO stayed below 1.5 nats at beta 1 and 2.5 at beta 0.3 (IPO
also at 0.03), where DPO and cDPO at beta 0.01 reach 15 and 9 (seed 0).
"""
import dataclasses
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

import runs
import train
from configurator import UserError, check_distinct, check_ranges, cli, key, require
from data.loader import NUMBER, atomic_write, file_sha256, read_result
from data.reviews.evaluate import DONE_FIX, DONE_KEYS, PolicyScorer, compare, load_runs
from data.reviews.pairs import TIERS, batched_logps, build_pairs, sequence_logps
from data.reviews.prepare import ensure_prepared
from data.reviews.reward_model import PairObjective, RewardObjective
from model import evaluating


# -----------------------------------------------------------------------------
# the losses: h = (logp_w - ref_w) - (logp_l - ref_l), the implicit reward margin, per pair

def dpo_loss(h, beta):
    """DPO: -log sigmoid(beta * h)."""
    return -F.logsigmoid(beta * h)


def cdpo_loss(h, beta, eps):
    """Conservative DPO: each label is wrong with probability eps, -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return (1 - eps) * dpo_loss(h, beta) + eps * dpo_loss(-h, beta)


def ipo_loss(h, beta):
    """IPO: (h - 1/(2 beta))^2 (TRL feeds it per-token-averaged log-ratios, the MADPO baseline summed ones)."""
    return (h - 1 / (2 * beta)) ** 2


def implicit_margin(logps, ref_logps, lens=None):
    """h from (B, 2) summed log-probs of [chosen, rejected]; with lens (B, 2), from per-token-averaged
    log-ratios (TRL's IPO) instead of summed ones."""
    ratio = logps - ref_logps
    if lens is not None:
        ratio = ratio / lens
    return ratio[:, 0] - ratio[:, 1]


class BetaDPO:
    """beta-DPO as the authors' code runs it: running mean/std of the margins (momentum 0.9, from 0),
    updated from the whole batch; keep 80% of the pairs, drawn without replacement with Gaussian weights
    around the running mean; beta = beta0 * (1 + alpha * (mean kept margin - running mean)) >= 1e-3."""

    def __init__(self, beta0, alpha=0.6, keep=0.8, momentum=0.9):
        self.beta0, self.alpha, self.keep, self.momentum = beta0, alpha, keep, momentum
        self.mean, self.std = 0.0, 0.0

    def __call__(self, h, generator=None):
        """-> (loss averaged over the kept pairs, beta, kept indices)."""
        m = h.detach().float()
        self.mean = self.momentum * self.mean + (1 - self.momentum) * m.mean().item()
        self.std = self.momentum * self.std + (1 - self.momentum) * m.std().item()
        weight = torch.exp(-0.5 * ((m - self.mean) / max(self.std, 1e-8)) ** 2)
        if not weight.sum() > 0:  # every margin far out (or std 0 at the start): draw uniformly
            weight = torch.ones_like(m)
        kept = torch.multinomial(weight.cpu(), max(1, int(len(m) * self.keep)), replacement=False, generator=generator)
        kept = kept.to(h.device)
        beta = max(self.beta0 * (1 + self.alpha * (m[kept].mean().item() - self.mean)), 1e-3)
        return dpo_loss(h[kept], beta).mean(), beta, kept

    def state_dict(self):
        return {'mean': self.mean, 'std': self.std}

    def load_state_dict(self, state):
        self.mean, self.std = state['mean'], state['std']


def madpo_c(a, c_max=4.0, lam=1.0, tau=math.log(999)):
    """c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau))), K = (c_max - 1)/(1 - c_min): c(tau) = 1."""
    c_min = 1 / c_max
    K = (c_max - 1) / (1 - c_min)
    return c_min + (c_max - c_min) / (1 + K * torch.exp(lam * (a - tau)))


def madpo_weight(m, c_max=4.0, lam=1.0, tau=math.log(999)):
    """w(m) = sigmoid(c(|m|) m) / sigmoid(m) for m > -tau, else 1 (m = the RM's margin toward the winner)."""
    w = torch.sigmoid(madpo_c(m.abs(), c_max, lam, tau) * m) / torch.sigmoid(m)
    return torch.where(m > -tau, w, torch.ones_like(w))


def madpo_loss(h, w, beta):
    """MADPO: mean of w_i * -log sigmoid(beta h_i), the weights detached."""
    return (w.detach() * dpo_loss(h, beta)).mean()


def oracle_margins(r, noise=0.0, seed=0):
    """MADPO's m from the true rewards r (n, 2) = [chosen, rejected]: r_w - r_l, plus noise * N(0, 1) per
    pair drawn from a generator seeded by seed (the same noise for every run of that seed)."""
    z = torch.randn(len(r), generator=torch.Generator().manual_seed(seed), dtype=r.dtype)
    return r[:, 0] - r[:, 1] + noise * z


# -----------------------------------------------------------------------------
# the po objective (the reward model and the pair batches: data/reviews/reward_model.py)

class PreferenceObjective(PairObjective):
    """DPO, cDPO, IPO, beta-DPO or MADPO on the policy; reference log-probs (and MADPO's margins) precomputed.
    With a scorer, each eval also scores the policy (data/reviews/evaluate.py): a point of its frontier."""

    def __init__(self, cfg, pairs_path, ref_ckpt, rm_dir=None, scorer=None):
        super().__init__(cfg, pairs_path)
        self.ref_ckpt, self.rm_dir, self.scorer, self.curve = Path(ref_ckpt), rm_dir, scorer, []
        self.bdpo = BetaDPO(cfg.beta, cfg.bdpo_alpha, cfg.bdpo_keep, cfg.bdpo_momentum)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # beta-DPO's draws; its own, so a resume is exact

    def setup(self, ctx):
        super().setup(ctx)
        self.train_set = tuple(x[:self.cfg.po_pairs] for x in self.train_set)  # the reward model saw them all
        self.val_set = tuple(x[:self.cfg.po_val_pairs] for x in self.val_set)
        sizes = [len(self.train_set[0]), len(self.val_set[0])]
        self.ref_train, self.ref_val = self.reference_logps().to(self.device).split(sizes)
        if self.scorer:
            self.curve = [{'step': 0, **self.scorer.reference_point()}]  # a resume restores the later points
        if self.cfg.loss == 'madpo':
            self.weights = madpo_weight(self.pair_margins(), self.cfg.c_max, self.cfg.lam, self.cfg.tau)
            q = torch.quantile(self.weights.cpu(), torch.tensor([0, 0.1, 0.5, 0.9, 1.0])).tolist()
            summary = {'quantiles_0_10_50_90_100': q, 'mean': self.weights.mean().item(),
                       'frac_amplified': (self.weights > 1).float().mean().item(),
                       'histogram_0_to_2_by_0.2': torch.histc(self.weights.cpu(), 10, 0, 2).int().tolist()}
            (ctx.out_dir / 'madpo_weights.json').write_text(json.dumps(summary, indent=1))
            ctx.rt.print(f'MADPO weights: quantiles {", ".join(f"{v:.3f}" for v in q)}, mean {summary["mean"]:.3f}')

    def pair_margins(self):
        """m per training pair (--margins): the trained reward model's, or the oracle's (noisy: plus noise)."""
        if self.cfg.margins != 'rm':
            noise = self.cfg.margin_noise if self.cfg.margins == 'noisy' else 0.0
            return oracle_margins(self.train_set[2], noise, self.cfg.seed).to(self.device)
        rm = RewardObjective(self.cfg, self.pairs_path)
        rm.load_frozen(self.rm_dir, self.device)
        return rm.margins(rm.model, *self.train_set[:2])

    def reference_logps(self):
        """Summed reference log-probs of [chosen, rejected] for every pair (n, 2): computed once per
        (pairs, reference) and cached next to the pairs file."""
        cache = self.pairs_path.with_name(self.pairs_path.stem + '_ref_logps.pt')
        key = f'{file_sha256(self.ref_ckpt)}{file_sha256(self.pairs_path)}{len(self.train_set[0])},{len(self.val_set[0])}'
        try:  # a cache: one that is missing, damaged or for other pairs is computed again
            saved = torch.load(cache, weights_only=True)
        except Exception:
            saved = None
        if isinstance(saved, dict) and saved.get('key') == key and isinstance(saved.get('logps'), torch.Tensor):
            return saved['logps']
        ref = runs.load_model(self.ref_ckpt, self.device, self.cfg.compile_loss)
        seq = torch.cat([self.train_set[0], self.val_set[0]])
        lens = torch.cat([self.train_set[1], self.val_set[1]])
        logps = torch.stack([batched_logps(ref, seq[:, k], self.cfg.prompt_len, lens[:, k]) for k in (0, 1)], 1).cpu()
        runs.save_checkpoint(cache, {'key': key, 'logps': logps})  # atomic: parallel runs may share it
        return logps

    def margins_h(self, model, seq, lens, ref, average=False):
        flat_seq, flat_lens = self.flat(seq, lens)
        lp = sequence_logps(model, flat_seq, self.cfg.prompt_len, flat_lens)                 # (2B,)
        return implicit_margin(torch.stack(lp.chunk(2), 1), ref, lens if average else None)

    def __call__(self, model, data, ctx):
        cfg, idx = self.cfg, self.next_indices()
        seq, lens, ref = self.train_set[0][idx], self.train_set[1][idx], self.ref_train[idx]
        h = self.margins_h(model, seq, lens, ref, average=cfg.loss == 'ipo' and cfg.ipo_average)
        logs = {'margin': h.mean().detach(), 'pref_acc': (h > 0).float().mean().detach()}
        if cfg.loss == 'dpo':
            loss = dpo_loss(h, cfg.beta).mean()
        elif cfg.loss == 'cdpo':
            loss = cdpo_loss(h, cfg.beta, cfg.label_smoothing).mean()
        elif cfg.loss == 'ipo':
            loss = ipo_loss(h, cfg.beta).mean()
        elif cfg.loss == 'bdpo':
            loss, logs['beta'], _ = self.bdpo(h, self.rng)
        else:
            w = self.weights[idx]
            loss = madpo_loss(h, w, cfg.beta)
            logs.update(w_mean=w.mean(), w_min=w.min(), w_max=w.max())
        return train.Step(loss, 2 * len(idx), logs)

    @torch.no_grad()
    def evaluate(self, model, ctx):
        """Held-out DPO loss at beta (the same yardstick for every loss), the preference accuracy, and
        with a scorer the policy's reward and KL at this step (appended to the curve)."""
        seq, lens = self.val_set[:2]
        with evaluating(model):
            h = torch.cat([self.margins_h(model, seq[i:i + 64], lens[i:i + 64], self.ref_val[i:i + 64])
                           for i in range(0, len(seq), 64)])
        self.val_metrics = {'pref_acc': (h > 0).float().mean().item(), 'margin': h.mean().item()}
        if self.scorer:
            self.curve.append({'step': ctx.step, **self.scorer(model)})
            self.val_metrics.update(self.curve[-1], curve=self.curve)
            ctx.rt.print(f"step {ctx.step}: reward {self.curve[-1]['reward']:.3f}, KL {self.curve[-1]['kl']:.2f}")
        return dpo_loss(h, self.cfg.beta).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'bdpo': self.bdpo.state_dict(), 'rng': self.rng.get_state(), 'curve': self.curve}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bdpo.load_state_dict(state['bdpo'])
        self.rng.set_state(state['rng'])
        self.curve = state['curve']


# -----------------------------------------------------------------------------
# config: only the keys that apply; each stage builds its own train.TrainConfig from them

LOSSES = ('dpo', 'cdpo', 'ipo', 'bdpo', 'madpo')
MARGINS = ('rm', 'oracle', 'noisy')
ARMS = {  # the study's arms: name -> the po keys that make it (method_name inverts it)
    'dpo': dict(loss='dpo'), 'cdpo': dict(loss='cdpo'), 'ipo': dict(loss='ipo'), 'ipo_avg': dict(loss='ipo', ipo_average=True),
    'bdpo': dict(loss='bdpo'), 'madpo2': dict(loss='madpo', c_max=2.0), 'madpo4': dict(loss='madpo', c_max=4.0),
    'madpo4_oracle': dict(loss='madpo', c_max=4.0, margins='oracle'),
    'madpo4_noisy': dict(loss='madpo', c_max=4.0, margins='noisy')}


SWEPT_KEYS = (('seeds', '(0, 1, 2)'), ('arms', "('dpo', 'madpo4')"), ('betas', '(0.1,)'), ('tiers', "('high',)"))  # and an example


@dataclass(frozen=True)
class MadpoConfig:
    """The stages' keys; each comment starts with the stages that read the key."""
    QUICK: ClassVar[dict] = dict(seeds=(0,), betas=(0.1,), sft_iters=1500, n_pairs=1500, val_pairs=100, rm_iters=300,
                                 po_iters=60, po_points=2, n_eval=100)
    stage: str = key('all', ('sft', 'pairs', 'rm', 'po', 'compare', 'all'))  # the stage to run; all: every stage
    out_dir: str = key('out/madpo', 'path')  # all stages: <out_dir>/seed<seed>/{sft,pairs,rm_<tier>,po_<arm>_b<beta>_<tier>}
    seed: int = 0                    # all stages (a single stage runs --seed)
    seeds: tuple = key((0, 1, 2), '>=0')  # --stage=all: runs every stage for each seed
    quick: bool = False              # all stages: a few-minute smoke run (QUICK's values for the keys not given)
    arms: tuple = tuple(ARMS)        # --stage=all: the po arms to run (compare: the rows)
    betas: tuple = key((0.01, 0.03, 0.1), '>0')  # --stage=all: each arm runs at each beta (each beta: 27 po runs per seed)
    tiers: tuple = tuple(TIERS)      # --stage=all: the pair tiers to run
    jobs: int = key(1, '>0')         # --stage=all: rm and po runs in this many processes, one thread each
    init_from: str = key('scratch', ('scratch', 'resume'))  # sft, rm, po: resume continues the stage's checkpoint
    overwrite: bool = False          # sft, rm, po: replace a run in the stage's folder; --stage=all: rerun finished stages
    threads: int = key(0, '>=0')     # all stages: torch CPU threads; 0 = torch's default (1 is faster on a busy machine)
    dataset: str = 'reviews'         # all stages: data/reviews/byte, generated on first use (or reviews/imdb)
    scorer: str = key('vader', ('vader', 'transformer'))  # pairs, po: ground truth (transformer needs network)
    model: str = 'tiny'              # sft (rm and po start from its checkpoint): a preset in model.PRESETS
    n_layer: int = 0                 # sft: 0 = the preset's
    n_head: int = 0                  # sft: 0 = the preset's
    n_embd: int = 0                  # sft: 0 = the preset's
    block_size: int = 96             # sft: >= prompt_len + max_new
    device: str = 'auto'             # all stages: auto, cpu, cuda, cuda:1, mps
    dtype: str = 'auto'              # sft, rm, po: auto (bf16 on GPU, else float32), float32, bfloat16, float16
    compile_loss: bool = False       # all stages: eager kernels (tiny model, many short runs: compile is a startup cost)
    eval_interval: int = key(500, '>0')  # sft: steps between evals and checkpoints
    rm_eval_interval: int = key(250, '>0')  # rm: steps between evals (early stopping) and checkpoints
    log_interval: int = key(25, '>0')    # sft, rm, po
    sft_iters: int = key(2000, '>0')     # sft: optimizer updates
    sft_lr: float = key(2e-3, '>0')      # sft: peak lr (cosine, AdamW: train.TrainConfig's defaults)
    sft_batch_size: int = key(32, '>0')  # sft: sequences per step
    prompt_len: int = key(24, '>0')      # pairs, rm, po: prompt bytes (a review's opening)
    max_new: int = key(72, '>0')         # pairs, po: continuation bytes, eos included
    temperature: float = key(1.0, '>0')  # pairs, po: sampling; 1 keeps the KL estimate honest
    n_pairs: int = key(20000, '>0')      # pairs: training pairs per tier (one prompt each): rm trains on all of them
    val_pairs: int = key(1000, '>0')     # pairs: held-out pairs per tier (RM early stopping, accuracy and ceiling; PO held-out loss)
    n_eval: int = key(160, '>0')         # po: held-out prompts scored at each point of the curve
    tier: str = key('high', tuple(TIERS))  # rm, po: high (on-policy), medium (half off-policy), low (all)
    pair_batch: int = key(16, '>0')      # rm, po: pairs per step (2x sequences)
    rm_iters: int = key(2000, '>0')      # rm: optimizer updates (the best eval step is kept)
    rm_lr: float = key(1e-4, '>0')       # rm: peak lr (tuning the whole model: 3e-4 learns slower, 1e-3 not at all)
    rm_pool: str = key('sum', ('last', 'mean', 'sum'))  # rm: the per-position scores' sum or mean over the continuation, or the last
    rm_head: int = key(256, '>=0')       # rm: width of the per-position MLP head; 0 = linear
    rm_freeze: bool = False          # rm: train the head only, on the frozen SFT backbone (with --rm_lr=3e-3; ~0.05 less accurate)
    po_pairs: int = key(3000, '>0')      # po: trains on the first po_pairs training pairs
    po_val_pairs: int = key(250, '>0')   # po: held-out pairs of its DPO loss and preference accuracy (the first ones)
    po_iters: int = key(120, '>0')       # po: optimizer updates
    po_lr: float = key(5e-5, '>0')       # po: peak lr (3e-4 reaches KL ~100 nats in 30 steps at beta 0.03)
    po_points: int = key(4, '>0')        # po: curve points along training (evals every po_iters // po_points steps)
    loss: str = key('madpo', LOSSES)     # po: dpo, cdpo, ipo, bdpo or madpo
    beta: float = key(0.1, '>0')         # po: every loss (beta-DPO's beta0)
    label_smoothing: float = key(0.1, '[0, 0.5)')  # po, cdpo: eps, the assumed probability that a label is flipped
    ipo_average: bool = False        # po, ipo: per-token-averaged log-ratios (TRL) instead of summed (MADPO's baseline)
    bdpo_alpha: float = key(0.6, '>=0')  # po, bdpo: beta grows with the kept margin (< 0 would invert it; 0: beta0)
    bdpo_keep: float = key(0.8, '(0, 1]')      # po, bdpo: fraction of the batch kept
    bdpo_momentum: float = key(0.9, '[0, 1)')  # po, bdpo
    margins: str = key('rm', MARGINS)  # po, madpo: m from the trained 'rm', the true r_w - r_l ('oracle'), or 'noisy'
    margin_noise: float = key(1.0, '>=0')      # po, madpo, noisy: std of the Gaussian noise added to the oracle's m
    c_max: float = key(4.0, '>1')    # po, madpo: c_min = 1/c_max
    lam: float = key(1.0, '>0')      # po, madpo
    tau: float = key(math.log(999), '>0')  # po, madpo: c(tau) = 1, w = 1 for m <= -tau: a margin magnitude
    matched_kls: tuple = key((2.0, 5.0), '>0')  # compare: the KLs (nats) at which rewards are read

    def __post_init__(self):
        check_ranges(self)
        require(set(self.arms) <= set(ARMS), f"--arms must be among {', '.join(ARMS)}, got {self.arms}")
        require(set(self.tiers) <= set(TIERS), f"--tiers must be among {', '.join(TIERS)}, got {self.tiers}")
        for name, example in SWEPT_KEYS:
            check_distinct(name, getattr(self, name), example)
        block_size = train_config(self, 'sft').model_dims()['block_size']  # the loop's own checks run here too
        require(self.prompt_len + self.max_new <= block_size,
                f'--prompt_len + --max_new ({self.prompt_len + self.max_new}) must be <= --block_size ({block_size})')
        require(self.po_points <= self.po_iters, f'--po_points ({self.po_points}) must be <= --po_iters ({self.po_iters})')


def method_name(cfg):
    """The arm a po config runs, as ARMS names it (madpo names c_max, and its margins unless the RM's)."""
    if cfg.loss == 'madpo':
        return f'madpo{cfg.c_max:g}' + ('' if cfg.margins == 'rm' else f'_{cfg.margins}')
    return 'ipo_avg' if cfg.loss == 'ipo' and cfg.ipo_average else cfg.loss


def arm_config(cfg, arm):
    return dataclasses.replace(cfg, **{'ipo_average': False, 'margins': 'rm', **ARMS[arm]})


def folder(cfg, stage):
    """A stage's folder: <out_dir>/seed<seed>/{sft, pairs, rm_<tier>, po_<arm>_b<beta>_<tier>}."""
    name = {'rm': f'rm_{cfg.tier}', 'po': f'po_{method_name(cfg)}_b{cfg.beta:g}_{cfg.tier}'}.get(stage, stage)
    return Path(cfg.out_dir) / f'seed{cfg.seed}' / name


def train_config(cfg, stage):
    """The shared loop's full TrainConfig for the sft, rm or po stage (saved in its checkpoints): its folder,
    budget in steps, lr and batch; rm and po start from the SFT weights (or resume their own)."""
    iters, lr, batch_size = {'sft': (cfg.sft_iters, cfg.sft_lr, cfg.sft_batch_size), 'rm': (cfg.rm_iters, cfg.rm_lr, cfg.pair_batch),
                             'po': (cfg.po_iters, cfg.po_lr, cfg.pair_batch)}[stage]
    init_from = cfg.init_from if stage == 'sft' or cfg.init_from == 'resume' else str(folder(cfg, 'sft') / 'ckpt.pt')
    eval_interval = {'sft': cfg.eval_interval, 'rm': cfg.rm_eval_interval, 'po': max(1, cfg.po_iters // cfg.po_points)}[stage]
    return train.TrainConfig(
        out_dir=str(folder(cfg, stage)), init_from=init_from, overwrite=cfg.overwrite, seed=cfg.seed, dataset=cfg.dataset,
        batch_size=batch_size, model=cfg.model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        block_size=cfg.block_size, budget_unit='iters', budget=float(iters), lr=lr, eval_interval=eval_interval,
        log_interval=cfg.log_interval, sample_tokens=0, device=cfg.device, dtype=cfg.dtype, compile_loss=cfg.compile_loss)


# -----------------------------------------------------------------------------
# the stages; each writes done.json (its results and wall time) in its folder

def train_stage(cfg, stage, objective=None):
    result = train.train(train_config(cfg, stage), objective)
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted'], **getattr(objective, 'val_metrics', {})}


def stage_sft(cfg, device):
    return train_stage(cfg, 'sft')


def stage_pairs(cfg, device):
    sft = runs.load_model(folder(cfg, 'sft') / 'ckpt.pt', device, cfg.compile_loss)
    return build_pairs(cfg, sft, device, folder(cfg, 'pairs'))


def stage_rm(cfg, device):
    objective = RewardObjective(cfg, folder(cfg, 'pairs') / f'{cfg.tier}.pt')
    result = train_stage(cfg, 'rm', objective)
    if not result['interrupted']:  # what MADPO's po stage reads
        objective.save(folder(cfg, 'rm') / 'rm.pt')
        print(f"RM {cfg.tier}: held-out accuracy {result['acc']:.3f} vs the labels (step {result['step']}), ceiling "
              f"{result['ceiling']:.3f} (the oracle reaches {result['oracle_acc']:.3f} on these labels)")
    return result


def stage_po(cfg, device):
    pairs, sft, rm = folder(cfg, 'pairs') / f'{cfg.tier}.pt', folder(cfg, 'sft') / 'ckpt.pt', folder(cfg, 'rm')
    scorer = PolicyScorer(cfg, runs.load_model(sft, device, cfg.compile_loss), device)
    return {'method': method_name(cfg), **train_stage(cfg, 'po', PreferenceObjective(cfg, pairs, sft, rm, scorer))}


def stage_compare(cfg):
    """The study's tables (data/reviews/evaluate.py), printed and written to <out_dir>/compare.md, and one
    frontier figure per tier."""
    curves = load_runs(cfg.out_dir)
    require(curves or list(Path(cfg.out_dir).glob('seed*/rm_*/done.json')),
            f'no finished rm or po run under {cfg.out_dir}/seed*/: run those stages first')
    return compare(cfg.out_dir, curves, list(cfg.arms) + sorted({m for m, _, _ in curves} - set(cfg.arms)), cfg.matched_kls)


STAGES = {'sft': stage_sft, 'pairs': stage_pairs, 'rm': stage_rm, 'po': stage_po}


def read_done(cfg, name):
    """A finished stage's done.json, or one line naming a damaged one."""
    keys = {'wall_s': NUMBER, 'config': dict, **DONE_KEYS.get(name, {})}
    return read_result(folder(cfg, name) / 'done.json', keys, DONE_FIX)


def run_stage(cfg, name, skip_done=False):
    """Run one stage; write its done.json (results, wall time, keys). In --stage=all a finished stage is
    skipped and an interrupted one resumed (unless --overwrite=True)."""
    out = folder(cfg, name)
    if skip_done and not cfg.overwrite:
        if (out / 'done.json').exists():
            done = read_done(cfg, name)
            print(f'{out}: done, skipped')
            return done
        if (out / 'ckpt.pt').exists():
            cfg = dataclasses.replace(cfg, init_from='resume')
    print(f'=== {name} -> {out}', flush=True)
    t0 = time.time()
    result = STAGES[name](cfg, train.setup_device(cfg).device)
    if result.get('interrupted'):
        raise UserError(f'{name} was interrupted: rerun with --init_from=resume (--stage=all resumes by itself)')
    # the stage's madpo keys (its checkpoint holds only the loop's TrainConfig)
    result.update(wall_s=time.time() - t0, config=dataclasses.asdict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / 'done.json', lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def run_many(cfgs, name, jobs):
    """run_stage(cfg, name) for each config, skipping finished ones: here, or in `jobs` worker processes
    of one thread each (the runs are independent; each writes only its own folder)."""
    if jobs == 1:
        return [run_stage(c, name, skip_done=True) for c in cfgs]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn'),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(run_stage, cfgs, [name] * len(cfgs), [True] * len(cfgs)))


def run_all(cfg):
    """Stage by stage over the seeds, so that ceilings and reward models come first; then the po runs tier
    by tier and arm by arm (every seed and beta of an arm together: a partial study holds whole cells)."""
    seeds = [dataclasses.replace(cfg, seed=s) for s in cfg.seeds]
    plan = [(seeds, 'sft'), (seeds, 'pairs'), ([dataclasses.replace(c, tier=t) for c in seeds for t in cfg.tiers], 'rm'),
            ([dataclasses.replace(arm_config(c, arm), tier=t, beta=b)
              for t in cfg.tiers for arm in cfg.arms for c in seeds for b in cfg.betas], 'po')]
    if not cfg.overwrite:  # a damaged done.json is refused before any stage runs, not after hours of them
        for cfgs, name in plan:
            for c in [c for c in cfgs if (folder(c, name) / 'done.json').exists()]:
                read_done(c, name)
    for cfgs, name in plan:
        run_many(cfgs, name, cfg.jobs)
    return stage_compare(cfg)


def main(cfg):
    require(int(os.environ.get('WORLD_SIZE', 1)) == 1, 'madpo.py runs in one process: start it with python, not torchrun')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ensure_prepared(cfg.dataset)
    if cfg.stage == 'all':
        return run_all(cfg)
    if cfg.stage == 'compare':
        return stage_compare(cfg)
    return run_stage(cfg, cfg.stage)


if __name__ == '__main__':
    cli(main, MadpoConfig)
