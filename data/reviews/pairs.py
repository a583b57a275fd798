"""The preference pairs of madpo.py's sentiment task, built from an SFT model and the review corpus.

A pair is a review opening (the prompt) and two continuations, labelled by a Bradley-Terry draw on the
ground-truth reward r = 3 * VADER compound(prompt + continuation) in [-3, 3] (or a transformer
classifier's 3 * (P(pos) - P(neg)), with network). As the MADPO paper, three tiers of label quality:
high (two SFT samples), medium (half the pairs replaced by an easy off-policy pair: the better SFT sample
against a negative corpus review), low (all replaced). Used by `python madpo.py --stage=pairs`.

Bytes: '\\n' (10) ends a review and is the eos; byte 0 is padding (never an eos).
"""
import json
from pathlib import Path

import numpy as np
import torch

from configurator import UserError, require
from data.loader import Corpus, atomic_write, data_dir
from model import evaluating

EOS, PAD = 10, 0
TIERS = {'high': 0.0, 'medium': 0.5, 'low': 1.0}  # tier -> fraction of pairs replaced by an easy off-policy pair


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


def bt_ceiling(r):
    """The best expected accuracy any reward model can reach against Bradley-Terry labels drawn from the
    true rewards r (n, 2) = [chosen, rejected]: the label is the higher-reward side with probability
    sigmoid(|r_w - r_l|), so predicting that side is optimal (a tie is a coin flip: 0.5)."""
    return torch.sigmoid((r[:, 0] - r[:, 1]).abs()).mean().item()


def expected_accuracy(m, r):
    """The accuracy that a reward model's margins m (n,) (toward the first side) reach on average over
    fresh Bradley-Terry label draws from r (n, 2): sigmoid(sign(m) (r_0 - r_1)) per pair, so m = r_0 - r_1
    reaches bt_ceiling(r). Free of the drawn labels' noise (SE ~0.02 on 500 pairs), unlike the accuracy."""
    return torch.sigmoid(torch.sign(m) * (r[:, 0] - r[:, 1])).mean().item()


def oracle_accuracy(r):
    """The accuracy that predicting the true order reaches on these drawn labels (ties count half)."""
    return ((r[:, 0] > r[:, 1]).float() + 0.5 * (r[:, 0] == r[:, 1]).float()).mean().item()


# -----------------------------------------------------------------------------
# prompts and continuations

def reviews(cfg, split):
    tokens = Corpus(data_dir(cfg.dataset, 'byte')).splits[split]
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


def sample(model, prompts, max_new, generator, temperature=1.0):
    """Continuations (N, max_new) of prompts (N, P) from model.generate (KV cache; a row stops at its eos,
    later bytes are PAD) and their lengths (N,), eos included."""
    P = prompts.size(1)
    out = model.generate(prompts, max_new, temperature=temperature, generator=generator,
                         stop=lambda new: new[:, -1] == EOS, pad_id=PAD)          # (N, P + n), n <= max_new
    conts = torch.nn.functional.pad(out[:, P:], (0, P + max_new - out.size(1)), value=PAD)
    is_eos = conts == EOS
    return conts, torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new)


def sample_many(model, prompts, cfg, generator, batch=256, report=lambda done: None):
    """sample() in batches; report(prompts done) after each."""
    parts = []
    for i in range(0, len(prompts), batch):
        parts.append(sample(model, prompts[i:i + batch], cfg.max_new, generator, cfg.temperature))
        report(i + len(parts[-1][1]))
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


# -----------------------------------------------------------------------------
# sequences: prompt + continuation, log-probs of the continuation only

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
    with evaluating(model):
        return torch.cat([sequence_logps(model, seq[i:i + batch], prompt_len, cont_len[i:i + batch])
                          for i in range(0, len(seq), batch)])


# -----------------------------------------------------------------------------
# the pairs

def rows_where(mask, x, y):
    """torch.where on whole rows: mask (n,), x and y (n, ...)."""
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, y)


def build_pairs(cfg, sft, device, out_dir, progress=None):
    """Two SFT samples per prompt, true rewards, Bradley-Terry labels; the three tiers, saved to
    out_dir/<tier>.pt (and 20 readable examples each). Returns the label quality per tier.
    progress(what, total, unit) -> report(done): how the sampling says how far it got (None: silent)."""
    scorer, n = get_scorer(cfg.scorer), cfg.n_pairs + cfg.val_pairs
    prompts = prompts_from(cfg, 'train', n, scorer, seed=cfg.seed)
    g = torch.Generator(device).manual_seed(cfg.seed)
    sides = []  # (continuations, lengths, rewards): sample a, sample b, a negative corpus review
    for side in ('a', 'b'):
        report = progress(f'pairs: SFT sample {side} of 2', n, 'prompts') if progress else lambda done: None
        sides.append(sample_many(sft, prompts.to(device), cfg, g, report=report))
    sides.append(negative_continuations(cfg, n, scorer, seed=cfg.seed + 1))
    sides = [(conts.cpu(), lens.cpu(), rewards(scorer, prompts, conts, lens).float()) for conts, lens in sides]
    a, b, neg = sides
    best = [rows_where(a[2] >= b[2], x, y) for x, y in zip(a, b)]
    cpu = torch.Generator().manual_seed(cfg.seed + 2)
    order, results = torch.randperm(n, generator=cpu), {'sft_reward': torch.cat([a[2], b[2]]).mean().item()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for tier, frac in TIERS.items():
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
        atomic_write(out_dir / f'{tier}.pt', lambda f: torch.save(pairs, f))  # never half-written
        with open(out_dir / f'{tier}_examples.jsonl', 'w') as f:
            for i in range(min(20, n)):  # 20 readable examples, or every pair of a smaller set
                f.write(json.dumps({'chosen': decode(prompts[i], chosen[0][i], chosen[1][i]),
                                    'rejected': decode(prompts[i], rejected[0][i], rejected[1][i]),
                                    'r': [chosen[2][i].item(), rejected[2][i].item()]}) + '\n')
        strict, r = chosen[2] != rejected[2], torch.stack([chosen[2], rejected[2]], 1)[n - cfg.val_pairs:]
        results[tier] = {'label_agrees_with_truth': (chosen[2] > rejected[2])[strict].float().mean().item(),
                         'ties': 1 - strict.float().mean().item(), 'r_chosen': chosen[2].mean().item(),
                         'r_rejected': rejected[2].mean().item(), 'val_ceiling': bt_ceiling(r)}
    return results


PAIR_KEYS = ('prompt', 'chosen', 'rejected', 'chosen_len', 'rejected_len', 'r_chosen', 'r_rejected', 'n_val')


def load_pairs(path, device):
    """A tier's pairs file -> (train, val), each (seq (n, 2, L) prompt + [chosen, rejected], continuation
    lengths (n, 2), true rewards (n, 2) on the CPU)."""
    fix = 'rerun `python madpo.py --stage=pairs` for this seed (with --overwrite=True)'
    if not Path(path).is_file():
        raise UserError(f'no pairs file at {path}: {fix}')
    try:
        p = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f'pairs file {path} is unreadable ({type(e).__name__}): {fix}') from None
    missing = [k for k in PAIR_KEYS if not isinstance(p, dict) or k not in p]
    if missing:
        raise UserError(f"pairs file {path} is damaged (no {', '.join(missing[:3])}): {fix}")
    seq = torch.stack([torch.cat([p['prompt'], p[k]], 1) for k in ('chosen', 'rejected')], 1).long()
    lens = torch.stack([p['chosen_len'], p['rejected_len']], 1)
    r = torch.stack([p['r_chosen'], p['r_rejected']], 1)
    n = len(seq) - int(p['n_val'])
    return (seq[:n].to(device), lens[:n].to(device), r[:n]), (seq[n:].to(device), lens[n:].to(device), r[n:])
