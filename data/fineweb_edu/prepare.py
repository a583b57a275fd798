"""FineWeb-Edu (HuggingFaceFW/fineweb-edu, its sample-10BT subset by default) as a tokenized corpus, and
the shard pipeline data/openwebtext/prepare.py shares.

Documents stream from the Hugging Face Hub through `datasets` (pip install datasets), or come from local
shards: --input=FOLDER reads its *.parquet and *.jsonl files (each row's `text`), e.g. a download made
elsewhere. Worker processes tokenize (tiktoken's gpt2 by default, any encoding by name, or byte); each
document ends with the end-of-text token (byte has none: documents just follow each other); a hash of
a document's id (or of shard:row when there is none) puts val_frac of the documents in val.

    python data/fineweb_edu/prepare.py                          # sample-10BT -> data/fineweb_edu/gpt2/
    python data/fineweb_edu/prepare.py --max_tokens=100_000_000 # the first ~100M tokens only
    python data/fineweb_edu/prepare.py --input=~/fineweb/sample/10BT --num_proc=16
    python train.py config/gpt2_124m.py

The corpus is built beside its target and swapped in when complete (data/loader.py CorpusBuild). The
unit of work is a shard: after each one the build's streams are synced and its state saved, so an
interrupted prepare (Ctrl-C, a lost connection, a full disk) resumes at the first unfinished shard when
run again with the same settings. A status line shows tokens, tokens/s and the ETA.
"""
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import (DATA_ROOT, NAME_RE, CorpusBuild, DataError, corpus_meta, get_tokenizer, is_val,  # noqa: E402
                         token_dtype)

BATCH_CHARS = 1 << 20  # characters of text per task sent to a worker: large enough to amortise pickling


@dataclass(frozen=True)
class PrepareConfig:
    input: str = ''                           # '' = stream from the Hub; else a folder of .parquet/.jsonl shards
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
# shards: (name, number of rows or None, a function returning an iterator of (doc id or None, text))

def local_shards(folder):
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f'--input={folder} is not a folder: give a folder of .parquet or .jsonl shards')
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.name.endswith(('.parquet', '.jsonl', '.jsonl.gz')))
    if not files:
        raise DataError(f'--input={folder} holds no .parquet, .jsonl or .jsonl.gz files')
    return [(p.relative_to(folder).as_posix(), *(parquet_shard(p) if p.suffix == '.parquet' else jsonl_shard(p)))
            for p in files]


def parquet_shard(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError('reading .parquet shards needs pyarrow: pip install datasets (it brings pyarrow)') from None
    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f'{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:80]})') from None
    if 'text' not in meta.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(meta.schema_arrow.names)[:80]})")
    columns = ['text'] + (['id'] if 'id' in meta.schema_arrow.names else [])

    def rows():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns):
            ids = batch.column('id').to_pylist() if 'id' in columns else [None] * batch.num_rows
            yield from zip(ids, batch.column('text').to_pylist())
    return meta.metadata.num_rows, rows


def jsonl_shard(path):
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            n_rows = sum(1 for line in f if line.strip())
    except OSError as e:  # unreadable, or a damaged .gz
        raise DataError(f'cannot read {path} ({e.strerror or e}): fix or remove that shard') from None

    def rows():
        with opener(path, 'rb') as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    yield record.get('id'), record['text']
                except (ValueError, KeyError, AttributeError, TypeError):
                    raise DataError(f"{path}:{n} is not a JSON object with a 'text' string") from None
    return n_rows, rows


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
    return [(f'{cfg.hub_path}/{cfg.hub_subset}/{i:05d}-of-{n:05d}', per_shard, shard(i)) for i in range(n)]


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
    """Each text as a token array followed by the end-of-text token (none for byte)."""
    tokenizer = tokenizer or _tokenizer
    sep = [] if tokenizer.eot is None else [tokenizer.eot]
    dtype = token_dtype(tokenizer.vocab_size)
    return [np.concatenate([tokenizer.encode(t), sep]).astype(dtype) for t in texts]


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


# -----------------------------------------------------------------------------
# writing shard by shard, resumably

class Progress:
    """One status line on stderr: tokens, tokens/s of this run, fraction done and ETA, at most once a second
    (every 30 s when stderr is not a terminal, so a log stays short)."""

    def __init__(self, total_rows, n_shards, max_tokens, state):
        self.total_rows, self.n_shards, self.max_tokens = total_rows, n_shards, max_tokens
        self.t0, self.last, self.tty = time.time(), 0.0, sys.stderr.isatty()
        self.tokens0, self.f0 = sum(state['tokens'].values()), self.fraction(state)

    def fraction(self, state):
        """Done so far: by rows when their total is known, else by shards; by tokens too under max_tokens."""
        tokens = sum(state['tokens'].values())
        parts = [state['rows'] / self.total_rows if self.total_rows else len(state['done']) / self.n_shards]
        return min(max(parts + ([tokens / self.max_tokens] if self.max_tokens else [])), 1.0)

    def show(self, state, final=False):
        now = time.time()
        if not final and now - self.last < (1 if self.tty else 30):
            return
        self.last, elapsed, tokens = now, max(now - self.t0, 1e-9), sum(state['tokens'].values())
        rate, f = (tokens - self.tokens0) / elapsed, self.fraction(state)
        eta = '?' if f <= self.f0 else f'{elapsed * (1 - f) / (f - self.f0) / 60:.1f} min'
        line = f'{tokens:,} tokens ({100 * f:.1f}%), {rate:,.0f} tokens/s, ETA {eta}'
        print(('\r' if self.tty else '') + line, end='\n' if final or not self.tty else '', file=sys.stderr, flush=True)


def open_streams(build, dtype):
    """train.bin and val.bin of the build for appending, cut back to what the saved state counts (the
    tail of an interrupted shard goes)."""
    files = {}
    for split in ('train', 'val'):
        path = build.folder / f'{split}.bin'
        path.touch()
        os.truncate(path, build.state['tokens'][split] * dtype.itemsize)
        files[split] = open(path, 'ab')
    return files


def checked(rows, shard):
    for n, (doc_id, text) in enumerate(rows):
        if not isinstance(text, str):
            raise DataError(f"{shard} row {n}: 'text' is {type(text).__name__}, not a string: fix or remove that shard")
        yield doc_id, text


def write_shard(name, rows, stream, files, state, val_frac, max_tokens, progress):
    """Append one shard's documents to the streams; True when max_tokens was reached inside it."""
    row = 0
    for ids, arrays in stream(checked(rows(), name)):
        for doc_id, tokens in zip(ids, arrays):
            doc = doc_id if isinstance(doc_id, str) and doc_id else f'{name}:{row}'
            split = 'val' if is_val(doc, val_frac) else 'train'
            files[split].write(tokens.tobytes())
            state['tokens'][split] += len(tokens)
            state['documents'][split] += 1
            state['rows'] += 1
            row += 1
            if max_tokens and sum(state['tokens'].values()) >= max_tokens:
                return True
        progress.show(state)
    return False


def write_shards(build, shards, tokenizer, spec, val_frac, max_tokens, num_proc):
    """Tokenize every shard not yet done into the build; the state is saved after each shard."""
    state, dtype = build.state, token_dtype(tokenizer.vocab_size)
    if not state.get('done'):
        state.update(done=[], stopped=False, rows=0, tokens={'train': 0, 'val': 0}, documents={'train': 0, 'val': 0})
    files = open_streams(build, dtype)
    rows_known = [n for _, n, _ in shards]
    progress = Progress(None if None in rows_known else sum(rows_known), len(shards), max_tokens, state)
    pool = multiprocessing.Pool(num_proc, _init_worker, (spec,)) if num_proc > 1 else None
    try:
        def stream(rows):
            return encoded(rows, pool, tokenizer, depth=2 * num_proc)
        for name, _, rows in shards:
            if state['stopped'] or name in state['done']:
                continue
            state['stopped'] = write_shard(name, rows, stream, files, state, val_frac, max_tokens, progress)
            for f in files.values():  # the tokens on disk before the state that counts them
                f.flush()
                os.fsync(f.fileno())
            state['done'].append(name)
            build.save_state()
    finally:
        if pool is not None:
            pool.terminate()
        for f in files.values():
            f.close()
    progress.show(state, final=True)
    return state


def prepare(cfg, encoding=None):
    """encoding: a tiktoken.Encoding to use instead of --tokenizer (one built in code, e.g. by a test)."""
    spec = encoding or cfg.tokenizer
    tokenizer = get_tokenizer(spec)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / cfg.corpus / tokenizer.name
    shards = local_shards(cfg.input) if cfg.input else hub_shards(cfg)
    source = str(Path(cfg.input).expanduser().resolve()) if cfg.input else \
        f"hf:{cfg.hub_path}{'/' + cfg.hub_subset if cfg.hub_subset else ''}{'@' + cfg.hub_revision if cfg.hub_revision else ''}"
    key = {'source': source, 'shards': [s[0] for s in shards], 'tokenizer': tokenizer.name, 'vocab_size': tokenizer.vocab_size,
           'val_frac': cfg.val_frac, 'max_tokens': cfg.max_tokens}
    num_proc = cfg.num_proc or os.cpu_count() or 1
    with CorpusBuild(out_dir, resume_key=key) as build:
        if build.state.get('done'):
            print(f"resuming: {len(build.state['done'])} of {len(shards)} shards done", file=sys.stderr)
        try:
            state = write_shards(build, shards, tokenizer, spec, cfg.val_frac, cfg.max_tokens, num_proc)
        except KeyboardInterrupt:
            if build.state.get('done'):
                print(f"stopped: {len(build.state['done'])} finished shards are kept in {build.folder}; "
                      f'run the same command to resume', file=sys.stderr)
            raise
        for split in ('train', 'val'):
            if not state['documents'][split]:
                raise DataError(f'no documents landed in the {split} split: raise --val_frac (now {cfg.val_frac}) '
                                f'or --max_tokens (now {cfg.max_tokens})')
        counts = {s: {'documents': state['documents'][s], 'tokens': state['tokens'][s]} for s in ('train', 'val')}
        meta = corpus_meta(tokenizer, source, cfg.val_frac, counts,
                           {'shards': len(state['done']), 'max_tokens': cfg.max_tokens, 'config': asdict(cfg)})
        build.commit(meta)
    print(f"wrote {out_dir}: train {counts['train']['tokens']:,} tokens, val {counts['val']['tokens']:,} tokens "
          f"({len(state['done'])} shards, {tokenizer.name})")
    return out_dir


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
