"""Mathmix: a small synthetic target domain for Rho-1's Selective Language Modeling (slm.py).

Documents are worksheets of worked problems (a question, a worked solution, a final `Answer: N` line)
from four task families, with varied templates and number ranges:
  addsub   two steps of + and -              (a + b - c)
  mul      multiplication by skip counting   (3 * 7: count by 7: 7, 14, 21)
  word     two-step word problems            (+ then -, * then -, + then a difference)
  compare  the larger or smaller of two numbers
Everything is deterministic from --seed and needs no network. It writes:
  data/mathmix/ref/byte/      a small clean reference corpus (its val split is the clean target-domain
                              val text)
  data/mathmix/train/byte/    a larger training corpus: the same kind of documents with web-like noise
                              *inside* them, token by token: navigation boilerplate, wrong arithmetic,
                              random digit runs, unrelated prose (pydoc topics). noise.bin holds one
                              uint8 per train.bin token: its kind (0 = clean, see NOISE_KINDS).
  data/mathmix/eval/eval.jsonl  held-out problems {family, template, question, prompt, answer, solution}:
                              their question templates and operands never occur in ref or train; the
                              prompt is solved examples of the same family followed by the question.

    python data/mathmix/prepare.py                 # a few seconds
    python slm.py --quick=True                     # then the whole Rho-1 pipeline
"""
import json
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import DATA_ROOT, atomic_write_bytes, get_tokenizer, is_val, write_corpus  # noqa: E402

FAMILIES = ('addsub', 'mul', 'word', 'compare')
NOISE_KINDS = ('clean', 'boilerplate', 'wrong_arithmetic', 'digit_run', 'prose')
CLEAN, BOILERPLATE, WRONG, DIGITS, PROSE = range(len(NOISE_KINDS))
HELDOUT_PERCENT = 15   # operand tuples kept out of ref/train for evaluation
PROMPT_MIN_CHARS = 1024  # eval prompts hold solved examples up to at least this many characters

NAMES = [('Ann', 'She'), ('Ben', 'He'), ('Sam', 'He'), ('Lily', 'She'), ('Omar', 'He'), ('Mia', 'She'),
         ('Tom', 'He'), ('Zoe', 'She')]
OBJECTS = ['apples', 'pencils', 'stickers', 'marbles', 'cards', 'cookies', 'shells', 'books']

# Question templates per family: (name, text, held_out). Held-out templates appear only in eval.jsonl.
ADDSUB = [('what', 'What is {e}?', 0), ('compute', 'Compute {e}.', 0), ('calc', 'Calculate {e}.', 0),
          ('eval', 'Evaluate {e}.', 0), ('work', 'Work out {e}.', 1), ('value', 'Find the value of {e}.', 1)]
MUL = [('what', 'What is {a} * {b}?', 0), ('times', 'Compute {a} times {b}.', 0),
       ('mult', 'Multiply {a} by {b}.', 0), ('product', 'What is the product of {a} and {b}?', 0),
       ('groups', 'How much is {a} groups of {b}?', 1), ('find', 'Find {a} multiplied by {b}.', 1)]
WORD = [  # kind: '+-' = a + b - c, '*-' = a * b - c, '+r' = c - (a + b)
    ('buys', '+-', '{name} has {a} {obj}. {pron} buys {b} more and then gives {c} to a friend. '
                   'How many {obj} does {name} have now?', 0),
    ('shelf', '+-', 'There are {a} {obj} on a shelf. {name} puts {b} more on it, then {c} fall off. '
                    'How many {obj} are on the shelf?', 0),
    ('boxes', '*-', 'A box holds {a} {obj}. {name} fills {b} boxes and then takes out {c} {obj}. '
                    'How many {obj} are still in the boxes?', 0),
    ('pages', '+r', '{name} reads {a} pages on Monday and {b} pages on Tuesday. The book has {c} pages. '
                    'How many pages are left to read?', 0),
    ('picks', '+-', '{name} picks {a} {obj} in the morning and {b} in the afternoon, then eats {c}. '
                    'How many {obj} are left?', 1),
    ('bags', '*-', 'Each bag has {a} {obj}. {name} buys {b} bags and gives away {c} {obj}. '
                   'How many {obj} does {name} keep?', 1),
]
COMPARE = [('larger', 'Which is larger, {a} or {b}?', 'max', 0), ('greater', 'Which number is greater: {a} or {b}?', 'max', 0),
           ('smaller', 'Which is smaller, {a} or {b}?', 'min', 0), ('less', 'Which number is less: {a} or {b}?', 'min', 0),
           ('bigger', 'Of {a} and {b}, which is bigger?', 'max', 1), ('lesser', 'Of {a} and {b}, which is the lesser one?', 'min', 1)]
TITLES = {'addsub': 'addition and subtraction', 'mul': 'multiplication', 'word': 'word problems',
          'compare': 'comparing numbers', 'mixed': 'mixed review'}


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 1234
    n_ref_docs: int = 1500      # clean reference documents (about 1M bytes)
    n_train_docs: int = 2000    # noisy training documents (about 2.1M bytes, 43% of them noise)
    n_eval: int = 60            # held-out problems per family (fewer if a family has fewer)
    noise: float = 1.0          # scales every noise probability (0 = the train corpus is clean too)
    tokenizer: str = 'byte'     # the noise mask is per byte: mathmix is byte-level only
    out_dir: str = ''           # '' = data/mathmix

    def __post_init__(self):
        require(self.tokenizer == 'byte', "--tokenizer must be 'byte': noise.bin marks bytes")
        require(min(self.n_ref_docs, self.n_train_docs, self.n_eval) > 0, 'document and problem counts must be positive')
        require(0 <= self.noise <= 2, f'--noise must be in [0, 2], got {self.noise}')


# -----------------------------------------------------------------------------
# problems: a question, a worked solution as (text, is_result) parts, and the answer

def held_out(family, operands):
    return zlib.crc32(f'{family}:{operands}'.encode()) % 100 < HELDOUT_PERCENT


def draw_operands(rng, family, kind):
    """Operand tuples from the family's number ranges (small and larger numbers mixed)."""
    if family == 'addsub':
        hi = rng.choice((9, 20, 50))
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        ops = rng.choice(('+-', '++', '-+', '--'))
        c = rng.randint(1, hi)
        r1 = a + b if ops[0] == '+' else a - b
        return (a, b, c, ops) if r1 >= 0 and (r1 + c if ops[1] == '+' else r1 - c) >= 0 else None
    if family == 'mul':
        return rng.randint(2, 9), rng.randint(2, 25)
    if family == 'word':
        if kind == '*-':
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return a, b, rng.randint(1, a * b)
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return a, b, (rng.randint(1, a + b) if kind == '+-' else rng.randint(a + b + 1, a + b + 40))
    digits = rng.choice((2, 2, 3))
    a, b = rng.randint(10 ** (digits - 1), 10 ** digits - 1), rng.randint(10, 10 ** digits - 1)
    return (a, b) if a != b else None


def solve(family, kind, operands):
    """Worked solution parts [(text, is_result)] and the answer."""
    if family == 'addsub':
        a, b, c, ops = operands
        r1 = a + b if ops[0] == '+' else a - b
        r2 = r1 + c if ops[1] == '+' else r1 - c
        return [(f'{a} {ops[0]} {b} = ', 0), (str(r1), 1), (f'. {r1} {ops[1]} {c} = ', 0), (str(r2), 1), ('.', 0)], r2
    if family == 'mul':
        a, b = operands
        parts = [(f'Count by {b}: ', 0)]
        for i in range(1, a + 1):
            parts += [(str(i * b), 1), (', ' if i < a else '.', 0)]
        return parts, a * b
    if family == 'word':
        a, b, c = operands
        if kind == '+r':
            return [(f'{a} + {b} = ', 0), (str(a + b), 1), (f'. {c} - {a + b} = ', 0), (str(c - a - b), 1), ('.', 0)], c - a - b
        op, r1 = ('+', a + b) if kind == '+-' else ('*', a * b)
        return [(f'{a} {op} {b} = ', 0), (str(r1), 1), (f'. {r1} - {c} = ', 0), (str(r1 - c), 1), ('.', 0)], r1 - c
    a, b = operands
    pick = max(a, b) if kind == 'max' else min(a, b)
    rel = '>' if a > b else '<'
    word = 'larger' if kind == 'max' else 'smaller'
    return [(f'{a} {rel} {b}, so the {word} number is ', 0), (str(pick), 1), ('.', 0)], pick


def templates(family):
    if family == 'addsub':
        return [(name, '', text, h) for name, text, h in ADDSUB]
    if family == 'mul':
        return [(name, '', text, h) for name, text, h in MUL]
    if family == 'word':
        return [(name, kind, text, h) for name, kind, text, h in WORD]
    return [(name, kind, text, h) for name, text, kind, h in COMPARE]


def question_text(rng, family, text, operands):
    if family == 'addsub':
        a, b, c, ops = operands
        return text.format(e=f'{a} {ops[0]} {b} {ops[1]} {c}')
    name, pron = rng.choice(NAMES)
    return text.format(a=operands[0], b=operands[1], c=operands[-1], name=name, pron=pron, obj=rng.choice(OBJECTS))


def make_problem(rng, family, heldout=False):
    """A problem of the family: training templates and operands, or (heldout) only the held-out ones."""
    choices = [t for t in templates(family) if t[3] == heldout]
    while True:
        name, kind, text, _ = rng.choice(choices)
        operands = draw_operands(rng, family, kind)
        if operands is not None and held_out(family, (kind,) + tuple(operands)) == heldout:
            parts, answer = solve(family, kind, operands)
            return {'family': family, 'template': name, 'question': question_text(rng, family, text, operands),
                    'parts': parts, 'answer': answer}


def render(problem):
    return (f"Problem: {problem['question']}\nSolution: {''.join(t for t, _ in problem['parts'])}\n"
            f"Answer: {problem['answer']}\n\n")


# -----------------------------------------------------------------------------
# documents as (text, kind) segments; noise is inserted between and inside the clean segments

class Noise:
    """Web-page junk: navigation boilerplate, wrong arithmetic, random digit runs, unrelated prose."""

    def __init__(self, rng, scale):
        from pydoc_data.topics import topics
        self.rng, self.scale = rng, scale
        self.topics = [topics[k] for k in sorted(topics)]

    def p(self, prob):
        return self.rng.random() < prob * self.scale

    def boilerplate(self):
        r = self.rng
        lines = [f'Home | Topics | Forum | Log in | Sign up | Page {r.randint(1, 40)} of {r.randint(40, 90)}',
                 f'Posted by user{r.randint(1, 9999)} on 20{r.randint(10, 24)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} '
                 f'| {r.randint(0, 99)} comments',
                 'Share this: Facebook | Twitter | Email | Print',
                 'We use cookies to improve your experience. By using this site you accept our cookie policy.',
                 f'<< Previous | Next >> | Related: {r.choice(OBJECTS)} puzzles, fun facts, quizzes',
                 f'Copyright (c) 20{r.randint(10, 24)} MathHelpSite. All rights reserved. | Privacy | Terms',
                 f'Advertisement - Sponsored - Click here to win a free {r.choice(("phone", "tablet", "course"))}!']
        return '\n'.join(r.sample(lines, r.randint(1, 3))) + '\n\n'

    def digit_run(self):
        r = self.rng
        return ' '.join(''.join(r.choice('0123456789') for _ in range(r.randint(2, 8))) for _ in range(r.randint(1, 5)))

    def prose(self):
        text = self.rng.choice(self.topics)
        start = text.find(' ', self.rng.randrange(max(1, len(text) - 400))) + 1
        end = text.find(' ', start + self.rng.randint(80, 400))
        return ' '.join(text[start:end if end > 0 else len(text)].split()) + '\n\n'

    def wrong(self, value):
        delta = self.rng.choice([d for d in range(-9, 10) if d and value + d >= 0])
        return str(value + delta)


def problem_segments(problem, noise):
    """One problem's segments; with noise, results may be wrong and digit runs may interrupt lines."""
    segs = [(f"Problem: {problem['question']}", CLEAN)]
    if noise and noise.p(0.08):
        segs.append((' ' + noise.digit_run(), DIGITS))
    segs.append(('\nSolution: ', CLEAN))
    for text, is_result in problem['parts']:
        wrong = noise and is_result and noise.p(0.08)
        segs.append((noise.wrong(int(text)), WRONG) if wrong else (text, CLEAN))
    segs.append(('\nAnswer: ', CLEAN))
    wrong = noise and noise.p(0.06)
    segs.append((noise.wrong(problem['answer']), WRONG) if wrong else (str(problem['answer']), CLEAN))
    return segs + [('\n\n', CLEAN)]


def document_segments(rng, noise=None):
    """A worksheet: a title, then 3-8 problems of one family (or mixed), noise around and inside them."""
    family = rng.choice(FAMILIES + ('mixed',))
    segs = []
    if noise and noise.p(0.6):
        segs.append((noise.boilerplate(), BOILERPLATE))
    segs.append((f"{rng.choice(('Practice set', 'Worksheet', 'Lesson', 'Exercises'))} {rng.randint(1, 99)}: "
                 f'{TITLES[family]}\n\n', CLEAN))
    for _ in range(rng.randint(3, 8)):
        segs += problem_segments(make_problem(rng, rng.choice(FAMILIES) if family == 'mixed' else family), noise)
        if noise and noise.p(0.35):
            kind = rng.choices((PROSE, BOILERPLATE, DIGITS), weights=(0.5, 0.3, 0.2))[0]
            text = {PROSE: noise.prose, BOILERPLATE: noise.boilerplate, DIGITS: lambda: noise.digit_run() + '\n\n'}[kind]()
            segs.append((text, kind))
    if noise and noise.p(0.5):
        segs.append((noise.boilerplate(), BOILERPLATE))
    return segs


def encode_segments(segs, tokenizer):
    """A document's text and the noise kind of each of its tokens (bytes: encoding is segment-wise)."""
    kinds = [np.full(len(tokenizer.encode(text)), kind, dtype=np.uint8) for text, kind in segs]
    return ''.join(text for text, _ in segs), np.concatenate(kinds)


# -----------------------------------------------------------------------------
# the three outputs

def eval_problems(rng, n_per_family):
    """Held-out problems (unique per family), each with a few-shot prompt of solved training-style ones."""
    rows = []
    for family in FAMILIES:
        seen = set()
        for _ in range(50 * n_per_family):  # bounded: a family may hold fewer unique held-out problems
            if len(seen) == n_per_family:
                break
            p = make_problem(rng, family, heldout=True)
            if p['question'] in seen:
                continue
            seen.add(p['question'])
            shots = []
            while len(shots) < 3 or sum(map(len, shots)) < PROMPT_MIN_CHARS:
                shots.append(render(make_problem(rng, family)))
            question = f"Problem: {p['question']}\nSolution:"
            solution = render(p)[len(question):]  # the gold completion: ' steps\nAnswer: N\n\n'
            rows.append({'family': family, 'template': p['template'], 'question': p['question'],
                         'prompt': ''.join(shots) + question, 'answer': str(p['answer']), 'solution': solution})
    return rows


def write_train_corpus(out_dir, docs, tokenizer, val_frac, extra_meta):
    """write_corpus plus noise.bin, aligned with train.bin and written (atomically) before meta.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'meta.json').unlink(missing_ok=True)
    noise = np.concatenate([kinds for name, (_, kinds) in docs if not is_val(name, val_frac)])
    atomic_write_bytes(out_dir / 'noise.bin', noise.tobytes())
    meta = write_corpus(out_dir, [(name, text) for name, (text, _) in docs], tokenizer, source='mathmix (synthetic, noisy)', val_frac=val_frac,
                        extra_meta={**extra_meta, 'noise_kinds': list(NOISE_KINDS),
                                    'noise_frac': float((noise > 0).mean())})
    assert meta['counts']['train']['tokens'] == len(noise), 'noise.bin must align with train.bin'
    return meta


def prepare(cfg):
    root = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / 'mathmix'
    tokenizer = get_tokenizer(cfg.tokenizer)
    info = {'seed': cfg.seed, 'families': list(FAMILIES)}
    rng = random.Random(cfg.seed)
    ref_docs = [(f'ref/{i:06d}', ''.join(t for t, _ in document_segments(rng))) for i in range(cfg.n_ref_docs)]
    ref = write_corpus(root / 'ref' / 'byte', ref_docs, tokenizer, source='mathmix (synthetic, clean)',
                       val_frac=0.1, extra_meta=info)
    noise = Noise(random.Random(cfg.seed + 1), cfg.noise)
    train_docs = [(f'train/{i:06d}', encode_segments(document_segments(rng, noise), tokenizer))
                  for i in range(cfg.n_train_docs)]
    train = write_train_corpus(root / 'train' / 'byte', train_docs, tokenizer, 0.02, {**info, 'noise_scale': cfg.noise})
    rows = eval_problems(random.Random(cfg.seed + 2), cfg.n_eval)
    (root / 'eval').mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / 'eval' / 'eval.jsonl', ''.join(json.dumps(r) + '\n' for r in rows).encode())
    print(f"wrote {root}: ref {ref['counts']['train']['tokens']:,} + {ref['counts']['val']['tokens']:,} val tokens (clean), "
          f"train {train['counts']['train']['tokens']:,} tokens ({100 * train['noise_frac']:.0f}% noise), "
          f'{len(rows)} held-out eval problems')
    return root


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
