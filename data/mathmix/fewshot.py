"""Mathmix's downstream eval: few-shot prompt, greedy decode, exact match on the answer line.

A prompt (eval.jsonl, written by prepare.py) is solved examples of one family followed by a held-out
question; the model's greedy continuation is right when its first `Answer:` line holds the gold
integer. The gold solution's teacher-forced loss is a smooth companion for models too small to get
many answers right. slm.py calls few_shot_eval at each eval (the accuracy curve) and at stage eval.
"""
import json
import re
import statistics

import numpy as np
import torch

from data.loader import Corpus, DataError, get_examples, val_ids
from data.mathmix.prepare import FAMILIES
from model import evaluating


def parse_answer(text):
    """The integer on the first 'Answer:' line, as a string; None when there is no such line or it
    holds no clean integer. Malformed output is counted wrong; it never raises."""
    for line in str(text).splitlines():
        if line.strip().startswith('Answer:'):
            m = re.fullmatch(r'Answer:\s*(-?\d{1,12})\.?', line.strip())
            return str(int(m.group(1))) if m else None
    return None


def load_problems(path, per_family):
    """The first per_family held-out problems of each family in eval.jsonl."""
    if per_family <= 0:
        return []
    if not path.exists():
        raise DataError(f'no eval problems at {path}: run `python data/mathmix/prepare.py`')
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for f in FAMILIES for r in [r for r in rows if r['family'] == f][:per_family]]


def finished(gen):
    """A generation (bytes) is done once a line after 'Answer:' has ended, or a blank line closed it."""
    return gen.endswith(b'\n') and (b'\n\n' in gen or re.search(rb'Answer:[^\n]*\n', gen) is not None)


def stop_when_finished(new):
    """model.generate's stop: new (B, t) byte ids -> bool (B,), the rows whose text is finished."""
    return torch.tensor([finished(bytes(row)) for row in new.tolist()])


def greedy_completions(model, prompts, rt, max_new_tokens):
    """Greedy continuations (bytes) of equal-length prompts (B, P) through model.generate's KV cache;
    a row stops once its text is finished. Positions after a row stopped are padded with -1 (no byte)."""
    with rt.autocast():
        out = model.generate(prompts.to(rt.device), max_new_tokens, temperature=0, stop=stop_when_finished, pad_id=-1)
    return [bytes(t for t in row if t >= 0) for row in out[:, prompts.size(1):].tolist()]


@torch.no_grad()
def solution_loss(model, problems, P, rt):
    """Mean loss per byte of the gold worked solution and answer line after the prompt (teacher forced)."""
    T, total, count = model.config.block_size, 0.0, 0
    with evaluating(model):
        for p in problems:
            gold = p['solution'].rstrip('\n').encode() + b'\n'
            seq = torch.tensor(list((p['prompt'].encode()[-P:] + gold)[-(T + 1):]))
            y = seq[1:].clone()
            y[:len(y) - len(gold)] = -1                                     # score the gold completion only
            with rt.autocast():
                total += model(seq[None, :-1].to(rt.device), y[None].to(rt.device)).sum().item()
            count += len(gold)
    return total / count


def few_shot_eval(model, problems, rt, max_new_tokens, batch_size=64):
    """Exact match per family and their mean, plus the gold solution's loss; and the outputs. A prompt
    is cropped on the left, as training windows are, to block_size - max_new_tokens bytes; prompts of
    one length decode as a batch."""
    P = model.config.block_size - max_new_tokens
    prompts = [np.frombuffer(p['prompt'].encode(), dtype=np.uint8)[-P:].astype(np.int64) for p in problems]
    outputs, by_length = [''] * len(problems), {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for members in by_length.values():
        for s in range(0, len(members), batch_size):
            part = members[s:s + batch_size]
            batch = torch.from_numpy(np.stack([prompts[i] for i in part]))
            for i, out in zip(part, greedy_completions(model, batch, rt, max_new_tokens)):
                outputs[i] = out.decode('utf-8', errors='replace')
    correct = {}
    for p, out in zip(problems, outputs):
        correct.setdefault(p['family'], []).append(parse_answer(out) == p['answer'])
    per_family = {f: sum(c) / len(c) for f, c in correct.items()}
    result = {'accuracy': statistics.mean(per_family.values()), 'per_family': per_family,
              'solution_loss': solution_loss(model, problems, P, rt)}
    return result, outputs


def clean_val(ref_data, T, n):
    """n fixed examples (x, y) of the clean corpus's val split (ref_data: its folder): target-domain
    text no run trains on."""
    tokens = Corpus(ref_data).splits['val']
    return get_examples(tokens, val_ids(tokens, T, n), T)
