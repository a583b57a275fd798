"""Preference optimization on an offline sentiment task: reward model, DPO, IPO, beta-DPO and MADPO.

MADPO: "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization"
(arXiv 2510.05342 v1, Oct 2025). Baselines: DPO (Rafailov et al. 2023, arXiv 2305.18290), IPO (Azar et
al. 2023, arXiv 2310.12036), beta-DPO (Wu et al. 2024, arXiv 2407.08639).
The idea: a Bradley-Terry reward model gives each preference pair a margin m; MADPO multiplies the pair's
DPO loss by a detached weight w(m), which amplifies the target margin of hard pairs (small |m|) and damps
easy ones (large m), instead of one beta for every pair (DPO) or for a batch (beta-DPO).

The task (the paper's, offline): continue a review prompt so that the text is positive. Ground truth
r = 3 * VADER compound(prompt + continuation) in [-3, 3] (vaderSentiment, pure Python, ships its lexicon:
the one extra dependency of this file). Stages, each through train.train:
  sft    a small byte-level GPT on generated reviews (data/reviews/prepare.py; prepared on first use)
  pairs  two SFT samples per prompt, Bradley-Terry labels; tiers high / medium / low (off-policy pairs)
  rm     Bradley-Terry reward model, loss -log sigmoid(r_w - r_l): the SFT backbone + a scalar head on the mean
         hidden state of the continuation (--rm_pool=last reads the last real token, as the paper's RM does;
         at this size it stays at chance on held-out pairs, so mean is the default)
  po     --loss=dpo|ipo|bdpo|madpo from SFT, frozen SFT reference (log-probs precomputed once)
  eval   mean reward (95% CI), Monte-Carlo KL to the reference and win rate vs SFT, on held-out prompts
  compare  the method x tier table (and a reward-vs-KL plot with matplotlib)

    python madpo.py                                   # --stage=all: every stage, one seed (~11 min, 2 CPU cores)
    python madpo.py --quick=True --seeds=(0,1,2)      # a few-minute smoke run per seed
    python madpo.py --stage=po --loss=ipo --tier=low  # one stage (paths under --out_dir/seed<seed>/)

Sequences are prompt_len prompt bytes + max_new continuation bytes; '\\n' (10) ends a review and is the
eos, byte 0 is padding (never eos). With network: --dataset=reviews/imdb --scorer=transformer (see
data/reviews/prepare.py). The TrainConfig keys configure the sft stage; rm_* and po_* the other two.
"""
import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import train
from configurator import UserError, cli, require
from data.loader import Corpus, data_dir
from model import GPT

EOS, PAD = 10, 0  # '\n' ends a continuation; padding is byte 0, so it can never be read as an eos
LOSSES, TIERS = ('dpo', 'ipo', 'bdpo', 'madpo'), ('high', 'medium', 'low')


# -----------------------------------------------------------------------------
# the losses: h = (logp_w - ref_w) - (logp_l - ref_l), the implicit reward margin, per pair

def dpo_loss(h, beta):
    """DPO: -log sigmoid(beta * h)."""
    return -F.logsigmoid(beta * h)


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


# -----------------------------------------------------------------------------
# sequences: prompt + continuation, log-probs of the continuation only, sampling with a KV cache

def continuation_targets(seq, prompt_len, cont_len):
    """seq (N, L) -> x (N, L-1) and targets with -1 everywhere but the continuation (eos included)."""
    pos = torch.arange(1, seq.size(1), device=seq.device)  # position in seq of each target
    keep = (pos >= prompt_len) & (pos < prompt_len + cont_len[:, None])
    return seq[:, :-1], torch.where(keep, seq[:, 1:], -1)


def sequence_logps(model, seq, prompt_len, cont_len):
    """Summed log-probs of each continuation given its prompt: (N,). Prompt and padding count 0."""
    x, targets = continuation_targets(seq, prompt_len, cont_len)
    return -model(x, targets).sum(1)


@torch.no_grad()
def batched_logps(model, seq, prompt_len, cont_len, batch=64):
    was_training = model.training
    model.eval()
    out = torch.cat([sequence_logps(model, seq[i:i + batch], prompt_len, cont_len[i:i + batch])
                     for i in range(0, len(seq), batch)])
    model.train(was_training)
    return out


def _cached_hidden(model, idx, start, cache):
    """Hidden states of idx (B, T) at positions start.. given the keys/values of the earlier positions."""
    tr, (B, T) = model.transformer, idx.shape
    x = tr.wte(idx) + tr.wpe(torch.arange(start, start + T, device=idx.device))
    for i, block in enumerate(tr.h):
        attn, C = block.attn, x.size(-1)
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for t in attn.c_attn(block.ln_1(x)).split(C, dim=2))
        if cache[i] is not None:
            k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
        cache[i] = (k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)  # a 1-token step sees all keys
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return tr.ln_f(x)


@torch.no_grad()
def sample(model, prompts, max_new, generator, temperature=1.0):
    """Continuations (N, max_new) of prompts (N, P), cut after the first eos and padded, and their
    lengths (eos included). model.generate would re-run the whole prefix for every new token."""
    was_training = model.training
    model.eval()
    cache, idx, start, out = [None] * model.config.n_layer, prompts, 0, []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    for _ in range(max_new):
        logits = model.lm_head(_cached_hidden(model, idx, start, cache)[:, -1]).float() / temperature
        start += idx.size(1)
        idx = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        out.append(idx)
        done |= idx[:, 0] == EOS
        if done.all():
            break
    model.train(was_training)
    conts = torch.cat(out, 1)
    is_eos = (conts == EOS).int()
    lens = torch.where(is_eos.any(1), is_eos.argmax(1) + 1, conts.size(1))
    conts = torch.where(torch.arange(conts.size(1), device=conts.device) < lens[:, None], conts, PAD)
    return F.pad(conts, (0, max_new - conts.size(1)), value=PAD), lens


# -----------------------------------------------------------------------------
# the ground truth

def get_scorer(name):
    """texts -> rewards in [-3, 3]: 3 * VADER compound, or 3 * (P(pos) - P(neg)) of a transformer classifier."""
    if name == 'vader':
        from data.reviews.prepare import vader
        analyzer = vader()
        return lambda texts: torch.tensor([3 * analyzer.polarity_scores(t)['compound'] for t in texts])
    try:  # the paper's kind of scorer, for users with network (not run in tests)
        from transformers import pipeline
    except ImportError:
        raise UserError('--scorer=transformer needs transformers (and network once): pip install transformers') from None
    classify = pipeline('sentiment-analysis', model='lvwerra/distilbert-imdb', top_k=None, truncation=True)

    def score(texts):
        probs = [{d['label'].upper(): d['score'] for d in out} for out in classify(list(texts), batch_size=32)]
        return torch.tensor([3 * (p.get('POSITIVE', 0.0) - p.get('NEGATIVE', 0.0)) for p in probs])
    return score


def decode(prompt, cont, n):
    """Bytes -> text for the scorer (the eos and padding dropped)."""
    data = bytes(prompt.tolist()) + bytes(cont[:n].tolist())
    return data.rstrip(b'\n').decode('utf-8', errors='replace')


def rewards(scorer, prompts, conts, lens):
    return scorer([decode(p, c, n) for p, c, n in zip(prompts.cpu(), conts.cpu(), lens.tolist())])


def reviews(cfg, split):
    tokens = Corpus(data_dir(cfg.dataset, cfg.tokenizer)).splits[split]
    return [r for r in np.asarray(tokens, dtype=np.uint8).tobytes().split(b'\n') if len(r) > cfg.prompt_len]


def draw(docs, n, seed, scorer, keep, what):
    """n random documents (bytes) whose score keep() accepts."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(20):
        if len(out) >= n:
            break
        cand = [docs[i] for i in rng.integers(len(docs), size=2 * n)]
        out += [d for d, r in zip(cand, scorer([d.decode('utf-8', 'replace') for d in cand]).tolist()) if keep(r)]
    require(len(out) >= n, f'found too few {what} in the corpus')
    return out[:n]


def prompts_from(cfg, split, n, scorer, seed):
    """n review openings (prompt_len bytes) of a split; with VADER, only those it scores 0 (neutral)."""
    heads = [d[:cfg.prompt_len] for d in reviews(cfg, split)]
    heads = draw(heads, n, seed, scorer, lambda r: cfg.scorer != 'vader' or r == 0, 'neutral openings')
    return torch.tensor([list(h) for h in heads], dtype=torch.long)


# -----------------------------------------------------------------------------
# config

@dataclass(frozen=True)
class MadpoConfig(train.TrainConfig):
    out_dir: str = 'out/madpo'       # experiment root: <out_dir>/seed<seed>/{sft,pairs,rm_<tier>,po_<loss>_<tier>}
    seed: int = 0
    dataset: str = 'reviews'         # data/reviews/byte, generated on first use
    model: str = 'tiny'
    block_size: int = 96             # >= prompt_len + max_new
    budget_unit: str = 'iters'       # the sft stage's budget; rm_iters / po_iters for the others
    budget: float = 2000.0
    lr: float = 2e-3
    eval_interval: int = 500
    sample_tokens: int = 0
    compile_loss: bool = False       # eager kernels: tiny model, many short runs (compile is a startup cost)
    stage: str = 'all'               # sft, pairs, rm, po, eval, compare or all
    seeds: tuple = (0,)              # --stage=all runs each seed; a single stage runs --seed
    quick: bool = False              # --stage=all: a few-minute smoke run (smaller budgets and counts)
    losses: tuple = LOSSES           # --stage=all: the po losses to run
    tiers: tuple = TIERS             # --stage=all: the pair tiers to run
    loss: str = 'madpo'              # --stage=po: dpo, ipo, bdpo or madpo
    tier: str = 'high'               # --stage=rm|po: high (on-policy), medium (half off-policy), low (all)
    scorer: str = 'vader'            # ground truth: vader (offline) or transformer (needs network)
    threads: int = 0                 # torch CPU threads; 0 = torch's default (1 is faster on a busy machine)
    prompt_len: int = 24             # prompt bytes (a review's opening)
    max_new: int = 72                # continuation bytes, eos included
    temperature: float = 1.0         # sampling (pairs and eval); 1 keeps the KL estimate honest
    n_pairs: int = 5000              # training pairs per tier (one prompt each)
    val_pairs: int = 300             # held-out pairs per tier (RM accuracy, PO held-out loss)
    n_eval: int = 500                # held-out prompts for eval
    pair_batch: int = 16             # pairs per micro-batch (2x sequences) in rm and po
    rm_iters: int = 400
    rm_pool: str = 'mean'            # the RM head reads: 'last' real token (the paper's) or the continuation's 'mean'
    rm_lr: float = 3e-4
    po_iters: int = 300
    po_lr: float = 1e-4
    beta: float = 0.1
    ipo_average: bool = False        # IPO on per-token-averaged log-ratios (TRL) instead of summed (MADPO's baseline)
    bdpo_alpha: float = 0.6
    bdpo_keep: float = 0.8
    bdpo_momentum: float = 0.9
    c_max: float = 4.0               # MADPO; c_min = 1/c_max
    lam: float = 1.0
    tau: float = math.log(999)

    def __post_init__(self):
        super().__post_init__()
        require(self.stage in ('sft', 'pairs', 'rm', 'po', 'eval', 'compare', 'all'),
                f"--stage must be sft, pairs, rm, po, eval, compare or all, got '{self.stage}'")
        require(self.loss in LOSSES and set(self.losses) <= set(LOSSES), f"--loss(es) must be among {', '.join(LOSSES)}")
        require(self.tier in TIERS and set(self.tiers) <= set(TIERS), f"--tier(s) must be among {', '.join(TIERS)}")
        require(self.rm_pool in ('last', 'mean'), f"--rm_pool must be last or mean, got '{self.rm_pool}'")
        require(self.scorer in ('vader', 'transformer'), f"--scorer must be vader or transformer, got '{self.scorer}'")
        require(self.tokenizer == 'byte', '--tokenizer must be byte (the eos is the byte "\\n")')
        require(self.prompt_len + self.max_new <= self.model_dims()['block_size'],
                f'--prompt_len + --max_new ({self.prompt_len + self.max_new}) must be <= --block_size')
        require(self.dropout == 0, '--dropout must be 0: policy, reference and reward model run without it')
        require(self.c_max > 1, f'--c_max must be > 1 (c_min = 1/c_max), got {self.c_max}')
        require(0 < self.bdpo_keep <= 1, f'--bdpo_keep must be in (0, 1], got {self.bdpo_keep}')
        require(0 <= self.bdpo_momentum < 1, f'--bdpo_momentum must be in [0, 1), got {self.bdpo_momentum}')
        for key in ('n_pairs', 'val_pairs', 'n_eval', 'pair_batch', 'rm_iters', 'po_iters', 'prompt_len', 'max_new',
                    'beta', 'rm_lr', 'po_lr', 'temperature', 'lam'):
            require(getattr(self, key) > 0, f'--{key} must be positive, got {getattr(self, key)}')


def quick(cfg):
    """The smoke-run sizes of --quick=True."""
    return dataclasses.replace(cfg, budget=min(cfg.budget, 1500), n_pairs=min(cfg.n_pairs, 1500), val_pairs=min(cfg.val_pairs, 100),
                               rm_iters=min(cfg.rm_iters, 150), po_iters=min(cfg.po_iters, 150), n_eval=min(cfg.n_eval, 200))


class Paths:
    def __init__(self, cfg):
        self.root = Path(cfg.out_dir) / f'seed{cfg.seed}'
        self.sft, self.pairs = self.root / 'sft', self.root / 'pairs'

    def rm(self, tier):
        return self.root / f'rm_{tier}'

    def po(self, loss, tier):
        return self.root / f'po_{loss}_{tier}'


def load_model(ckpt_path, device, compile_loss=False):
    ckpt = train.load_checkpoint(Path(ckpt_path))
    model = GPT.from_checkpoint(ckpt).to(device)
    model.compile_loss = compile_loss
    return model.eval(), ckpt


def file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# the rm and po objectives: pair batches from a saved pairs file instead of the token stream

class PairObjective(train.CausalLM):
    """Ignores the loop's `data`: draws cfg.pair_batch pairs per micro-batch in a seeded order per epoch."""

    def __init__(self, cfg, pairs_path):
        super().__init__(cfg.pair_batch)
        self.cfg, self.pairs_path, self.epoch, self.pos = cfg, Path(pairs_path), 0, 0

    def setup(self, trainer):
        self.device, self.out_dir = trainer.rt.device, trainer.out_dir
        p = torch.load(self.pairs_path, weights_only=True)
        # (n, 2, L) prompt + [chosen, rejected], their continuation lengths (n, 2) and true rewards (n, 2)
        seq = torch.stack([torch.cat([p['prompt'], p[k]], 1) for k in ('chosen', 'rejected')], 1).long()
        lens = torch.stack([p['chosen_len'], p['rejected_len']], 1)
        r = torch.stack([p['r_chosen'], p['r_rejected']], 1)
        n = len(seq) - int(p['n_val'])
        self.train_set = (seq[:n].to(self.device), lens[:n].to(self.device), r[:n])
        self.val_set = (seq[n:].to(self.device), lens[n:].to(self.device), r[n:])

    def next_indices(self):
        n = len(self.train_set[0])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        idx = order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        if self.pos >= n:
            self.epoch, self.pos = self.epoch + 1, 0
        return idx.to(self.device)

    def flat(self, seq, lens):
        """(B, 2, L), (B, 2) -> chosen then rejected: (2B, L), (2B,)."""
        return torch.cat([seq[:, 0], seq[:, 1]]), torch.cat([lens[:, 0], lens[:, 1]])

    def state_dict(self):
        return {'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state['epoch'], state['pos']


class RewardObjective(PairObjective):
    """Bradley-Terry reward model: the GPT backbone + a scalar head on the continuation's mean hidden state
    or on its last real token (--rm_pool). It calls model.hidden, not forward: one process, no DDP."""

    def setup(self, trainer):
        super().setup(trainer)
        self.head = torch.nn.Linear(trainer.model.config.n_embd, 1).to(self.device)
        trainer.optimizer.add_param_group({'params': self.head.parameters(), 'weight_decay': 0.0})

    def rewards(self, model, seq, lens):
        """r (N,): the head on the last real token (the eos, or the last byte), or on the continuation's mean."""
        h = getattr(model, 'module', model).hidden(seq)                      # (N, L, C)
        if self.cfg.rm_pool == 'last':
            features = h[torch.arange(len(seq), device=seq.device), self.cfg.prompt_len + lens - 1]
        else:
            pos = torch.arange(seq.size(1), device=seq.device)
            in_cont = (pos >= self.cfg.prompt_len) & (pos < self.cfg.prompt_len + lens[:, None])  # (N, L)
            features = (h * in_cont[..., None]).sum(1) / lens[:, None]
        return self.head(features).squeeze(-1).float()

    def __call__(self, model, data, budget):
        idx = self.next_indices()
        seq, lens = self.flat(self.train_set[0][idx], self.train_set[1][idx])
        r_w, r_l = self.rewards(model, seq, lens).chunk(2)
        return train.Step(-F.logsigmoid(r_w - r_l).mean(), len(seq), {'rm_acc': (r_w > r_l).float().mean().detach()})

    def load_frozen(self, ckpt_path, device):
        """The trained reward model (backbone + head) from its checkpoint, for MADPO's margins."""
        self.model, ckpt = load_model(ckpt_path, device)
        self.cfg = dataclasses.replace(self.cfg, rm_pool=ckpt['config']['rm_pool'])  # as it was trained
        self.head = torch.nn.Linear(self.model.config.n_embd, 1).to(device).eval()
        self.head.load_state_dict(ckpt['objective']['head'])

    @torch.no_grad()
    def margins(self, model, seq, lens, batch=64):
        """r(chosen) - r(rejected) for pairs (n, 2, L)."""
        out = []
        for i in range(0, len(seq), batch):
            r_w, r_l = self.rewards(model, *self.flat(seq[i:i + batch], lens[i:i + batch])).chunk(2)
            out.append(r_w - r_l)
        return torch.cat(out)

    def evaluate(self, model):
        """Held-out BT loss; also the accuracy vs the labels and vs the true reward order (ties left out)."""
        model.eval()
        m = self.margins(model, *self.val_set[:2]).cpu()
        model.train()
        r = self.val_set[2]
        strict = r[:, 0] != r[:, 1]
        self.val_metrics = {'acc': (m > 0).float().mean().item(),
                            'true_acc': ((m > 0) == (r[:, 0] > r[:, 1]))[strict].float().mean().item()}
        return -F.logsigmoid(m).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'head': self.head.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.head.load_state_dict(state['head'])


class PreferenceObjective(PairObjective):
    """DPO, IPO, beta-DPO or MADPO on the policy; reference log-probs (and MADPO's RM margins) precomputed."""

    def __init__(self, cfg, pairs_path, ref_ckpt, rm_dir=None):
        super().__init__(cfg, pairs_path)
        self.ref_ckpt, self.rm_dir = Path(ref_ckpt), rm_dir
        self.bdpo = BetaDPO(cfg.beta, cfg.bdpo_alpha, cfg.bdpo_keep, cfg.bdpo_momentum)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # beta-DPO's draws; its own, so a resume is exact

    def setup(self, trainer):
        super().setup(trainer)
        sizes = [len(self.train_set[0]), len(self.val_set[0])]
        self.ref_train, self.ref_val = self.reference_logps().to(self.device).split(sizes)
        if self.cfg.loss == 'madpo':
            rm = RewardObjective(self.cfg, self.pairs_path)
            rm.load_frozen(self.rm_dir / 'ckpt.pt', self.device)
            self.weights = madpo_weight(rm.margins(rm.model, *self.train_set[:2]), self.cfg.c_max, self.cfg.lam, self.cfg.tau)
            q = torch.quantile(self.weights.cpu(), torch.tensor([0, 0.1, 0.5, 0.9, 1.0])).tolist()
            summary = {'quantiles_0_10_50_90_100': q, 'mean': self.weights.mean().item(),
                       'frac_amplified': (self.weights > 1).float().mean().item(),
                       'histogram_0_to_2_by_0.2': torch.histc(self.weights.cpu(), 10, 0, 2).int().tolist()}
            (self.out_dir / 'madpo_weights.json').write_text(json.dumps(summary, indent=1))
            print(f'MADPO weights: quantiles {", ".join(f"{v:.3f}" for v in q)}, mean {summary["mean"]:.3f}')

    def reference_logps(self):
        """Summed reference log-probs of [chosen, rejected] for every pair (n, 2): computed once per
        (pairs, reference) and cached next to the pairs file."""
        cache = self.pairs_path.with_name(self.pairs_path.stem + '_ref_logps.pt')
        key = file_hash(self.ref_ckpt) + file_hash(self.pairs_path)
        if cache.exists():
            saved = torch.load(cache, weights_only=True)
            if saved['key'] == key:
                return saved['logps']
        ref, _ = load_model(self.ref_ckpt, self.device, self.cfg.compile_loss)
        seq = torch.cat([self.train_set[0], self.val_set[0]])
        lens = torch.cat([self.train_set[1], self.val_set[1]])
        logps = torch.stack([batched_logps(ref, seq[:, k], self.cfg.prompt_len, lens[:, k]) for k in (0, 1)], 1).cpu()
        train.save_checkpoint(cache, {'key': key, 'logps': logps})  # atomic: parallel runs may share it
        return logps

    def margins_h(self, model, seq, lens, ref, average=False):
        flat_seq, flat_lens = self.flat(seq, lens)
        lp = sequence_logps(model, flat_seq, self.cfg.prompt_len, flat_lens)                 # (2B,)
        return implicit_margin(torch.stack(lp.chunk(2), 1), ref, lens if average else None)

    def __call__(self, model, data, budget):
        cfg, idx = self.cfg, self.next_indices()
        seq, lens, ref = self.train_set[0][idx], self.train_set[1][idx], self.ref_train[idx]
        h = self.margins_h(model, seq, lens, ref, average=cfg.loss == 'ipo' and cfg.ipo_average)
        logs = {'margin': h.mean().detach(), 'pref_acc': (h > 0).float().mean().detach()}
        if cfg.loss == 'dpo':
            loss = dpo_loss(h, cfg.beta).mean()
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
    def evaluate(self, model):
        """Held-out DPO loss at beta (the same yardstick for every loss), and the preference accuracy."""
        model.eval()
        seq, lens = self.val_set[:2]
        h = torch.cat([self.margins_h(model, seq[i:i + 64], lens[i:i + 64], self.ref_val[i:i + 64])
                       for i in range(0, len(seq), 64)])
        model.train()
        self.val_metrics = {'pref_acc': (h > 0).float().mean().item(), 'margin': h.mean().item()}
        return dpo_loss(h, self.cfg.beta).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'bdpo': self.bdpo.state_dict(), 'rng': self.rng.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bdpo.load_state_dict(state['bdpo'])
        self.rng.set_state(state['rng'])


# -----------------------------------------------------------------------------
# the stages; each writes done.json (its results and wall time) in its folder

def sample_many(model, prompts, cfg, generator, batch=256):
    parts = [sample(model, prompts[i:i + batch], cfg.max_new, generator, cfg.temperature) for i in range(0, len(prompts), batch)]
    return torch.cat([c for c, _ in parts]), torch.cat([n for _, n in parts])


def negative_continuations(cfg, n, scorer, seed):
    """Off-policy losers: the bytes after the prompt of corpus reviews that the scorer rates negative."""
    neg = draw(reviews(cfg, 'train'), n, seed, scorer, lambda r: r < 0, 'negative reviews')
    conts = torch.full((n, cfg.max_new), PAD, dtype=torch.long)
    lens = torch.zeros(n, dtype=torch.long)
    for i, d in enumerate(neg):
        c = list((d[cfg.prompt_len:] + b'\n')[:cfg.max_new])
        conts[i, :len(c)], lens[i] = torch.tensor(c), len(c)
    return conts, lens


def rows_where(mask, x, y):
    """torch.where on whole rows: mask (n,), x and y (n, ...)."""
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, y)


def stage_pairs(cfg, paths, device):
    """Two SFT samples per prompt, true rewards, Bradley-Terry labels; the three tiers; saved to disk."""
    sft, _ = load_model(paths.sft / 'ckpt.pt', device)
    scorer, n = get_scorer(cfg.scorer), cfg.n_pairs + cfg.val_pairs
    prompts = prompts_from(cfg, 'train', n, scorer, seed=cfg.seed)
    g = torch.Generator(device).manual_seed(cfg.seed)
    sides = []  # (continuations, lengths, rewards): sample a, sample b, a negative corpus review
    for conts, lens in (sample_many(sft, prompts.to(device), cfg, g), sample_many(sft, prompts.to(device), cfg, g),
                        negative_continuations(cfg, n, scorer, seed=cfg.seed + 1)):
        sides.append((conts.cpu(), lens.cpu(), rewards(scorer, prompts, conts, lens).float()))
    a, b, neg = sides
    best = [rows_where(a[2] >= b[2], x, y) for x, y in zip(a, b)]
    cpu = torch.Generator().manual_seed(cfg.seed + 2)
    order, results = torch.randperm(n, generator=cpu), {'sft_reward': torch.cat([a[2], b[2]]).mean().item()}
    paths.pairs.mkdir(parents=True, exist_ok=True)
    for tier, frac in (('high', 0.0), ('medium', 0.5), ('low', 1.0)):
        replaced = torch.zeros(n, dtype=torch.bool)
        replaced[order[:int(frac * n)]] = True  # (better SFT sample, negative review) instead of (a, b)
        first = [rows_where(replaced, x, y) for x, y in zip(best, a)]
        second = [rows_where(replaced, x, y) for x, y in zip(neg, b)]
        first_wins = torch.rand(n, generator=cpu) < torch.sigmoid(first[2] - second[2])  # P(a beats b), drawn
        chosen = [rows_where(first_wins, x, y) for x, y in zip(first, second)]
        rejected = [rows_where(first_wins, y, x) for x, y in zip(first, second)]
        pairs = {'prompt': prompts.to(torch.uint8), 'chosen': chosen[0].to(torch.uint8), 'rejected': rejected[0].to(torch.uint8),
                 'chosen_len': chosen[1], 'rejected_len': rejected[1], 'r_chosen': chosen[2], 'r_rejected': rejected[2],
                 'replaced': replaced, 'n_val': cfg.val_pairs}
        torch.save(pairs, paths.pairs / f'{tier}.pt')
        with open(paths.pairs / f'{tier}_examples.jsonl', 'w') as f:
            for i in range(20):
                f.write(json.dumps({'chosen': decode(prompts[i], chosen[0][i], chosen[1][i]),
                                    'rejected': decode(prompts[i], rejected[0][i], rejected[1][i]),
                                    'r': [chosen[2][i].item(), rejected[2][i].item()]}) + '\n')
        strict = chosen[2] != rejected[2]
        results[tier] = {'label_agrees_with_truth': (chosen[2] > rejected[2])[strict].float().mean().item(),
                         'ties': 1 - strict.float().mean().item(), 'r_chosen': chosen[2].mean().item(),
                         'r_rejected': rejected[2].mean().item()}
    return results


def stage_config(cfg, out_dir, iters, lr):
    """An rm/po run of the shared loop: its own folder, SFT weights to start from (or its own to resume)."""
    init = cfg.init_from if cfg.init_from == 'resume' else str(Paths(cfg).sft / 'ckpt.pt')
    return dataclasses.replace(cfg, out_dir=str(out_dir), init_from=init, budget_unit='iters', budget=iters, lr=lr)


def stage_sft(cfg, paths, device):
    result = train.train(dataclasses.replace(cfg, out_dir=str(paths.sft)))
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted']}


def stage_rm(cfg, paths, device):
    objective = RewardObjective(cfg, paths.pairs / f'{cfg.tier}.pt')
    result = train.train(stage_config(cfg, paths.rm(cfg.tier), cfg.rm_iters, cfg.rm_lr), objective)
    torch.save(objective.head.state_dict(), paths.rm(cfg.tier) / 'head.pt')  # also in ckpt.pt['objective']
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted'], **objective.val_metrics}


def stage_po(cfg, paths, device):
    objective = PreferenceObjective(cfg, paths.pairs / f'{cfg.tier}.pt', paths.sft / 'ckpt.pt', paths.rm(cfg.tier))
    result = train.train(stage_config(cfg, paths.po(cfg.loss, cfg.tier), cfg.po_iters, cfg.po_lr), objective)
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted'], **objective.val_metrics}


def summarize(r, kl, r_sft):
    ci = lambda v: 1.96 * v.std().item() / math.sqrt(len(v))  # noqa: E731
    return {'reward': r.mean().item(), 'reward_ci': ci(r), 'kl': kl.mean().item(), 'kl_ci': ci(kl),
            'win_rate': ((r > r_sft).float() + 0.5 * (r == r_sft).float()).mean().item()}


def stage_eval(cfg, paths, device):
    """One sample per held-out prompt from each policy (the same random draws for all): reward, KL, win rate."""
    scorer = get_scorer(cfg.scorer)
    prompts = prompts_from(cfg, 'val', cfg.n_eval, scorer, seed=cfg.seed + 100).to(device)
    ref, _ = load_model(paths.sft / 'ckpt.pt', device)

    def run(policy):
        conts, lens = sample_many(policy, prompts, cfg, torch.Generator(device).manual_seed(cfg.seed + 3))
        seq = torch.cat([prompts, conts], 1)
        kl = batched_logps(policy, seq, cfg.prompt_len, lens) - batched_logps(ref, seq, cfg.prompt_len, lens)
        return rewards(scorer, prompts, conts, lens), kl.cpu(), [decode(prompts[i].cpu(), conts[i].cpu(), lens[i]) for i in range(3)]

    r_sft, kl, examples = run(ref)
    results = {'sft': {**summarize(r_sft, kl, r_sft), 'examples': examples}}
    for run_dir in sorted(paths.root.glob('po_*')):
        if (run_dir / 'done.json').exists():
            r, kl, examples = run(load_model(run_dir / 'ckpt.pt', device)[0])
            name = run_dir.name.removeprefix('po_')
            results[name] = {**summarize(r, kl, r_sft), 'examples': examples}
            print(f"{name}: reward {results[name]['reward']:.3f}, KL {results[name]['kl']:.2f}, sft {results['sft']['reward']:.3f}")
    return results


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t quantiles by df


def table_cell(runs):
    """Mean over seeds; the 95% CI is over seeds (t), or over prompts when there is one seed."""
    mean = {k: float(np.mean([x[k] for x in runs])) for k in ('reward', 'kl', 'win_rate')}
    r = [x['reward'] for x in runs]
    ci = runs[0]['reward_ci'] if len(r) == 1 else T95.get(len(r) - 1, 1.96) * float(np.std(r, ddof=1)) / math.sqrt(len(r))
    return f"{mean['reward']:.2f} ± {ci:.2f} (KL {mean['kl']:.1f}, win {mean['win_rate']:.2f})", (mean['kl'], mean['reward'])


def stage_compare(cfg):
    """The method x tier table of mean reward, KL and win rate; the RM's held-out accuracy per tier; the
    wall time per stage. Printed, and written to compare.md (and compare.png with matplotlib)."""
    root = Path(cfg.out_dir)
    evals = [json.loads(p.read_text()) for p in sorted(root.glob('seed*/eval/done.json'))]
    require(evals, f'no finished eval under {root}/seed*/eval: run the eval stage first')
    header = ['| | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
    lines, points = [f'{len(evals)} seed(s); cells: mean reward ± 95% CI (KL to SFT, win rate vs SFT)', '', *header], {}
    for method in ('sft',) + LOSSES:
        cells = []
        for tier in TIERS:
            runs = [e[key] for e in evals if (key := method if method == 'sft' else f'{method}_{tier}') in e]
            text, points[(method, tier)] = table_cell(runs) if runs else ('-', None)
            cells.append(text)
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    lines += ['', *header]
    for key in ('acc', 'true_acc'):
        accs = [[json.loads(p.read_text())[key] for p in root.glob(f'seed*/rm_{t}/done.json')] for t in TIERS]
        lines.append(f'| RM held-out {key} | ' + ' | '.join(f'{np.mean(a):.3f}' if a else '-' for a in accs) + ' |')
    walls = {}
    for p in root.glob('seed*/*/done.json'):
        walls.setdefault(p.parent.name.split('_')[0], []).append(json.loads(p.read_text())['wall_s'])
    lines += ['', 'wall time per stage run (s, mean): '
              + ', '.join(f'{k} {np.mean(v):.0f} (x{len(v)})' for k, v in sorted(walls.items()))]
    text = '\n'.join(lines)
    print(text)
    (root / 'compare.md').write_text(text + '\n')
    plot({k: v for k, v in points.items() if v}, root / 'compare.png')
    return text


def plot(points, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib)')
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, tier), (kl, r) in points.items():
        ax.scatter(kl, r, marker={'high': 'o', 'medium': 's', 'low': '^'}[tier], color=f'C{(("sft",) + LOSSES).index(method)}',
                   label=f'{method} {tier}' if method != 'sft' or tier == 'high' else None)
    ax.set(xlabel='KL to SFT (nats per sequence)', ylabel='mean ground-truth reward', title='reward vs KL')
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f'wrote {path}')


STAGES = {'sft': (stage_sft, lambda p, c: p.sft), 'pairs': (stage_pairs, lambda p, c: p.pairs),
          'rm': (stage_rm, lambda p, c: p.rm(c.tier)), 'po': (stage_po, lambda p, c: p.po(c.loss, c.tier)),
          'eval': (stage_eval, lambda p, c: p.root / 'eval')}


def run_stage(cfg, name, skip_done=False):
    """Run one stage; write its done.json (results + wall time). In --stage=all a finished stage is
    skipped and an interrupted one resumed (unless --overwrite=True)."""
    fn, folder = STAGES[name]
    paths = Paths(cfg)
    out = folder(paths, cfg)
    if skip_done and not cfg.overwrite:
        if (out / 'done.json').exists():
            print(f'{out}: done, skipped')
            return json.loads((out / 'done.json').read_text())
        if (out / 'ckpt.pt').exists():
            cfg = dataclasses.replace(cfg, init_from='resume')
    print(f'=== {name} -> {out}')
    t0 = time.time()
    result = fn(cfg, paths, train.setup_device(cfg).device)
    if result.get('interrupted'):
        raise UserError(f'{name} was interrupted: rerun with --init_from=resume (--stage=all resumes by itself)')
    result['wall_s'] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / 'done.json').write_text(json.dumps(result, indent=1))
    return result


def run_all(cfg):
    for seed in cfg.seeds:
        c = dataclasses.replace(quick(cfg) if cfg.quick else cfg, seed=seed)
        run_stage(c, 'sft', skip_done=True)
        run_stage(c, 'pairs', skip_done=True)
        for tier in c.tiers:
            run_stage(dataclasses.replace(c, tier=tier), 'rm', skip_done=True)
            for loss in c.losses:
                run_stage(dataclasses.replace(c, tier=tier, loss=loss), 'po', skip_done=True)
        run_stage(c, 'eval')  # always: it scores every policy that is there now
    return stage_compare(cfg)


def main(cfg):
    signal.signal(signal.SIGTERM, train._interrupt)  # a scheduler's stop saves a checkpoint, like Ctrl-C
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.dataset == 'reviews/imdb' and not (data_dir(cfg.dataset, 'byte') / 'meta.json').exists():
        raise UserError('no prepared IMDb reviews: run `python data/reviews/prepare.py --source=imdb` (needs network)')
    if cfg.dataset == 'reviews' and not (data_dir('reviews', 'byte') / 'meta.json').exists():
        from data.reviews.prepare import PrepareConfig, prepare
        print('preparing the generated review corpus in data/reviews/byte (once)')
        prepare(PrepareConfig())
    if cfg.stage == 'all':
        return run_all(cfg)
    if cfg.stage == 'compare':
        return stage_compare(cfg)
    return run_stage(quick(cfg) if cfg.quick else cfg, cfg.stage)


if __name__ == '__main__':
    cli(main, MadpoConfig)
