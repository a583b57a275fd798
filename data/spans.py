"""T5's span corruption: the pre-training objective of T5-lite, in the data layer next to the loader.

"Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (Raffel et al.,
JMLR 2020, arXiv 1910.10683), section 3.1.4 and the t5 repository's `random_spans_noise_mask`,
`noise_span_to_unique_sentinel` and `compute_input_and_target_lengths`. From a raw chunk of L tokens,
round(0.15 L) tokens are noise, cut into round(noise / 3) spans by a random segmentation of the noise
and of the non-noise tokens (interleaved, starting with non-noise, so the chunk ends in noise). The
encoder input keeps the non-noise tokens and puts one sentinel where each noise span was; the target
is each sentinel followed by its span's tokens; both end in EOS. Every chunk of the same length has
the same counts, so a batch needs no padding: 568 raw tokens -> 512 input, 114 target (T5's sizes).

Ids: the tokenizer's ids [0, base), then the sentinels (the i-th span of a chunk gets base + i), then
the decoder start id (T5 starts the decoder with its pad id) and EOS, the last two ids. The model's
vocabulary is padded up to a multiple of 64 and the padding goes to sentinels: 256 bytes -> 320 ids,
62 sentinels.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NOISE_DENSITY = 0.15   # fraction of a raw chunk's tokens that are noise
MEAN_SPAN = 3.0        # mean noise span length


def span_counts(raw_len, noise_density=NOISE_DENSITY, mean_span=MEAN_SPAN):
    """(num_noise, num_spans) of a raw chunk of raw_len tokens, T5's rounding (half to even) and clamps."""
    if raw_len < 2:
        raise ValueError(f'span corruption needs a raw chunk of >= 2 tokens, got {raw_len}')
    num_noise = min(max(round(raw_len * noise_density), 1), raw_len - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    return num_noise, num_spans


def t5_lengths(raw_len, noise_density=NOISE_DENSITY, mean_span=MEAN_SPAN):
    """(input_len, target_len): non-noise tokens + one sentinel per span + EOS; noise + sentinels + EOS."""
    num_noise, num_spans = span_counts(raw_len, noise_density, mean_span)
    return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(input_len, noise_density=NOISE_DENSITY, mean_span=MEAN_SPAN):
    """The longest raw chunk whose encoder input is input_len tokens (T5's compute_input_and_target_lengths)."""
    raw_len = 2
    while t5_lengths(raw_len + 1, noise_density, mean_span)[0] <= input_len:
        raw_len += 1
    if t5_lengths(raw_len, noise_density, mean_span)[0] != input_len:  # only for input_len < 3
        raise ValueError(f'no raw chunk length gives a span-corrupted input of {input_len} tokens')
    return raw_len


@dataclass(frozen=True)
class SpanVocab:
    """The model's ids: tokenizer ids [0, base), sentinels [base, size - 2), start = size - 2, eos = size - 1."""
    base: int
    size: int

    @property
    def n_sentinels(self):
        return self.size - self.base - 2

    @property
    def start(self):
        return self.size - 2

    @property
    def eos(self):
        return self.size - 1


def span_vocab(base_vocab, raw_len, multiple=64):
    """Enough sentinels for a raw_len chunk, plus start and EOS, padded up to a multiple (the padding
    becomes more sentinels)."""
    num_spans = span_counts(raw_len)[1]
    return SpanVocab(base_vocab, multiple * math.ceil((base_vocab + num_spans + 2) / multiple))


# -----------------------------------------------------------------------------
# the noise mask

def random_segmentation(n, num_items, num_segments, generator):
    """(n, num_segments) segment lengths >= 1 summing to num_items, each row a uniformly random
    segmentation: the first segment starts at item 0, the other num_segments - 1 starts are a random
    subset of the num_items - 1 later items (T5 shuffles an indicator; argsort of uniforms is a shuffle)."""
    perm = torch.rand(n, num_items - 1, generator=generator).argsort(dim=1)          # (n, num_items - 1)
    first_in_segment = F.pad(perm < num_segments - 1, (1, 0))                         # (n, num_items)
    segment_id = first_in_segment.long().cumsum(dim=1)
    lengths = torch.zeros(n, num_segments, dtype=torch.long)
    return lengths.scatter_add_(1, segment_id, torch.ones_like(segment_id))


def noise_mask(n, raw_len, generator, noise_density=NOISE_DENSITY, mean_span=MEAN_SPAN):
    """(n, raw_len) bool, True = noise: non-noise and noise spans interleaved, non-noise first."""
    num_noise, num_spans = span_counts(raw_len, noise_density, mean_span)
    noise_lengths = random_segmentation(n, num_noise, num_spans, generator)
    nonnoise_lengths = random_segmentation(n, raw_len - num_noise, num_spans, generator)
    span_lengths = torch.stack([nonnoise_lengths, noise_lengths], dim=2).view(n, 2 * num_spans)
    span_starts = span_lengths.cumsum(dim=1)[:, :-1]                                  # (n, 2k - 1), all < raw_len
    starts = torch.zeros(n, raw_len, dtype=torch.long).scatter_(1, span_starts, 1)
    return starts.cumsum(dim=1) % 2 == 1                                              # odd span number = noise


# -----------------------------------------------------------------------------
# inputs and targets

def sentinel_spans(tokens, span_mask, sentinel0):
    """Replace each run of span_mask by one sentinel, the i-th run of a row by sentinel0 + i (T5's
    noise_span_to_unique_sentinel). Every row must hold the same number of runs and masked tokens."""
    prev = F.pad(span_mask[:, :-1], (1, 0))
    first = span_mask & ~prev                                                         # a run's first token
    out = torch.where(first, sentinel0 + first.long().cumsum(dim=1) - 1, tokens)
    return out[~(span_mask & prev)].view(len(tokens), -1)                             # drop the rest of each run


def span_corrupt(raw, generator, vocab, noise_density=NOISE_DENSITY, mean_span=MEAN_SPAN):
    """raw (B, L) int64 token chunks -> enc_in (B, Li), dec_in (B, Lt), targets (B, Lt), int64 on raw's
    device, (Li, Lt) = t5_lengths(L). dec_in is targets shifted right behind the start id. generator: a
    CPU torch.Generator, the only randomness (seed it to get the same corruption again)."""
    B, L = raw.shape
    num_spans = span_counts(L, noise_density, mean_span)[1]
    if num_spans > vocab.n_sentinels:
        raise ValueError(f'a raw chunk of {L} tokens has {num_spans} noise spans, more than the '
                         f'{vocab.n_sentinels} sentinels of {vocab}')
    noise = noise_mask(B, L, generator, noise_density, mean_span).to(raw.device)
    eos = torch.full((B, 1), vocab.eos, dtype=raw.dtype, device=raw.device)
    enc_in = torch.cat([sentinel_spans(raw, noise, vocab.base), eos], dim=1)
    targets = torch.cat([sentinel_spans(raw, ~noise, vocab.base), eos], dim=1)
    dec_in = torch.cat([torch.full_like(eos, vocab.start), targets[:, :-1]], dim=1)
    return enc_in, dec_in, targets
