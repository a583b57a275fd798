"""The shared data layer: tokenizers, writing a corpus, and batches from it.

A corpus is a folder holding train.bin and val.bin (flat token streams, np.memmap of uint16, or uint32
when the vocabulary needs it) and meta.json (tokenizer, vocab size, source, counts). meta.json is
written last, so a folder with meta.json is complete.

An *example* is the aligned chunk [k*T, k*T + T + 1) of a stream (T = block_size); its id is its
offset k*T in the stream. Aligned chunks mean an id names the same tokens forever, which is what
batch-selection methods need to key their caches (RHO-LOSS's irreducible losses, Rho-1's reference
losses). `Batches` walks the examples in a fresh seeded order each epoch; its whole state is
(epoch, position), so a checkpoint can resume the exact data order.
"""
import hashlib
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from configurator import UserError

DATA_ROOT = Path(__file__).resolve().parent


class DataError(UserError):
    """Bad or missing data: the message says what is wrong and how to fix it."""


# -----------------------------------------------------------------------------
# tokenizers

class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, needs nothing."""
    name, vocab_size, eot = 'byte', 256, None

    def encode(self, text):
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):
        return bytes(int(i) for i in ids if i < 256).decode('utf-8', errors='replace')


class TiktokenTokenizer:
    def __init__(self, name, enc):
        self.name, self.enc = name, enc
        self.vocab_size, self.eot = enc.n_vocab, enc.eot_token

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if i < self.vocab_size])


def get_tokenizer(name):
    if name == 'byte':
        return ByteTokenizer()
    try:
        import tiktoken
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # offline download failure, unknown name, missing package
        raise DataError(
            f"cannot load tokenizer '{name}' ({type(e).__name__}: {' '.join(str(e).split())[:80]}). tiktoken downloads an "
            f"encoding's files once, which needs network: on an offline machine copy a filled cache "
            f"there and set TIKTOKEN_CACHE_DIR, or use --tokenizer=byte") from None
    return TiktokenTokenizer(name, enc)


# -----------------------------------------------------------------------------
# writing a corpus (used by every data/*/prepare.py)

def is_val(name, val_frac):
    """Deterministic document-level split: a document is in val iff a hash of its name says so."""
    return zlib.crc32(name.encode('utf-8')) % 10_000 < val_frac * 10_000


def atomic_write(path, write):
    """write(f) into a temp file, fsync, rename: a reader never sees a half-written file, and a crash
    mid-write leaves the previous file intact (the temp file is removed on failure)."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def file_sha256(path):
    """The hex SHA-256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def write_corpus(out_dir, docs, tokenizer, source, val_frac=0.05, extra_meta=None):
    """Tokenize (name, text) documents into out_dir/{train,val}.bin + meta.json."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise DataError(f'cannot create the folder {out_dir} ({e.strerror}): give another --out_dir') from None
    (out_dir / 'meta.json').unlink(missing_ok=True)  # the folder is incomplete until we finish
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    sep = [] if tokenizer.eot is None else [tokenizer.eot]
    parts = {'train': [], 'val': []}
    for name, text in docs:
        parts['val' if is_val(name, val_frac) else 'train'].append(np.concatenate([tokenizer.encode(text), sep]))
    counts = {}
    for split, arrays in parts.items():
        if not arrays:
            raise DataError(f'no documents landed in the {split} split of {out_dir}: give more documents '
                            f'or change val_frac (now {val_frac})')
        tokens = np.concatenate(arrays).astype(dtype)
        atomic_write_bytes(out_dir / f'{split}.bin', tokens.tobytes())
        counts[split] = {'documents': len(arrays), 'tokens': int(len(tokens))}
    meta = {'tokenizer': tokenizer.name, 'vocab_size': tokenizer.vocab_size, 'dtype': np.dtype(dtype).name,
            'source': source, 'val_frac': val_frac, 'counts': counts,
            'python': sys.version.split()[0], **(extra_meta or {})}
    atomic_write_bytes(out_dir / 'meta.json', json.dumps(meta, indent=2).encode())
    return meta


# -----------------------------------------------------------------------------
# reading a corpus

def data_dir(dataset, tokenizer):
    """'stdlib' -> data/stdlib/byte; a folder that already holds meta.json is used as it is."""
    path = Path(dataset)
    if (path / 'meta.json').exists():
        return path
    return DATA_ROOT / dataset / tokenizer


def prepare_command(dataset, tokenizer):
    script = DATA_ROOT / dataset / 'prepare.py'
    if script.exists():
        return f'python {script.relative_to(DATA_ROOT.parent)} --tokenizer={tokenizer}'
    return f'python data/text/prepare.py --input=YOUR_TEXT --name={dataset} --tokenizer={tokenizer}'


class Corpus:
    """The token streams of one prepared corpus folder, as read-only memmaps."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / 'meta.json'
        if not meta_path.exists():
            raise DataError(f'no prepared corpus in {self.path} (meta.json missing)')
        try:
            self.meta = json.loads(meta_path.read_text())
            dtype = np.dtype(self.meta['dtype'])
            self.splits = {s: np.memmap(self.path / f'{s}.bin', dtype=dtype, mode='r') for s in ('train', 'val')}
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f'corpus in {self.path} is unreadable ({e}): delete the folder and prepare it again') from None
        for split, tokens in self.splits.items():
            if len(tokens) != self.meta['counts'][split]['tokens']:
                raise DataError(f'{self.path}/{split}.bin has {len(tokens)} tokens but meta.json says '
                                f"{self.meta['counts'][split]['tokens']}: delete the folder and prepare it again")
        self.vocab_size = self.meta['vocab_size']

    def fingerprint(self):
        """A short hash of the token streams: caches built from other data are refused by it."""
        h = hashlib.sha256(json.dumps(self.meta['counts'], sort_keys=True).encode())
        for tokens in self.splits.values():
            h.update(np.ascontiguousarray(tokens[:1 << 20]).tobytes())
        return h.hexdigest()[:16]


def num_examples(tokens, block_size):
    return (len(tokens) - 1) // block_size


def get_examples(tokens, ids, block_size):
    """ids: example ids (stream offsets). Returns x, y of shape (len(ids), block_size), int64."""
    offsets = np.asarray(ids, dtype=np.int64)[:, None] + np.arange(block_size + 1)
    chunk = torch.from_numpy(tokens[offsets].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


class Batches:
    """Aligned examples of a stream in a fresh seeded order each epoch.

    `examples` (example indices k, not ids) restricts the set, e.g. to leave out a holdout split.
    With DDP every rank draws the same global batch and keeps its own slice, so ranks never overlap.
    """

    def __init__(self, tokens, block_size, seed, examples=None, rank=0, world_size=1):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        n = num_examples(tokens, block_size)
        self.examples = torch.arange(n) if examples is None else torch.as_tensor(examples, dtype=torch.int64)
        if len(self.examples) == 0:
            raise DataError(f'block_size={block_size} is larger than the data ({len(tokens)} tokens): '
                            f'lower --block_size or use a bigger corpus')
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos, self._order = 0, 0, None

    def _epoch_order(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = self.examples[torch.randperm(len(self.examples), generator=g)]
        return self._order

    def next_ids(self, n):
        """The ids of this rank's next n examples (wrapping into a new epoch when one runs out)."""
        need, picked = n * self.world_size, []
        while need > 0:
            order = self._epoch_order()
            take = order[self.pos:self.pos + need]
            picked.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        ids = torch.cat(picked)[self.rank * n:(self.rank + 1) * n] * self.block_size
        return ids

    def next(self, n):
        ids = self.next_ids(n)
        x, y = get_examples(self.tokens, ids.numpy(), self.block_size)
        return x, y, ids

    def state_dict(self):
        return {'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._order = state['epoch'], state['pos'], None


def val_ids(tokens, block_size, n):
    """A fixed, evenly spread set of n validation example ids (all of them if there are fewer)."""
    total = num_examples(tokens, block_size)
    if total == 0:
        raise DataError(f'block_size={block_size} is larger than the val split ({len(tokens)} tokens): '
                        f'lower --block_size or use a bigger corpus')
    return np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64)) * block_size
