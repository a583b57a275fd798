"""Mathmix's downstream eval: greedy exact match on the held-out operand pairs.

A prompt is solved training lines followed by a held-out question (`17+25=`), starting at a line so the
question's digits sit where they do in training windows; the answer is right when greedy decoding
writes both digits of the gold answer. That equals "each gold digit is the argmax given the prompt and
the gold digits before it": a greedy decode that wrote the first digit right sees exactly the gold
prefix for the second, and one that wrote it wrong is wrong either way. So one teacher-forced forward
pass scores every problem (tested against model.generate). slm.py calls exact_match at every eval (the
accuracy-vs-tokens curve), its study (studies/slm.py) on the reference model (a gate); line_losses says
which byte of a line a model has not learned (the study report's diagnosis).
"""
import json
import re

import torch

from data.loader import Corpus, DataError, get_examples, val_ids
from data.mathmix.prepare import LINE, LINE_BYTES
from model import evaluating


PROBLEM = {'question': re.compile(r'\d\d\+\d\d='), 'answer': re.compile(r'\d\d'),  # what an eval.jsonl line holds
           'context': re.compile(r'(\d\d\+\d\d=\d\d\n)*'), 'trap': bool}


def load_problems(path):
    """eval.jsonl's problems, each checked to be what prepare.py writes: a byte that is not UTF-8, a lone
    surrogate (a \\ud800 escape), a field of another shape or contexts of unequal length (the prompts are
    batched) make the file damaged, refused in one line."""
    if not path.exists():
        raise DataError(f'no eval problems at {path}: run `python data/mathmix/prepare.py`')
    try:
        problems = [json.loads(line) for line in path.read_bytes().decode('utf-8').splitlines() if line]
    except ValueError:  # UnicodeDecodeError included
        problems = []
    if not (problems and all(isinstance(p, dict) and all(well_formed(p.get(k), v) for k, v in PROBLEM.items())
                             for p in problems) and len({len(p['context']) for p in problems}) == 1):
        raise DataError(f"{path} is damaged (not lines of mathmix problems: {', '.join(PROBLEM)}): delete it and run "
                        '`python data/mathmix/prepare.py` (with --out_dir if you gave --mathmix_dir)')
    return problems


def well_formed(value, form):
    return isinstance(value, bool) if form is bool else isinstance(value, str) and form.fullmatch(value) is not None


def prompt(problem, block_size):
    """The last solved lines that fit in one window before the question (whole lines only)."""
    n_lines = min(block_size // LINE - 1, len(problem['context']) // LINE)
    return problem['context'][len(problem['context']) - n_lines * LINE:] + problem['question']


@torch.no_grad()
def greedy_right(model, problems, rt, batch_size=256):
    """(N,) bool: greedy decoding after each prompt writes the gold answer (see the top)."""
    seqs = torch.tensor([list((prompt(p, model.config.block_size) + p['answer']).encode()) for p in problems])
    P, right = seqs.size(1) - len(problems[0]['answer']), []                  # answers start at P
    with evaluating(model):
        for i in range(0, len(seqs), batch_size):
            x = seqs[i:i + batch_size].to(rt.device)
            with rt.autocast():
                logits = model.lm_head(model.hidden(x[:, :-1]))                   # (b, L - 1, V)
            right.append((logits[:, P - 1:].argmax(-1) == x[:, P:]).all(1).cpu())  # (b, answer digits)
    return torch.cat(right)


def exact_match(model, problems, rt):
    """Accuracy on every held-out problem and on the trap ones (sums ending in the bad source's digit)."""
    right = greedy_right(model, problems, rt)
    trap = torch.tensor([p['trap'] for p in problems])
    return {'accuracy': right.float().mean().item(), 'trap_accuracy': right[trap].float().mean().item()}


def clean_val(ref_data, T, n):
    """n fixed examples (x, y) of the clean corpus's val split (ref_data: its folder): target-domain
    text no run trains on."""
    tokens = Corpus(ref_data).splits['val']
    return get_examples(tokens, val_ids(tokens, T, n), T)


@torch.no_grad()
def line_losses(model, x, y, rt):
    """Mean loss of each byte of a line (LINE_BYTES, in line order) on windows that start at a line:
    the target y[:, t] is byte (t + 1) % LINE of its line."""
    if not (x[:, 2] == ord('+')).all():
        raise DataError('line_losses needs windows that start at a line (x[:, 2] is not always "+")')
    with evaluating(model), rt.autocast():
        losses = model(x.to(rt.device), y.to(rt.device)).float().cpu()            # (B, T)
    offset = (torch.arange(x.size(1)) + 1) % LINE
    return {name: losses[:, offset == i].mean().item() for i, name in enumerate(LINE_BYTES)}
