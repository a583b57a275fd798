"""Mathmix: two-digit addition facts with labelled noise, the target task of Rho-1's SLM (slm.py).

A fact is one 9-byte line `ab+cd=ef`: operands 00..49, the sum written least significant digit first
(17+25=42 is `17+25=24`), the order in which carries flow, so a causal model computes each digit from
digits it has already seen. Every line of every document is 9 bytes and the model's block_size is a
multiple of 9, so each training window starts at a line and a digit sits at the same position in every
window. Both choices are what make the task learnable at CPU size: a 4-block, 128-wide GPT trained on
clean facts went from 8% to 99% exact match on held-out pairs between 0.4M and 0.8M tokens with aligned
lines, and was at 3% after 1.6M tokens with the same lines at random offsets (measured 2026-11-30).
10% of the operand pairs (by a hash) are held out: they never occur in any training or reference line,
right or wrong; the eval problems are exactly those pairs.

The noisy corpus replaces a fraction `noise` of a worksheet's lines by noise of three kinds, and labels
every byte with its kind (kinds.bin, one uint8 per train.bin byte; 0 = clean):
  wrong_digit   a bad source that is off by one on a fixed digit: it writes a sum's units digit 7 as 8,
                and only posts facts where that happens (sums ending in 7, a tenth of the pairs). At noise
                0.2 it writes 60% of those facts, at 0.4 80%: it changes the *most likely* answer there, so
                greedy exact match on the "trap" problems (held-out sums ending in 7) registers it. Only the
                wrong digit is labelled; the rest of its line is true.
  boilerplate   navigation and ad lines inside the worksheet (`Page 3/9`, `Log in |`, ...)
  off_domain    unrelated English prose (the stdlib's pydoc topics) in 8-character lines
The noise lines are 60% wrong facts, 20% boilerplate, 20% prose. Each byte's role (ROLES: its place in a fact
line, an operand a b c d, '+', '=', a sum digit, or a byte of a noise line) is not stored: load_roles derives
it from kinds.bin and the line layout, and checks it against the bytes. It writes, deterministic from --seed:
  data/mathmix/ref/byte/          the clean reference corpus (its val split: clean target-domain val text)
  data/mathmix/noise<P>/byte/     a noisy training corpus per level P (percent of lines), with kinds.bin
  data/mathmix/eval/eval.jsonl    the held-out problems {a, b, question, answer, trap, context}

    python data/mathmix/prepare.py                 # a few seconds
"""
import json
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import DATA_ROOT, DataError, atomic_write_bytes, get_tokenizer, is_val, read_meta, write_corpus  # noqa: E402
from runs import free_memory  # noqa: E402

KINDS = ('clean', 'wrong_digit', 'boilerplate', 'off_domain')
CLEAN, WRONG, BOILERPLATE, OFF_DOMAIN = range(len(KINDS))
LINE = 9                  # bytes per line, newline included
LINE_BYTES = ('a', 'b', '+', 'c', 'd', '=', 'units', 'tens', 'newline')  # `ab+cd=` then the sum, units first
ROLES = LINE_BYTES + ('noise_line',)  # a byte's role (load_roles): its place in a fact line, or a byte of a noise line
OPERANDS = tuple(LINE_BYTES.index(b) for b in 'abcd')  # the roles drawn at random: no model can predict them
NOISE_LINE = ROLES.index('noise_line')
N_OPERAND = 50            # operands 0..49
HELDOUT_PERCENT = 10      # of the operand pairs, never in any training line
TRAP_DIGIT = 7            # the bad source writes this units digit of a sum as TRAP_DIGIT + 1
NOISE_MIX = {WRONG: 0.6, BOILERPLATE: 0.2, OFF_DOMAIN: 0.2}  # shares of the noise lines
LINES_PER_DOC = 32
VAL_FRAC = 0.05


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 1234
    n_ref_docs: int = 4000          # clean reference worksheets of 32 lines (1.15M bytes)
    n_train_docs: int = 3200        # noisy training worksheets per noise level (0.92M bytes: more than one arm reads)
    noise_levels: tuple = (0.0, 0.2, 0.4)  # fractions of a worksheet's lines that are noise, one corpus each
    n_context: int = 15             # solved lines stored before each eval question (the prompt uses the last ones)
    tokenizer: str = 'byte'         # kinds.bin labels bytes: mathmix is byte-level only
    out_dir: str = ''               # '' = data/mathmix

    def __post_init__(self):
        require(self.tokenizer == 'byte', "--tokenizer must be 'byte': kinds.bin labels bytes")
        require(min(self.n_ref_docs, self.n_train_docs, self.n_context) > 0, 'document and context counts must be positive')
        require(all(0 <= f < 1 for f in self.noise_levels), f'--noise_levels must be fractions in [0, 1), got {self.noise_levels}')
        check_noise_levels('noise_levels', self.noise_levels)
        check_fits('n_ref_docs', self.n_ref_docs, DOC_BYTES, 'a worksheet')  # one corpus is built at a time
        check_fits('n_train_docs', self.n_train_docs, DOC_BYTES, 'a worksheet')
        check_fits('n_context', self.n_context, CONTEXT_BYTES * len(EVAL_PAIRS),
                   f'a context line: {CONTEXT_BYTES} for each of the {len(EVAL_PAIRS)} problems')


# What a corpus build holds in memory (measured: ~6.5 KiB a 288-byte worksheet, the documents' text and their
# int64 tokens before write_corpus packs them; ~27 bytes a context line of an eval problem, written as JSON).
DOC_BYTES, CONTEXT_BYTES = 8192, 32


def check_fits(name, count, bytes_each, each):
    """Refuse, before generating anything, a count whose build would not fit in the free memory."""
    fits = free_memory(torch.device('cpu')) // bytes_each
    require(count <= fits, f'--{name}={count:,} needs about {count * bytes_each / 2**30:,.1f} GiB of memory ({bytes_each:,} '
                           f'bytes {each}), more than is free: give at most {fits:,}')


def check_noise_levels(name, levels):
    """A noise level names its corpus folder in whole percents (corpus_name: 0.2 -> noise20): a level between two
    would read or overwrite the corpus of another level, so each must be a whole percent, and be given once."""
    for f in levels:
        require(abs(100 * f - round(100 * f)) < 1e-6, f'--{name}: {f:g} is not a whole percent (its corpus folder would '
                f'be {corpus_name(f)}, which holds noise {round(100 * f) / 100:g}): give {round(100 * f) / 100:g}')
    names = [corpus_name(f) for f in levels]
    require(len(set(names)) == len(names), f'--{name}={tuple(levels)} gives a level more than once: give each once')


def corpus_name(noise):
    return f'noise{round(100 * noise)}'


# -----------------------------------------------------------------------------
# facts

def held_out(a, b):
    return zlib.crc32(f'{a}+{b}'.encode()) % 100 < HELDOUT_PERCENT


def answer(a, b):
    """The sum as two digits, least significant first."""
    return f'{a + b:02d}'[::-1]


def question(a, b):
    return f'{a:02d}+{b:02d}='


PAIRS = [(a, b) for a in range(N_OPERAND) for b in range(N_OPERAND)]
TRAIN_PAIRS = [p for p in PAIRS if not held_out(*p)]
EVAL_PAIRS = [p for p in PAIRS if held_out(*p)]  # the eval problems
TRAP_PAIRS = [p for p in TRAIN_PAIRS if sum(p) % 10 == TRAP_DIGIT]  # the bad source's facts


# -----------------------------------------------------------------------------
# worksheets: lists of (9-byte line, kind of each byte)

class Noise:
    """The three noise sources. Off-domain lines continue through real prose, 8 characters at a time."""

    def __init__(self, rng):
        from pydoc_data.topics import topics
        self.rng = rng
        words = ' '.join(' '.join(topics[k].split()) for k in sorted(topics))
        self.prose, self.cursor = ''.join(c for c in words if ' ' <= c <= '~'), 0  # printable ASCII

    def wrong_fact(self):
        a, b = self.rng.choice(TRAP_PAIRS)
        q, right = question(a, b), answer(a, b)
        return q + str(TRAP_DIGIT + 1) + right[1] + '\n', [CLEAN] * len(q) + [WRONG] + [CLEAN] * 2

    def boilerplate(self):
        r = self.rng
        text = r.choice(('Home|Top', 'Log in |', 'Sign up!', '<< Prev ', 'Next >> ', 'Share: f', 'Ad: WIN!',
                         'Cookies?', f'Page {r.randint(1, 9)}/9', f'(c) 20{r.randint(10, 29)}', f'id {r.randint(1000, 9999)} '))
        return text + '\n', [BOILERPLATE] * LINE

    def off_domain(self):
        if self.cursor + 8 > len(self.prose):
            self.cursor = 0
        text, self.cursor = self.prose[self.cursor:self.cursor + 8], self.cursor + 8
        return text + '\n', [OFF_DOMAIN] * LINE

    def line(self):
        kind = self.rng.choices(list(NOISE_MIX), weights=list(NOISE_MIX.values()))[0]
        return {WRONG: self.wrong_fact, BOILERPLATE: self.boilerplate, OFF_DOMAIN: self.off_domain}[kind]()


def clean_line(rng):
    a, b = rng.choice(TRAIN_PAIRS)
    return question(a, b) + answer(a, b) + '\n', [CLEAN] * LINE


def worksheet(rng, noise, source):
    """LINES_PER_DOC lines: clean facts, each replaced by a noise line with probability `noise`."""
    lines = [source.line() if rng.random() < noise else clean_line(rng) for _ in range(LINES_PER_DOC)]
    return ''.join(t for t, _ in lines), np.array([k for _, kinds in lines for k in kinds], dtype=np.uint8)


# -----------------------------------------------------------------------------
# the outputs

def write_noisy_corpus(out_dir, docs, tokenizer, noise):
    """write_corpus with kinds.bin (the kind of every train.bin byte) swapped in together with it."""
    train = [(text, k) for name, (text, k) in docs if not is_val(name, VAL_FRAC)]
    kinds = np.concatenate([k for _, k in train])
    if sum(len(text.encode('utf-8')) for text, _ in train) != len(kinds):
        raise DataError(f'{out_dir}: kinds.bin would not line up with train.bin (bytes != characters?)')
    return write_corpus(out_dir, [(name, text) for name, (text, _) in docs], tokenizer, val_frac=VAL_FRAC,
                        source=f'mathmix (synthetic, noise {noise:g})',
                        extra_meta={'kinds': list(KINDS), 'noise': noise,
                                    'kind_fracs': {k: float((kinds == i).mean()) for i, k in enumerate(KINDS)}},
                        extra_files={'kinds.bin': kinds.tobytes()})


def eval_problems(rng, n_context):
    """Every held-out pair once, each with n_context solved training lines to stand before it."""
    return [{'a': a, 'b': b, 'question': question(a, b), 'answer': answer(a, b), 'trap': (a + b) % 10 == TRAP_DIGIT,
             'context': ''.join(clean_line(rng)[0] for _ in range(n_context))} for a, b in EVAL_PAIRS]


def prepare(cfg, missing_only=False):
    """Each part from its own seeded generator, so any subset can be (re)written alone; missing_only:
    write only the parts not there yet (slm.py's first use)."""
    root = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / 'mathmix'
    tokenizer, todo = get_tokenizer(cfg.tokenizer), lambda path: not (missing_only and path.exists())
    if todo(root / 'ref' / 'byte' / 'meta.json'):
        rng = random.Random(f'{cfg.seed}:ref')
        ref_docs = [(f'ref/{i:06d}', worksheet(rng, 0.0, None)[0]) for i in range(cfg.n_ref_docs)]
        ref = write_corpus(root / 'ref' / 'byte', ref_docs, tokenizer, source='mathmix (synthetic, clean)', val_frac=VAL_FRAC)
        print(f"wrote {root / 'ref'}: {ref['counts']['train']['tokens']:,} clean tokens")
    for noise in cfg.noise_levels:
        if todo(root / corpus_name(noise) / 'byte' / 'kinds.bin'):
            rng, source = random.Random(f'{cfg.seed}:{noise}'), Noise(random.Random(f'{cfg.seed}:{noise}:source'))
            docs = [(f'train/{i:06d}', worksheet(rng, noise, source)) for i in range(cfg.n_train_docs)]
            meta = write_noisy_corpus(root / corpus_name(noise) / 'byte', docs, tokenizer, noise)
            print(f"wrote {root / corpus_name(noise)}: {meta['counts']['train']['tokens']:,} tokens, by kind " +
                  ', '.join(f'{k} {v:.3f}' for k, v in meta['kind_fracs'].items()))
    if todo(root / 'eval' / 'eval.jsonl'):
        rows = eval_problems(random.Random(f'{cfg.seed}:eval'), cfg.n_context)
        (root / 'eval').mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / 'eval' / 'eval.jsonl', ''.join(json.dumps(r) + '\n' for r in rows).encode())
        print(f"wrote {root / 'eval' / 'eval.jsonl'}: {len(rows)} held-out pairs ({sum(r['trap'] for r in rows)} trap)")
    return root


def ensure_prepared(out_dir, noise_levels):
    """slm.py's first use: write what is missing of mathmix in out_dir ('' = data/mathmix); a folder the
    user named must hold it already (DataError naming the command)."""
    root = Path(out_dir) if out_dir else DATA_ROOT / 'mathmix'
    if root.exists() and not root.is_dir():
        raise DataError(f'--mathmix_dir={root} is a file, not a folder: give the folder mathmix is (to be) prepared in')
    parts = [root / 'ref' / 'byte' / 'meta.json', root / 'eval' / 'eval.jsonl',
             *(root / corpus_name(f) / 'byte' / 'kinds.bin' for f in noise_levels)]
    if all(p.exists() for p in parts):
        return
    if out_dir:
        raise DataError(f'mathmix data missing in {out_dir}: run `python data/mathmix/prepare.py --out_dir={out_dir} '
                        f'--noise_levels="{tuple(noise_levels)}"`')
    print(f'preparing {root} (once)')
    prepare(PrepareConfig(noise_levels=tuple(noise_levels)), missing_only=True)


REPREPARE = 'run `python data/mathmix/prepare.py` (with --out_dir if you gave --mathmix_dir)'


def load_kinds(corpus):
    """A noisy corpus folder's kinds.bin (a memmap), checked against its train.bin's length."""
    kinds = np.memmap(corpus / 'kinds.bin', dtype=np.uint8, mode='r') if (corpus / 'kinds.bin').exists() else []
    if len(kinds) != read_meta(corpus)['counts']['train']['tokens']:
        raise DataError(f'{corpus}/kinds.bin is missing or does not match train.bin: {REPREPARE}')
    return kinds


def load_roles(corpus):
    """Each train.bin byte's role (uint8, an index of ROLES), derived, not stored: every corpus is whole 9-byte
    lines from its first byte (no separator between documents), and kinds.bin labels a noise line whole
    (boilerplate, off-domain), so a line that is not noise is a fact `ab+cd=ef` (the bad source's included: only
    its units digit is labelled wrong) and its bytes' roles are LINE_BYTES. Checked against the bytes: a corpus
    whose fact lines are not of that layout, or whose noise lines are not labelled whole, is DataError."""
    kinds, tokens = np.asarray(load_kinds(corpus)), np.fromfile(corpus / 'train.bin', dtype=np.uint16)
    if len(tokens) % LINE or len(tokens) != len(kinds):
        raise DataError(f'{corpus}: train.bin is not whole {LINE}-byte mathmix lines: {REPREPARE}')
    lines, kinds = tokens.reshape(-1, LINE), kinds.reshape(-1, LINE)                        # (n_lines, LINE)
    noise = np.isin(kinds[:, 0], (BOILERPLATE, OFF_DOMAIN))                                 # (n_lines,)
    digit = (lines >= ord('0')) & (lines <= ord('9'))
    fact = digit[:, [0, 1, 3, 4, 6, 7]].all(1) & (lines[:, 2] == ord('+')) & (lines[:, 5] == ord('=')) & \
        (lines[:, 8] == ord('\n'))
    if not (fact[~noise].all() and (kinds[noise] == kinds[noise, :1]).all()):
        raise DataError(f'{corpus}: a line of train.bin is neither a fact `ab+cd=ef` nor a noise line labelled whole '
                        f'in kinds.bin: {REPREPARE}')
    return np.where(noise[:, None], NOISE_LINE, np.arange(LINE)).astype(np.uint8).ravel()


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
