"""N-gram floors: the val loss that counting alone reaches, the regime marker under every comparison table.

A run whose val loss sits above a corpus's trigram floor has learned less than a table of trigram counts,
so a comparison at that budget measures how fast methods learn n-gram statistics, not language modelling
(No Train No Gain's question needs budgets below it). ngram_floors counts n-grams of the train split,
smooths them with interpolated Kneser-Ney so every val probability is positive, and caches the
cross-entropies in the corpus folder. Orders go up to 7: a byte-level model that beats a trigram table
may still sit above a 5-gram one, and the comparison tables say between which orders a baseline sits,
over the whole val split and over the windows the models are actually scored on.
"""
import json

import numpy as np

from data.loader import Corpus, DataError, atomic_write_bytes, read_json, val_ids

FLOOR_ORDERS = {'unigram': 1, 'bigram': 2, 'trigram': 3, '4-gram': 4, '5-gram': 5, '6-gram': 6, '7-gram': 7}
SMOOTHING = 'interpolated Kneser-Ney'  # part of the cache key: another estimator is not served stale floors


def ngram_floors(corpus, max_train_tokens=1 << 26, max_order=3, windows=None):
    """{'unigram', 'bigram', 'trigram', ... up to max_order}: cross-entropy (nats per token) of the val split
    under n-gram models counted on the train split. A run whose val loss is above a floor has learned less
    than a table of counts of that order.

    Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount per order,
    D = n1 / (n1 + 2 n2) from that order's counts of counts (0.5 when no n-gram occurs once), recursing
    down to the uniform distribution over the vocabulary, so every probability is positive and every
    floor finite. The top order uses raw counts, lower orders continuation counts (the number of
    distinct tokens seen before an n-gram); the unigram floor is the order-1 case (discounted counts
    interpolated with uniform). Every order scores the same val positions: from token max(3, max_order)
    on. windows=(block_size, n): only the positions the loop's eval scores (the targets of its n evenly
    spread val windows, loader.val_ids), whose n-gram context is the stream before them. Orders whose
    keys overflow int64 (V ** n >= 2 ** 63: 4 with gpt2's vocabulary) are left out. Counts come from the
    first max_train_tokens of train (the cap bounds a large corpus's memory). Cached in the corpus folder
    (ngram_floors.json) by the files' identity and these arguments."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    V = corpus.vocab_size
    orders = {name: n for name, n in FLOOR_ORDERS.items() if n <= max_order and V ** n < 2 ** 63}
    if len(orders) < 3:
        raise DataError(f'vocab_size {V} is too large for trigram keys in int64: n-gram floors need V < 2,097,152')
    cache = corpus.path / 'ngram_floors.json'
    key = {'identity': corpus.identity(), 'max_train_tokens': max_train_tokens, 'smoothing': SMOOTHING,
           'orders': list(orders), 'windows': list(windows) if windows else None, 'context': 'in-window' if windows else 'stream'}
    saved = read_json(cache)
    entries = saved.get('entries') if isinstance(saved.get('entries'), list) else []
    entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get('key'), dict)]
    hit = next((e['floors'] for e in entries if e.get('key') == key and is_floors(e.get('floors'), orders)), None)
    if hit:
        return hit
    start = max(orders.values()) - 1 if max(orders.values()) > 3 else 2
    train = np.asarray(corpus.splits['train'][:max_train_tokens], dtype=np.int64)
    val = np.asarray(corpus.splits['val'][:max_train_tokens], dtype=np.int64)
    if len(train) <= start or len(val) <= start:
        raise DataError(f'{corpus.path} is too small for n-gram floors (train and val need {start + 1} tokens each)')
    nats = {n: kneser_ney_nats(train, val, n, V, start) for n in orders.values()}
    scored, offset = scored_positions(len(val), start, windows)
    floors = {}
    for name, n in orders.items():
        if windows is None:
            floors[name] = float(nats[n][scored].mean())
            continue
        effective = np.minimum(n, offset + 2)  # in a window, target j has j + 1 tokens of context: order <= j + 2
        floors[name] = float(sum(nats[k][scored[effective == k]].sum() for k in np.unique(effective)) / len(scored))
    entries = [e for e in entries if e['key'].get('identity') == key['identity']][-7:] + [{'key': key, 'floors': floors}]  # this corpus's
    try:
        atomic_write_bytes(cache, json.dumps({'entries': entries}, indent=1).encode())
    except OSError:
        pass  # a read-only corpus folder: computed again next time
    return floors


def scored_positions(n_val, start, windows):
    """(indices into kneser_ney_nats' output (val positions start..n_val-1) that a floor averages over, and
    each one's offset j inside its window (its target index: j + 1 tokens of context), or None)."""
    if not windows:
        return np.arange(n_val - start), None
    block_size, n = windows
    ids = val_ids(range(n_val), block_size, n)  # each window predicts the tokens ids+1 .. ids+block_size
    offset = np.tile(np.arange(block_size), len(ids))
    pos = (ids[:, None] + np.arange(1, block_size + 1)[None, :]).ravel()
    keep = (pos >= start) & (pos < n_val)
    return pos[keep] - start, offset[keep]


def is_floors(floors, orders=FLOOR_ORDERS):
    """A cached floors dict of the right shape: each order's cross-entropy, a positive finite number."""
    return (isinstance(floors, dict) and set(floors) == set(orders)
            and all(isinstance(v, (int, float)) and 0 < v < float('inf') for v in floors.values()))


def ngram_keys(tokens, n, V, start):
    """One int64 per n-gram ending at positions start..len-1: the base-V number of its n tokens."""
    key = np.zeros(len(tokens) - start, dtype=np.int64)
    for j in range(n):
        key = key * V + tokens[start - n + 1 + j:len(tokens) - n + 1 + j]
    return key


def kneser_ney_nats(train, val, order, V, start=2):
    """-log P(val[i] | the order-1 tokens before it) for i >= start (>= order - 1), interpolated Kneser-Ney."""
    keys, counts = np.unique(ngram_keys(train, order, V, order - 1), return_counts=True)
    levels = [(keys, counts)]
    for n in range(order - 1, 0, -1):  # continuation counts: how many distinct tokens precede each n-gram
        keys, counts = np.unique(keys % V ** n, return_counts=True)
        levels.append((keys, counts))
    p = np.full(len(val) - start, 1.0 / V)  # order 0: uniform
    for n, (keys, counts) in enumerate(reversed(levels), 1):
        p = interpolate(keys, counts, ngram_keys(val, n, V, start), V, p)
    return -np.log(p)


def _lookup(sorted_keys, values, query):
    i = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    return np.where(sorted_keys[i] == query, values[i], 0)


def interpolate(keys, counts, query, V, lower):
    """P(w | h) = (max(c(hw) - D, 0) + D * types(h) * P_lower(w)) / c(h), or P_lower where c(h) = 0;
    keys (sorted, unique) and counts are the n-grams hw, query the val n-grams, lower P_lower of each."""
    n1, n2 = np.count_nonzero(counts == 1), np.count_nonzero(counts == 2)
    D = n1 / (n1 + 2 * n2) if n1 else 0.5
    contexts, first = np.unique(keys // V, return_index=True)  # sorted keys: each context is one run
    total, types = np.add.reduceat(counts, first), np.diff(np.append(first, len(keys)))
    c = _lookup(keys, counts, query)
    c_h, types_h = _lookup(contexts, total, query // V), _lookup(contexts, types, query // V)
    return np.where(c_h > 0, (np.maximum(c - D, 0) + D * types_h * lower) / np.maximum(c_h, 1), lower)
