"""MADPO's margin model: a Bradley-Terry reward model on madpo.py's sentiment task, and the pair batches
that its objective and madpo.py's preference objective draw.

MADPO (arXiv 2510.05342 v1) weights each pair by w(m), m = r(chosen) - r(rejected) from a reward model
trained on the same labelled pairs with the Bradley-Terry loss -log sigmoid(r_w - r_l). Here that model is
the SFT backbone plus a head that scores every position of the continuation, pooled into one reward. Held
out, it reports its accuracy against the labels beside their ceiling (pairs.bt_ceiling) and its expected
accuracy (pairs.expected_accuracy, free of the label draws' noise).

A file of its own: it is a training objective (it imports the loop, which data/ must not), and madpo.py
stays one page of losses and stages. What the defaults rest on: the frozen backbone's features, not the
data, limit a head-only model (--rm_freeze), so the whole model is tuned; that needs the head's output
layer to start at zero and a low lr (from a random head, or at a high lr, it never leaves chance).

    python madpo.py --stage=rm --tier=high        # trains it (after --stage=sft and --stage=pairs)
"""
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

import runs
import train
from configurator import UserError
from data.loader import EPOCH_SEEDS
from data.reviews.pairs import bt_ceiling, expected_accuracy, load_pairs, oracle_accuracy
from model import evaluating


def make_head(n_embd, width):
    """A scalar score per position: linear (width 0) or an MLP with one hidden layer of this width. The
    output layer starts at zero: a random one, summed over ~70 positions, starts with margins of several
    nats (BT loss ~1.8) whose gradients wreck a backbone being tuned."""
    if width == 0:
        head = out = torch.nn.Linear(n_embd, 1)
    else:
        out = torch.nn.Linear(width, 1)
        head = torch.nn.Sequential(torch.nn.Linear(n_embd, width), torch.nn.GELU(), out)
    torch.nn.init.zeros_(out.weight)
    torch.nn.init.zeros_(out.bias)
    return head




class PairObjective(train.CausalLM):
    """Ignores the loop's `data`: draws cfg.pair_batch pairs per micro-batch in a seeded order per epoch."""

    def __init__(self, cfg, pairs_path):
        super().__init__(cfg.pair_batch)
        self.cfg, self.pairs_path, self.epoch, self.pos = cfg, Path(pairs_path), 0, 0

    def setup(self, ctx):
        self.device = ctx.device
        self.train_set, self.val_set = load_pairs(self.pairs_path, self.device)  # (seq (n, 2, L), lens (n, 2), r (n, 2))

    def next_indices(self):
        n = len(self.train_set[0])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * EPOCH_SEEDS + self.epoch))
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
    """Bradley-Terry reward model: the SFT backbone, frozen (--rm_freeze) or tuned, and a head that scores
    each position's hidden state (linear, or an MLP of width --rm_head), pooled over the continuation
    (--rm_pool: the sum, i.e. per-token scores added up like a lexicon's valences, the mean, or the last
    real token). It reads model.hidden, which the loop's model (one process, not compiled: main refuses
    torchrun) exposes. Early stopping: the first half of the held-out pairs picks the eval step with the
    best accuracy; the second half reports that step's accuracy, beside the ceiling of the same pairs."""

    def __init__(self, cfg, pairs_path):
        super().__init__(cfg, pairs_path)
        self.pool, self.width, self.frozen, self.best = cfg.rm_pool, cfg.rm_head, cfg.rm_freeze, {'select_acc': -1.0}

    def setup(self, ctx):
        super().setup(ctx)
        self.head = make_head(ctx.model.config.n_embd, self.width).to(self.device)
        self.model_args = dataclasses.asdict(ctx.model.config)
        if self.frozen:  # the head alone trains
            ctx.freeze_model()
        ctx.add_params(self.head.parameters(), weight_decay=0.0)

    def rewards(self, model, seq, lens):
        """r (N,): the head's per-position scores, summed or averaged over the continuation, or read at its
        last real token (the eos, or the last byte)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            h = model.hidden(seq)                                            # (N, L, C)
        scores = self.head(h).squeeze(-1).float()                            # (N, L)
        if self.pool == 'last':
            return scores[torch.arange(len(seq), device=seq.device), self.cfg.prompt_len + lens - 1]
        pos = torch.arange(seq.size(1), device=seq.device)
        in_cont = (pos >= self.cfg.prompt_len) & (pos < self.cfg.prompt_len + lens[:, None])  # (N, L)
        total = (scores * in_cont).sum(1)
        return total / lens if self.pool == 'mean' else total

    def __call__(self, model, data, ctx):
        idx = self.next_indices()
        seq, lens = self.flat(self.train_set[0][idx], self.train_set[1][idx])
        r_w, r_l = self.rewards(model, seq, lens).chunk(2)
        return train.Step(-F.logsigmoid(r_w - r_l).mean(), len(seq), {'rm_acc': (r_w > r_l).float().mean().detach()})

    def save(self, path):
        """The best eval step's backbone and head (what MADPO's margins read), a checkpoint load_model reads."""
        runs.save_checkpoint(path, {'model': self.best['model'], 'model_args': self.model_args, 'head': self.best['head'],
                                     'rm_pool': self.pool, 'rm_head': self.width})

    def load_frozen(self, rm_dir, device):
        """The trained reward model for MADPO's margins (rm.pt, with the pooling it was trained with)."""
        path = Path(rm_dir) / 'rm.pt'
        if not path.exists():
            raise UserError(f'no finished reward model in {rm_dir}: run --stage=rm for this tier first')
        self.model = runs.load_model(path, device, self.cfg.compile_loss)
        saved = runs.load_checkpoint(path)
        with runs.refused_if_damaged(path, 'holds no reward head', 'rerun --stage=rm for this tier with --overwrite=True'):
            self.pool, self.width = saved['rm_pool'], saved['rm_head']
            self.head = make_head(self.model.config.n_embd, self.width).to(device).eval()
            self.head.load_state_dict(saved['head'])

    @torch.no_grad()
    def margins(self, model, seq, lens, batch=64):
        """r(chosen) - r(rejected) for pairs (n, 2, L)."""
        out = []
        for i in range(0, len(seq), batch):
            r_w, r_l = self.rewards(model, *self.flat(seq[i:i + batch], lens[i:i + batch])).chunk(2)
            out.append(r_w - r_l)
        return torch.cat(out)

    def evaluate(self, model, ctx):
        """Held-out BT loss; keeps the best step by the selection half's accuracy (val_metrics: its
        accuracy vs the labels and vs the true reward order, ties left out, on the report half)."""
        with evaluating(model):
            m = self.margins(model, *self.val_set[:2]).cpu()
        half = len(m) // 2
        select_acc = (m[:half] > 0).float().mean().item()
        if select_acc > self.best['select_acc']:
            m_rep, r = m[half:], self.val_set[2][half:]
            strict = r[:, 0] != r[:, 1]
            self.best = {'select_acc': select_acc, 'step': ctx.step, 'acc': (m_rep > 0).float().mean().item(),
                         'true_acc': ((m_rep > 0) == (r[:, 0] > r[:, 1]))[strict].float().mean().item(),
                         'expected_acc': expected_accuracy(m_rep, r),
                         'ceiling': bt_ceiling(r), 'oracle_acc': oracle_accuracy(r),
                         'model': {k: v.detach().clone() for k, v in model.state_dict().items()},
                         'head': {k: v.detach().clone() for k, v in self.head.state_dict().items()}}
        self.val_metrics = {k: v for k, v in self.best.items() if k not in ('model', 'head')}
        ctx.rt.print(f"step {ctx.step}: held-out accuracy {select_acc:.3f} (selection half); best step "
                     f"{self.best['step']}: {self.best['acc']:.3f} on the report half, ceiling {self.best['ceiling']:.3f}")
        return -F.logsigmoid(m).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'head': self.head.state_dict(), 'best': self.best}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.head.load_state_dict(state['head'])
        self.best = state['best']


if __name__ == '__main__':  # a module of madpo.py, not a command: say which command trains it
    raise SystemExit('reward_model.py has no command of its own: the reward model is trained by '
                     '`python madpo.py --stage=rm` (see docs/methods/madpo.md)')
