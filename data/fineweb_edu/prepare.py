"""FineWeb-Edu (HuggingFaceFW/fineweb-edu, its sample-10BT subset by default) as a tokenized corpus, and
the shard pipeline data/openwebtext/prepare.py shares.

Documents stream from the Hugging Face Hub through `datasets` (pip install datasets), or come from local
shards (each row's `text`, and `id` when there is one): --input takes a folder of .parquet/.jsonl/.jsonl.gz
files, one such file, or a quoted glob, read from the folder the command runs in (data/shards.py). Worker
processes tokenize (tiktoken's gpt2 by default, any encoding by name, or byte); each document ends with
the end-of-text token (byte has none: documents just follow each other); a hash of a document's id (or
of shard:row when there is none) puts val_frac of the documents in val. A lone surrogate in the text
(JSON can spell "\\ud800", which no tokenizer encodes) becomes U+FFFD; a line that is not UTF-8 or not
JSON, or a truncated .jsonl.gz, is an error naming it.

    python data/fineweb_edu/prepare.py                          # sample-10BT -> data/fineweb_edu/gpt2/
    python data/fineweb_edu/prepare.py --max_tokens=100_000_000 # the first ~100M tokens only
    python data/fineweb_edu/prepare.py --input=~/fineweb/sample/10BT --num_proc=16
    python data/fineweb_edu/prepare.py --input='shards/*.jsonl.gz'
    python train.py config/gpt2_124m.py

Shards are taken in order of their name (a Hub shard's index, a local file's path under --input) and the
corpus is their documents in that order. Each shard is tokenized into a part of its own, in the build
folder beside the target (data/loader.py CorpusBuild), and recorded with its identity (a local file's
size, mtime and a hash of its first MiB) once synced. Run again after an interruption (Ctrl-C, a lost
connection, a full disk) with the same settings, and a finished part is kept when its shard is unchanged;
a shard added since, or replaced, is tokenized, and the parts are joined in shard order. The result is
therefore the corpus a fresh prepare of the final shards writes. Under --max_tokens a kept part must also
start at the same token offset (otherwise the cap would fall elsewhere), so a change early on redoes the
parts after it. The join needs room for the corpus twice, briefly. If the hash split leaves val (or
train) without a document, e.g. a small input or an early --max_tokens cap, the last document goes there
instead and meta.json names it (moved_to_val); one document in all is an error. A status line shows
tokens, tokens/s and the ETA.
"""
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import (DATA_ROOT, NAME_RE, CorpusBuild, DataError, corpus_meta, get_tokenizer, is_val,  # noqa: E402
                         token_dtype)
from data.shards import Shard, file_identity, input_source, local_shards  # noqa: E402

BATCH_CHARS = 1 << 20  # characters of text per task sent to a worker: large enough to amortise pickling
LONE_SURROGATE = re.compile('[\ud800-\udfff]')  # json.loads keeps them; a pair would have become one character
SPLITS = ('train', 'val')
STATE_FORMAT = 2  # the resume state's layout: a build saved by another layout starts over


@dataclass(frozen=True)
class PrepareConfig:
    input: str = ''                           # '' = the Hub; else a folder, file or quoted glob of shards
    tokenizer: str = 'gpt2'                   # 'byte' or a tiktoken encoding name (gpt2, cl100k_base, ...)
    val_frac: float = 0.0005                  # fraction of documents (by id hash) in val
    max_tokens: int = 0                       # stop at the first document end after this many tokens (0 = all)
    num_proc: int = 0                         # tokenizer worker processes (0 = one per CPU core)
    out_dir: str = ''                         # '' = data/<corpus>/<tokenizer>
    hub_path: str = 'HuggingFaceFW/fineweb-edu'  # the Hub dataset streamed when --input is ''
    hub_subset: str = 'sample-10BT'           # its config name ('' = the default one)
    hub_revision: str = ''                    # a branch or commit of the Hub repository ('' = main)

    corpus = 'fineweb_edu'  # the folder under data/ (a class attribute, not a key)

    def __post_init__(self):
        require(0 < self.val_frac < 1, f'--val_frac must be in (0, 1), got {self.val_frac}')
        require(self.max_tokens >= 0, f'--max_tokens must be >= 0 (0 = all), got {self.max_tokens}')
        require(self.num_proc >= 0, f'--num_proc must be >= 0 (0 = one per CPU core), got {self.num_proc}')
        require(NAME_RE.fullmatch(self.tokenizer), f"--tokenizer must be 'byte' or an encoding's name, got '{self.tokenizer}'")
        require(self.input or self.hub_path, '--hub_path is empty: give a Hub dataset or --input=FOLDER')


# -----------------------------------------------------------------------------
# the Hub's shards (local ones: data/shards.py)

def hub_shards(cfg):
    """The Hub dataset's own shards (its parquet files), streamed: no full download, resumable per shard."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError('streaming from the Hugging Face Hub needs the datasets package: pip install datasets '
                        '(or pass --input=FOLDER of downloaded .parquet/.jsonl shards)') from None
    from datasets.utils.logging import set_verbosity_error
    from huggingface_hub.utils.logging import set_verbosity_error as hub_quiet
    set_verbosity_error()  # its retry warnings would bury the one line that says what to do
    hub_quiet()
    where = f"{cfg.hub_path}{f' ({cfg.hub_subset})' if cfg.hub_subset else ''}"
    try:
        ds = load_dataset(cfg.hub_path, cfg.hub_subset or None, split='train', streaming=True,
                          revision=cfg.hub_revision or None)
        info = ds.info.splits['train'].num_examples if ds.info.splits else None
    except Exception as e:  # offline, unknown name, a script-based repository: all end here
        raise DataError(f"cannot open {where} on the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())[:90]}): "
                        f'run with network, or download its parquet files elsewhere and pass --input=FOLDER') from None
    n = ds.num_shards

    def shard(i):
        def rows():
            try:
                for row in ds.shard(num_shards=n, index=i):
                    yield row.get('id'), row['text']
            except Exception as e:  # a dropped connection mid-shard: the shards done so far are kept
                raise DataError(f"reading {where} shard {i} failed ({type(e).__name__}: {str(e)[:80]}): run the same "
                                f'command again to resume from this shard') from None
        return rows
    per_shard = None if info is None else info / n
    identity = {'revision': cfg.hub_revision or 'main'}  # pin --hub_revision to resume against a moving main safely
    return [Shard(f'{cfg.hub_path}/{cfg.hub_subset}/{i:05d}-of-{n:05d}', per_shard, shard(i), identity) for i in range(n)]


# -----------------------------------------------------------------------------
# tokenizing in worker processes

_tokenizer = None  # each worker's own tokenizer, built once by _init_worker (a Pool's idiom)


def _init_worker(spec):
    """Build the worker's tokenizer once. Ctrl-C and SIGTERM are the parent's to handle (it stops the
    pool), so a worker neither prints a traceback for them nor outlives its parent."""
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _tokenizer = get_tokenizer(spec)


def encode_documents(texts, tokenizer=None):
    """Each text as a token array followed by the end-of-text token (none for byte). A lone surrogate
    becomes U+FFFD: it has no UTF-8 form, so no tokenizer could encode it."""
    tokenizer = tokenizer or _tokenizer
    sep = [] if tokenizer.eot is None else [tokenizer.eot]
    dtype = token_dtype(tokenizer.vocab_size)
    return [np.concatenate([tokenizer.encode(LONE_SURROGATE.sub('\ufffd', t)), sep]).astype(dtype) for t in texts]


def batches(rows):
    """(ids, texts) lists of about BATCH_CHARS characters."""
    ids, texts, chars = [], [], 0
    for doc_id, text in rows:
        ids.append(doc_id)
        texts.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield ids, texts
            ids, texts, chars = [], [], 0
    if texts:
        yield ids, texts


def encoded(rows, pool, tokenizer, depth):
    """(ids, token arrays) per batch, in order; at most `depth` batches in flight, so memory stays bounded."""
    if pool is None:
        yield from ((ids, encode_documents(texts, tokenizer)) for ids, texts in batches(rows))
        return
    pending = deque()
    for ids, texts in batches(rows):
        pending.append((ids, pool.apply_async(encode_documents, (texts,))))
        if len(pending) >= depth:
            ids, result = pending.popleft()
            yield ids, result.get()
    while pending:
        ids, result = pending.popleft()
        yield ids, result.get()


def checked(rows, shard):
    for n, (doc_id, text) in enumerate(rows):
        if not isinstance(text, str):
            raise DataError(f"{shard} row {n}: 'text' is {type(text).__name__}, not a string: fix or remove that shard")
        yield doc_id, text


# -----------------------------------------------------------------------------
# writing one part per shard, resumably

class Progress:
    """One status line on stderr: tokens, tokens/s of this run, fraction done and ETA, at most once a second
    (every 30 s when stderr is not a terminal, so a log stays short), and a last one when the corpus is
    written (so a quick prepare that fails says only why). Parts kept from a stopped prepare count as done
    but not toward this run's rate."""

    def __init__(self, shards, max_tokens):
        rows = [s.n_rows for s in shards]
        self.total_rows = None if None in rows else sum(rows)
        self.n_shards, self.max_tokens = len(shards), max_tokens
        self.done = {'rows': 0, 'shards': 0, 'tokens': 0}
        self.kept = dict(self.done)
        self.t0, self.tty = time.time(), sys.stderr.isatty()
        self.last = self.t0

    def keep(self, part):
        for counts in (self.done, self.kept):
            counts['rows'] += part['rows']
            counts['shards'] += 1
            counts['tokens'] += sum(part['tokens'].values())

    def fraction(self, counts):
        """By rows when their total is known, else by shards; by tokens too under max_tokens."""
        parts = [counts['rows'] / self.total_rows if self.total_rows else counts['shards'] / self.n_shards]
        return min(max(parts + ([counts['tokens'] / self.max_tokens] if self.max_tokens else [])), 1.0)

    def show(self, final=False):
        now = time.time()
        if not final and now - self.last < (1 if self.tty else 30):
            return
        self.last, elapsed = now, max(now - self.t0, 1e-9)
        tokens, f, f0 = self.done['tokens'], self.fraction(self.done), self.fraction(self.kept)
        rate = (tokens - self.kept['tokens']) / elapsed
        eta = '?' if f <= f0 else f'{elapsed * (1 - f) / (f - f0) / 60:.1f} min'
        line = f'{tokens:,} tokens ({100 * f:.1f}%), {rate:,.0f} tokens/s, ETA {eta}'
        print(('\r' if self.tty else '') + line, end='\n' if final or not self.tty else '', file=sys.stderr, flush=True)


def part_paths(build, name):
    """A shard's part files in the build: named by a hash of the shard's name (which may hold '/')."""
    stem = hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:20]
    return {split: build.folder / 'parts' / f'{stem}.{split}.bin' for split in SPLITS}


def well_formed(part):
    """A part record of the shape write_part saves (a state.json edited or from elsewhere may hold anything)."""
    def is_last(last):
        return last is None or (isinstance(last, list) and len(last) == 2 and isinstance(last[0], str)
                                and type(last[1]) is int)
    try:
        return (type(part['rows']) is int and type(part['offset']) is int and isinstance(part['stopped'], bool)
                and all(type(part[k][s]) is int for k in ('tokens', 'documents') for s in SPLITS)
                and all(is_last(part['last'][s]) for s in SPLITS))
    except (KeyError, TypeError):
        return False


def usable_part(part, shard, offset, max_tokens, paths, itemsize):
    """A finished part can stand for its shard: a well-formed record of the same identity whose files
    hold the tokens it counts, and (under max_tokens, where the cap depends on it) the same start offset."""
    if not well_formed(part) or part['identity'] != shard.identity or (max_tokens and part['offset'] != offset):
        return False
    return all(paths[s].is_file() and paths[s].stat().st_size == part['tokens'][s] * itemsize for s in SPLITS)


def write_part(shard, stream, paths, offset, budget, val_frac, progress):
    """Tokenize one shard into its part files; returns the part's record. budget: the tokens left under
    --max_tokens (0 = no cap); the part stops at the first document end that spends it."""
    part = {'identity': shard.identity, 'offset': offset, 'rows': 0, 'stopped': False,
            'tokens': dict.fromkeys(SPLITS, 0), 'documents': dict.fromkeys(SPLITS, 0),
            'last': dict.fromkeys(SPLITS)}  # per split, [name, tokens] of its last non-empty document
    files = {split: open(path, 'wb') for split, path in paths.items()}
    try:
        for ids, arrays in stream(checked(shard.read(), shard.name)):
            for doc_id, tokens in zip(ids, arrays):
                name = doc_id if isinstance(doc_id, str) and doc_id else f"{shard.name}:{part['rows']}"
                split = 'val' if is_val(name, val_frac) else 'train'
                files[split].write(tokens.tobytes())
                part['tokens'][split] += len(tokens)
                part['documents'][split] += 1
                part['last'][split] = [name, len(tokens)] if len(tokens) else part['last'][split]
                part['rows'] += 1
                progress.done['rows'] += 1
                progress.done['tokens'] += len(tokens)
                if budget and sum(part['tokens'].values()) >= budget:
                    part['stopped'] = True
                    break
            progress.show()
            if part['stopped']:
                break
        for f in files.values():  # the tokens on disk before the state that counts them
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    progress.done['shards'] += 1
    if shard.path is not None and file_identity(shard.path) != shard.identity:
        raise DataError(f'{shard.path} changed while it was being read: run the same command again')
    return part


def write_parts(build, shards, tokenizer, spec, cfg, num_proc):
    """The part of every shard up to the --max_tokens cap, in shard order: kept when finished and unchanged,
    else tokenized (the state saved after each). Returns the names of the shards the corpus is made of."""
    parts = build.state['parts']
    (build.folder / 'parts').mkdir(exist_ok=True)
    itemsize = token_dtype(tokenizer.vocab_size).itemsize
    progress, pool, used, offset = Progress(shards, cfg.max_tokens), None, [], 0
    try:
        for shard in shards:
            paths, part = part_paths(build, shard.name), parts.get(shard.name)
            if usable_part(part, shard, offset, cfg.max_tokens, paths, itemsize):
                progress.keep(part)
            else:
                if isinstance(part, dict) and part.get('identity') != shard.identity:
                    print(f'{shard.name} changed since the prepare stopped: tokenizing it again', file=sys.stderr)
                if parts.pop(shard.name, None) is not None:
                    build.save_state()  # the old part stops counting before its files are overwritten
                if pool is None and num_proc > 1:
                    pool = multiprocessing.Pool(num_proc, _init_worker, (spec,))
                budget = cfg.max_tokens - offset if cfg.max_tokens else 0
                part = write_part(shard, lambda rows: encoded(rows, pool, tokenizer, depth=2 * num_proc),
                                  paths, offset, budget, cfg.val_frac, progress)
                parts[shard.name] = part
                build.save_state()
            used.append(shard.name)
            offset += sum(part['tokens'].values())
            if part['stopped']:
                break
    finally:
        if pool is not None:
            pool.terminate()
    return used, progress


# -----------------------------------------------------------------------------
# joining the parts into the corpus

def split_counts(parts):
    return {s: {'documents': sum(p['documents'][s] for p in parts), 'tokens': sum(p['tokens'][s] for p in parts)}
            for s in SPLITS}


class Move(NamedTuple):
    """The document the fallback moves: the last non-empty one of `donor` (in parts[part]) goes to `split`."""
    split: str
    donor: str
    part: int
    name: str
    tokens: int


def fallback_move(parts, counts):
    """The Move that gives a split the hash left without tokens a document, or None when both have some."""
    empty = [s for s in SPLITS if counts[s]['tokens'] == 0]
    if not empty:
        return None
    split = empty[0]
    donor = 'train' if split == 'val' else 'val'
    i = next((i for i in reversed(range(len(parts))) if parts[i]['last'][donor]), None)
    if len(empty) == 2 or i is None or counts[donor]['tokens'] <= parts[i]['last'][donor][1]:
        docs = counts['train']['documents'] + counts['val']['documents']
        raise DataError(f'the input gave {docs} document(s), too few for both a train and a val split: give more '
                        f'input or a larger --max_tokens')
    name, n = parts[i]['last'][donor]
    print(f'the hash split left {split} without a document: the last {donor} document ({name}) goes there',
          file=sys.stderr)
    return Move(split, donor, i, name, n)


def copy_bytes(src, dst, n):
    while n > 0:
        block = src.read(min(n, 1 << 24))
        if not block:  # cannot happen to a checked part; never loop on a file shorter than counted
            raise DataError(f'{src.name} ended {n:,} bytes early: run the same command again')
        dst.write(block)
        n -= len(block)


def join_parts(build, names, itemsize):
    """train.bin and val.bin of the build: the parts in shard order, with a document moved into a split
    the hash split left empty (fallback_move). Returns the counts and meta.json's note of the move."""
    parts = [build.state['parts'][n] for n in names]
    counts = split_counts(parts)
    move = fallback_move(parts, counts)
    out = {s: open(build.folder / f'{s}.bin', 'wb') for s in SPLITS}
    try:
        for i, name in enumerate(names):
            for split, path in part_paths(build, name).items():
                with open(path, 'rb') as f:
                    if move and i == move.part and split == move.donor:  # its last document goes over
                        copy_bytes(f, out[split], path.stat().st_size - move.tokens * itemsize)
                        copy_bytes(f, out[move.split], move.tokens * itemsize)
                    else:
                        shutil.copyfileobj(f, out[split], 1 << 24)
        for f in out.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in out.values():
            f.close()
    shutil.rmtree(build.folder / 'parts')  # before the commit, which moves every file of the build
    if not move:
        return counts, {}
    for split, sign in ((move.donor, -1), (move.split, 1)):
        counts[split] = {'documents': counts[split]['documents'] + sign,
                         'tokens': counts[split]['tokens'] + sign * move.tokens}
    return counts, {f'moved_to_{move.split}': [move.name]}


def prepare(cfg, encoding=None):
    """encoding: a tiktoken.Encoding to use instead of --tokenizer (one built in code, e.g. by a test)."""
    spec = encoding or cfg.tokenizer
    tokenizer = get_tokenizer(spec)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / cfg.corpus / tokenizer.name
    shards = local_shards(cfg.input) if cfg.input else hub_shards(cfg)
    hub = f"hf:{cfg.hub_path}{'/' + cfg.hub_subset if cfg.hub_subset else ''}"
    source = input_source(cfg.input) if cfg.input else hub + (f'@{cfg.hub_revision}' if cfg.hub_revision else '')
    # What every part depends on. The shards are not in it: each part carries its shard's identity.
    key = {'format': STATE_FORMAT, 'tokenizer': tokenizer.name, 'vocab_size': tokenizer.vocab_size,
           'val_frac': cfg.val_frac, 'max_tokens': cfg.max_tokens}
    num_proc = cfg.num_proc or os.cpu_count() or 1
    with CorpusBuild(out_dir, resume_key=key) as build:
        if not isinstance(build.state.get('parts'), dict):
            build.state['parts'] = {}
        try:
            used, progress = write_parts(build, shards, tokenizer, spec, cfg, num_proc)
        except KeyboardInterrupt:
            if build.state['parts']:
                print(f"stopped: {len(build.state['parts'])} finished shards are kept in {build.folder}; "
                      f'run the same command to resume', file=sys.stderr)
            raise
        counts, moved = join_parts(build, used, token_dtype(tokenizer.vocab_size).itemsize)
        meta = corpus_meta(tokenizer, source, cfg.val_frac, counts,
                           {'shards': len(used), 'max_tokens': cfg.max_tokens, 'config': asdict(cfg), **moved})
        build.commit(meta)
    progress.show(final=True)
    kept = progress.kept['shards']
    resumed = f', {kept} kept from the stopped prepare' if kept else ''
    print(f"wrote {out_dir}: train {counts['train']['tokens']:,} tokens, val {counts['val']['tokens']:,} tokens "
          f"({len(used)} shards{resumed}; {tokenizer.name})")
    return out_dir


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
