"""N-gram floors: the val loss that counting alone reaches, the regime marker under every comparison table.

A run whose val loss sits above a corpus's trigram floor has learned less than a table of trigram counts,
so a comparison at that budget measures how fast methods learn n-gram statistics, not language modelling
(No Train No Gain's question needs budgets below it). ngram_floors counts n-grams of the train split,
smooths them with interpolated Kneser-Ney so every val probability is positive, and caches the three
cross-entropies in the corpus folder.
"""
import json

import numpy as np

from data.loader import Corpus, DataError, atomic_write_bytes, read_json

FLOOR_ORDERS = {'unigram': 1, 'bigram': 2, 'trigram': 3}
SMOOTHING = 'interpolated Kneser-Ney'  # part of the cache key: another estimator is not served stale floors


def ngram_floors(corpus, max_train_tokens=1 << 26):
    """{'unigram', 'bigram', 'trigram'}: cross-entropy (nats per token) of the val split under n-gram
    models counted on the train split. A run whose val loss is above the trigram floor has learned
    less than a table of counts.

    Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount per order,
    D = n1 / (n1 + 2 n2) from that order's counts of counts (0.5 when no n-gram occurs once), recursing
    down to the uniform distribution over the vocabulary, so every probability is positive and every
    floor finite. The top order uses raw counts, lower orders continuation counts (the number of
    distinct tokens seen before an n-gram); the unigram floor is the order-1 case (discounted counts
    interpolated with uniform). All three score the same val positions, from the third token on.
    Counts come from the first max_train_tokens of train (all of a small corpus; the cap bounds the
    memory of a large one). Cached in the corpus folder (ngram_floors.json) by the files' identity."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    cache = corpus.path / 'ngram_floors.json'
    key = {'identity': corpus.identity(), 'max_train_tokens': max_train_tokens, 'smoothing': SMOOTHING}
    cached = read_json(cache)
    if cached.get('key') == key and is_floors(cached.get('floors')):
        return cached['floors']
    V = corpus.vocab_size
    if V ** 3 >= 2 ** 63:
        raise DataError(f'vocab_size {V} is too large for trigram keys in int64: n-gram floors need V < 2,097,152')
    train = np.asarray(corpus.splits['train'][:max_train_tokens], dtype=np.int64)
    val = np.asarray(corpus.splits['val'][:max_train_tokens], dtype=np.int64)
    if len(train) < 3 or len(val) < 3:
        raise DataError(f'{corpus.path} is too small for n-gram floors (train and val need 3 tokens each)')
    floors = {name: kneser_ney_nats(train, val, n, V) for name, n in FLOOR_ORDERS.items()}
    try:
        atomic_write_bytes(cache, json.dumps({'key': key, 'floors': floors}, indent=1).encode())
    except OSError:
        pass  # a read-only corpus folder: computed again next time
    return floors


def is_floors(floors):
    """A cached floors dict of the right shape: each order's cross-entropy, a positive finite number."""
    return (isinstance(floors, dict) and set(floors) == set(FLOOR_ORDERS)
            and all(isinstance(v, (int, float)) and 0 < v < float('inf') for v in floors.values()))


def ngram_keys(tokens, n, V, start):
    """One int64 per n-gram ending at positions start..len-1: the base-V number of its n tokens."""
    key = np.zeros(len(tokens) - start, dtype=np.int64)
    for j in range(n):
        key = key * V + tokens[start - n + 1 + j:len(tokens) - n + 1 + j]
    return key


def kneser_ney_nats(train, val, order, V):
    """-mean log P(val[i] | the order-1 tokens before it), i >= 2, under interpolated Kneser-Ney."""
    keys, counts = np.unique(ngram_keys(train, order, V, order - 1), return_counts=True)
    levels = [(keys, counts)]
    for n in range(order - 1, 0, -1):  # continuation counts: how many distinct tokens precede each n-gram
        keys, counts = np.unique(keys % V ** n, return_counts=True)
        levels.append((keys, counts))
    p = np.full(len(val) - 2, 1.0 / V)  # order 0: uniform
    for n, (keys, counts) in enumerate(reversed(levels), 1):
        p = interpolate(keys, counts, ngram_keys(val, n, V, 2), V, p)
    return float(-np.log(p).mean())


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
