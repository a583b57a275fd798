"""The shared data layer: tokenizers, writing a corpus, reading it back checked, batches.

A corpus is a folder holding train.bin and val.bin (flat token streams, np.memmap of uint16, or uint32
when the vocabulary needs it) and meta.json (tokenizer, vocab size, source, counts). A corpus is built
in a folder beside its target and swapped in only when complete and checked (CorpusBuild), meta.json
last, so a folder with meta.json is complete and a failed re-prepare leaves the old corpus as it was.

An *example* is the aligned chunk [k*T, k*T + T + 1) of a stream (T = block_size); its id is its
offset k*T in the stream. Aligned chunks mean an id names the same tokens forever, which is what
batch-selection methods need to key their caches (RHO-LOSS's irreducible losses, Rho-1's reference
losses). `Batches` walks the examples in a fresh seeded order each epoch; its whole state is
(epoch, position), so a checkpoint can resume the exact data order.
"""
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import stat
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from configurator import UserError

DATA_ROOT = Path(__file__).resolve().parent
TOKEN_DTYPES = ('uint16', 'uint32')
REPREPARE = 'delete the folder and prepare it again'


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
    """'byte', a tiktoken encoding's name, or a tiktoken.Encoding object (one built in code, e.g. by a test)."""
    if name == 'byte':
        return ByteTokenizer()
    if not isinstance(name, str):  # an Encoding: its end-of-text token separates documents
        return TiktokenTokenizer(name.name, name)
    try:
        import tiktoken
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # offline download failure, unknown name, missing package
        raise DataError(
            f"cannot load tokenizer '{name}' ({type(e).__name__}: {' '.join(str(e).split())[:80]}). tiktoken downloads an "
            f"encoding's files once, which needs network: on an offline machine copy a filled cache "
            f"there and set TIKTOKEN_CACHE_DIR, or use --tokenizer=byte") from None
    return TiktokenTokenizer(name, enc)


def token_dtype(vocab_size):
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# -----------------------------------------------------------------------------
# writing a corpus (used by every data/*/prepare.py)

def is_val(name, val_frac):
    """Deterministic document-level split: a document is in val iff a hash of its name says so. A name
    with a lone surrogate (a JSON id "\\ud800", an undecodable file name) hashes by its surrogate's code."""
    return zlib.crc32(name.encode('utf-8', 'surrogatepass')) % 10_000 < val_frac * 10_000


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


class FolderLock:
    """An exclusive lock on a file (an flock, holding the owner's pid): a second process refuses with
    busy(pid); the kernel frees a dead holder's lock (kill -9), so a stale lock file is simply taken over.
    Shared by corpus builds and run folders (train.py's out_dir)."""

    def __init__(self, path, busy):
        self.path, self.busy, self.fd = Path(path), busy, None

    @property
    def held(self):
        return self.fd is not None

    def acquire(self, wait=False):
        """Take the lock; held by another process: raise busy(pid), or with wait block until it is free."""
        while True:
            try:  # never through a link: taking the lock must not truncate a file it points to
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except FileNotFoundError:  # a failed build we waited for removed the folder it had made: make it again
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise DataError(f'{self.path} is a symbolic link, where a lock file belongs: remove the link') from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise DataError(f'{self.path} is not a regular file, where a lock file belongs: remove it')
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors='replace').strip() or '?'
                if not wait:
                    os.close(fd)
                    raise self.busy(holder) from None
                print(f'{self.busy(holder)}: waiting for it', file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self.fd = fd
        return self

    def release(self):
        os.unlink(self.path)  # before unlocking: a waiter that opened this file retries
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(path):
    """The pid written in a lock file (FolderLock) a live process holds, or None where it is free or absent.
    The lock is only tried, never taken over: nothing is written to the file, and it is not removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors='replace').strip() or '?'
    finally:
        os.close(fd)


class CorpusBuild:
    """A corpus under construction in a folder beside its target (.NAME.build), swapped in by commit().

    The target keeps its old corpus untouched until commit() has the new one complete and checked by
    the same checks a reader makes. A lock beside it (.NAME.lock, an flock, so a dead holder's lock is
    free again) makes a second prepare of the same corpus refuse instead of interleaving. On failure the
    build folder is removed, unless the build is resumable (resume_key given) and has saved its `state`
    (save_state, e.g. after each finished shard): then the next run with the same key resumes from it.
    An OSError inside (disk full, read-only folder) becomes one DataError line. The swap is a few
    renames; a kill -9 inside them leaves the target without meta.json (refused, rebuilt by the next
    prepare), never a mix of old and new."""

    def __init__(self, out_dir, resume_key=None, if_missing=False):
        self.target, self.if_missing, self.exists = Path(out_dir), if_missing, False
        self.folder = self.target.parent / f'.{self.target.name}.build'
        self.lock_path = self.target.parent / f'.{self.target.name}.lock'
        self.resume_key, self.state, self.committed, self.made = resume_key, {}, False, []
        self.lock = FolderLock(self.lock_path, lambda pid: DataError(
            f'another prepare (pid {pid}) is writing {self.target}: wait for it to end, then run again'))

    def __enter__(self):
        if self.target.exists() and not self.target.is_dir():
            raise DataError(f'{self.target} is a file, not a corpus folder: give another --out_dir')
        if self.target.is_dir() and not os.access(self.target, os.W_OK):  # found now, not after the build
            raise DataError(f'{self.target} is not writable: fix its permissions or give another --out_dir')
        self.made = []  # the folders this build created above the target: removed again if it fails and they are empty
        try:
            for folder in reversed((self.target.parent, *self.target.parent.parents)):
                if not folder.exists():
                    try:
                        folder.mkdir()
                        self.made.insert(0, folder)
                    except FileExistsError:  # another process made it just now: its, not ours
                        pass
            self.lock.acquire(wait=self.if_missing)
            self.exists = self.if_missing and (self.target / 'meta.json').exists()  # built while we waited
            if not self.exists:
                self._start()
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def _start(self):
        state_path = self.folder / 'state.json'
        if self.resume_key is not None and state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except ValueError:
                state = {}
            if isinstance(state, dict) and state.get('key') == self.resume_key:
                self.state = state
                return
            print(f'{self.folder} was built with other settings: starting over', file=sys.stderr)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        self.state = {'key': self.resume_key}

    def save_state(self):
        atomic_write_bytes(self.folder / 'state.json', json.dumps(self.state).encode())

    def commit(self, meta):
        """meta.json into the build, the reader's checks, then the files into the target, meta.json last."""
        atomic_write_bytes(self.folder / 'meta.json', json.dumps(meta, indent=2).encode())
        Corpus(self.folder)
        (self.folder / 'state.json').unlink(missing_ok=True)
        self.target.mkdir(exist_ok=True)
        (self.target / 'meta.json').unlink(missing_ok=True)  # the target is incomplete from here ...
        for stale in self.target.glob('*.tmp[0-9]*'):
            stale.unlink()
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name == 'meta.json'):  # ... to the last rename
            os.replace(path, self.target / path.name)
        self.committed = True

    def __exit__(self, kind, exc, tb):
        keep = self.resume_key is not None and not self.committed and (self.folder / 'state.json').exists()
        if self.lock.held:  # only the lock's holder may touch the build folder
            if not keep:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.lock.release()
        if kind is not None:  # a failed first build leaves no empty data/text/<name>/ behind
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # not empty (another build's lock or corpus), or gone: keep it
                    break
        if kind is not None and issubclass(kind, OSError):
            where = (f'the finished part is kept in {self.folder}: run again to resume' if keep
                     else 'nothing was changed there; free disk space, fix permissions or give another --out_dir')
            raise DataError(f'writing the corpus {self.target} failed ({exc.strerror or exc}): {where}') from None
        return False


def built_source(folder):
    """The source a corpus folder's meta.json names; None where it has none readable (a damaged corpus: replaceable)."""
    try:
        meta = json.loads((Path(folder) / 'meta.json').read_text())
    except (OSError, ValueError):
        return None
    return meta.get('source') if isinstance(meta, dict) else None


def corpus_meta(tokenizer, source, val_frac, counts, extra_meta=None):
    return {'tokenizer': tokenizer.name, 'vocab_size': tokenizer.vocab_size,
            'dtype': token_dtype(tokenizer.vocab_size).name, 'source': source, 'val_frac': val_frac,
            'counts': counts, 'python': sys.version.split()[0], **(extra_meta or {})}


def split_documents(docs, val_frac, out_dir, more='give more documents', fallback=False):
    """{'train': [text], 'val': [text]} by is_val, checked before anything is tokenized: each split needs a
    document with text. fallback: a split the hash left empty takes the other's last document, where that
    leaves it one (as the shards prepares do; mathmix's kinds.bin follows the hash split, so not there)."""
    splits = {'train': [], 'val': []}
    for name, text in docs:
        splits['val' if is_val(name, val_frac) else 'train'].append(text)
    empty = [split for split, texts in splits.items() if not any(texts)]
    donor = {'val': 'train', 'train': 'val'}[empty[0]] if fallback and len(empty) == 1 else None
    if donor and sum(map(bool, splits[donor])) >= 2:
        last = max(i for i, text in enumerate(splits[donor]) if text)
        splits[empty[0]].append(splits[donor].pop(last))
        print(f'the hash split left {empty[0]} without a document: the last {donor} document goes there', file=sys.stderr)
    for split, texts in splits.items():
        if not any(texts):
            n = len(splits['train']) + len(splits['val'])
            raise DataError(f'no documents landed in the {split} split of {out_dir} ({n} in all, val_frac '
                            f'{val_frac}): {more} or change val_frac')
    return splits


def write_corpus(out_dir, docs, tokenizer, source, val_frac=0.05, extra_meta=None, extra_files=None, if_missing=False,
                 more='give more documents', other_source='', fallback=False):
    """Tokenize (name, text) documents into out_dir/{train,val}.bin + meta.json, built beside out_dir and
    swapped in whole (CorpusBuild). extra_files: {file name: bytes} that belong to the corpus and are
    swapped in with it (e.g. mathmix's noise.bin), so they can never disagree with it. if_missing: wait
    for another process's build of it and keep a corpus out_dir already has (the loop's first use).
    more: how to add documents, for the error when a split would be empty. other_source: how to go on, for
    the error when out_dir holds a corpus built from another source ('' = replace it), checked under the lock.
    fallback: split_documents gives a split the hash left empty a document of the other's."""
    with CorpusBuild(out_dir, if_missing=if_missing) as build:
        if build.exists:
            return Corpus(out_dir).meta
        built = built_source(out_dir)
        if other_source and built not in (None, source):
            raise DataError(f'{out_dir} already holds a corpus built from {built}: {other_source}')
        splits = split_documents(docs, val_frac, out_dir, more, fallback)
        sep = [] if tokenizer.eot is None else [tokenizer.eot]
        counts = {}
        for split, texts in splits.items():
            arrays = [np.concatenate([tokenizer.encode(text), sep]) for text in texts]
            tokens = np.concatenate(arrays).astype(token_dtype(tokenizer.vocab_size))
            atomic_write_bytes(build.folder / f'{split}.bin', tokens.tobytes())
            counts[split] = {'documents': len(arrays), 'tokens': int(len(tokens))}
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(build.folder / name, data)
        meta = corpus_meta(tokenizer, source, val_frac, counts, extra_meta)
        build.commit(meta)
    return meta


# -----------------------------------------------------------------------------
# reading a corpus

NAME_RE = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*')  # a corpus name: one folder, never '..' or a path


def data_dir(dataset, tokenizer):
    """'stdlib' -> data/stdlib/byte; a folder that already holds meta.json is used as it is."""
    path = Path(dataset)
    if (path / 'meta.json').exists():
        return path
    return DATA_ROOT / dataset / tokenizer


def file_as_dataset(dataset, tokenizer):
    """Why --dataset naming a file is no corpus, and the fix: a text file is prepared once (data/text/prepare.py)
    and named text/<name> after; anything else (a checkpoint, a .bin) is not a corpus at all."""
    with open(dataset, 'rb') as f:
        head = f.read(4096)
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a character cut at the 4096th byte: binary
            return (f'--dataset={dataset} is a file, not a prepared corpus: give a corpus folder (with meta.json) or '
                    'a name under data/, e.g. --dataset=stdlib')
    if re.search(r'[*?[]', dataset):  # prepare.py's --input would read the name as a glob pattern
        return (f'--dataset={dataset} is a file, not a prepared corpus, and its name has a glob character (* ? [) '
                'that data/text/prepare.py --input reads as a pattern: copy it to a plain name, then prepare that')
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', Path(dataset).stem)
    name = name if NAME_RE.fullmatch(name) else 'mine'
    return (f'--dataset={dataset} is a file, not a prepared corpus: prepare it with `python data/text/prepare.py '
            f'--input={shlex.quote(dataset)} --name={name} --tokenizer={tokenizer}`, then give --dataset=text/{name}')


def prepare_command(dataset, tokenizer):
    """A command that prepares the corpus data_dir(dataset, tokenizer) looks for."""
    parts = Path(dataset).parts
    if parts and parts[0] != 'text' and NAME_RE.fullmatch(parts[0]) and (DATA_ROOT / parts[0] / 'prepare.py').exists():
        return f'python data/{parts[0]}/prepare.py' + (f' --tokenizer={tokenizer}' if len(parts) == 1 else '')
    if len(parts) == 2 and parts[0] == 'text' and NAME_RE.fullmatch(parts[1]):
        return f'python data/text/prepare.py --input=YOUR_TEXT --name={parts[1]} --tokenizer={tokenizer}'
    out = data_dir(dataset, tokenizer).resolve()
    shown = out.relative_to(DATA_ROOT.parent) if out.is_relative_to(DATA_ROOT.parent) else out
    return f'python data/text/prepare.py --input=YOUR_TEXT --tokenizer={tokenizer} --out_dir={shown}'


def read_json(path):
    """A JSON file's object, or {} when it is missing or unreadable (for caches, which are rebuilt)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


NUMBER = (int, float)  # a JSON number; as a kind read_result asks of a field, a finite one


def is_number(value):
    """A finite JSON number: true is no number, and NaN or infinity no result a report can average."""
    return isinstance(value, NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def of_kind(value, kind):
    """Whether a result's field is of kind: NUMBER a finite number, int an integer (not a bool), else isinstance."""
    return is_number(value) if kind is NUMBER else type(value) is int if kind is int else isinstance(value, kind)


def read_result(path, keys, fix):
    """The JSON object an earlier stage wrote at path (a result, done.json, a cache's sidecar), holding
    keys ({name: kind}, of_kind); else DataError, one line naming the file and `fix`. The checked reader of
    what the methods' stages wrote: read_json gives {} for a file that does not parse or holds no object."""
    saved = read_json(path)
    wrong = [name for name, kind in keys.items() if not (name in saved and of_kind(saved[name], kind))]
    if wrong:
        what = ('missing' if not Path(path).is_file() else 'not a readable JSON object' if not saved else
                f"damaged (no valid {', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")
        raise DataError(f'{path} is {what}: {fix}')
    return saved


def meta_problem(meta):
    """What is wrong with a parsed meta.json for a reader (None when nothing is)."""
    if not isinstance(meta, dict):
        return f'holds a JSON {type(meta).__name__}, not an object'
    missing = [k for k in ('tokenizer', 'vocab_size', 'dtype', 'counts') if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    vocab_size, dtype = meta['vocab_size'], meta['dtype']
    if not isinstance(meta['tokenizer'], str):
        return f"has tokenizer {meta['tokenizer']!r}, not a name"
    if type(vocab_size) is not int or vocab_size < 1:
        return f'has vocab_size {vocab_size!r}, not a positive integer'
    if not isinstance(dtype, str) or dtype not in TOKEN_DTYPES:
        return f"has dtype {dtype!r}, not one of {', '.join(TOKEN_DTYPES)}"
    if vocab_size > np.iinfo(dtype).max + 1:
        return f'has vocab_size {vocab_size}, too large for dtype {dtype}'
    for split in ('train', 'val'):
        count = meta['counts'].get(split) if isinstance(meta['counts'], dict) else None
        tokens = count.get('tokens') if isinstance(count, dict) else None
        if type(tokens) is not int or tokens < 1:
            return f'has no positive token count counts.{split}.tokens (got {tokens!r})'
    return None


def read_meta(folder):
    path = Path(folder) / 'meta.json'
    if not path.exists():
        raise DataError(f'no prepared corpus in {folder} (meta.json missing)')
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:80]}): {REPREPARE}") from None
    problem = meta_problem(meta)
    if problem:
        raise DataError(f'{path} {problem}: {REPREPARE}')
    return meta


class Corpus:
    """The token streams of one prepared corpus folder, as read-only memmaps, checked before use:
    meta.json's keys and types, each file's size against its token count and dtype, and every token
    below vocab_size (a lying dtype or vocab_size shows there). The token scan is remembered in
    checked.json by the files' identity, so a large corpus pays it once."""

    def __init__(self, path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.vocab_size = self.meta['vocab_size']
        dtype = np.dtype(self.meta['dtype'])
        self.splits = {s: self._stream(s, dtype) for s in ('train', 'val')}
        self._check_token_range()

    def _stream(self, split, dtype):
        file, n = self.path / f'{split}.bin', self.meta['counts'][split]['tokens']
        size = file.stat().st_size if file.is_file() else None
        if size != n * dtype.itemsize:
            has = 'is missing' if size is None else f'holds {size:,} bytes'
            raise DataError(f'{file} {has}, but meta.json says {n:,} {dtype.name} tokens ({n * dtype.itemsize:,} '
                            f'bytes): {REPREPARE}')
        try:
            return np.memmap(file, dtype=dtype, mode='r')
        except OSError as e:
            raise DataError(f'cannot read {file} ({e.strerror}): {REPREPARE}') from None

    def identity(self):
        """Names these exact files: meta.json's bytes and each stream's size, mtime and inode. A
        re-prepared corpus has new files, so a cache keyed by this is rebuilt."""
        h = hashlib.sha256((self.path / 'meta.json').read_bytes())
        for split in ('train', 'val'):
            st = os.stat(self.path / f'{split}.bin')
            h.update(f'{split}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino};'.encode())
        return h.hexdigest()[:16]

    def _check_token_range(self):
        """Every token below vocab_size, and the fingerprint of every token, in one pass over the streams,
        remembered in checked.json under the files' identity."""
        cache, identity = self.path / 'checked.json', self.identity()
        saved = read_json(cache)
        if saved.get('identity') == identity and re.fullmatch(r'[0-9a-f]{16}', str(saved.get('fingerprint'))):
            self._fingerprint = saved['fingerprint']
            return
        h = hashlib.sha256(json.dumps(self.meta['counts'], sort_keys=True).encode())
        for split, tokens in self.splits.items():
            top = 0
            for i in range(0, len(tokens), 1 << 24):
                chunk = np.ascontiguousarray(tokens[i:i + (1 << 24)])
                top = max(top, int(chunk.max()))
                h.update(memoryview(chunk))
            if top >= self.vocab_size:
                raise DataError(f'{self.path}/{split}.bin holds token id {top} but vocab_size is {self.vocab_size} '
                                f'(a wrong dtype or vocab_size in meta.json?): {REPREPARE}')
        self._fingerprint = h.hexdigest()[:16]
        try:
            atomic_write_bytes(cache, json.dumps({'identity': identity, 'fingerprint': self._fingerprint}).encode())
        except OSError:
            pass  # a read-only corpus folder: checked again next time

    def fingerprint(self, whole=True):
        """A short hash of the token streams, every token of them: a resume, and the caches built from the data,
        are refused on any other. whole=False: of the first 2**20 tokens of each split, as checkpoints saved
        before 2026-12-07 named their corpus (a resume of one compares that; an edit past them went unseen)."""
        if whole:
            return self._fingerprint
        h = hashlib.sha256(json.dumps(self.meta['counts'], sort_keys=True).encode())
        for tokens in self.splits.values():
            h.update(np.ascontiguousarray(tokens[:1 << 20]).tobytes())
        return h.hexdigest()[:16]

    def as_named(self, saved):
        """The fingerprint to compare a record's saved one with: saved itself where it names this corpus the way
        records before whole-stream fingerprints did, else the whole-stream one (a checkpoint, a cache's sidecar)."""
        return saved if saved == self.fingerprint(whole=False) else self.fingerprint()


def num_examples(tokens, block_size):
    return (len(tokens) - 1) // block_size


def get_examples(tokens, ids, block_size):
    """ids: example ids (stream offsets). Returns x, y of shape (len(ids), block_size), int64."""
    offsets = np.asarray(ids, dtype=np.int64)[:, None] + np.arange(block_size + 1)
    chunk = torch.from_numpy(tokens[offsets].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


EPOCH_SEEDS = 1_000_003  # an epoch's order: a generator seeded with seed * EPOCH_SEEDS + epoch, which torch takes below 2**64
MAX_SEED = (2**64 - 1) // EPOCH_SEEDS - 1  # the largest seed that leaves room for a million epochs (every entry point's)


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
            g = torch.Generator().manual_seed(self.seed * EPOCH_SEEDS + self.epoch)
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
        epoch, pos = state['epoch'], state['pos']
        if not (is_count(epoch) and is_count(pos) and pos < len(self.examples)):  # a position past the end loops forever
            raise ValueError(f'data position epoch={epoch!r} pos={pos!r} is not a place in this data '
                             f'({len(self.examples):,} examples an epoch)')
        self.epoch, self.pos, self._order = epoch, pos, None


def is_count(value):
    """A non-negative int (a step, an epoch, a position), never a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def val_ids(tokens, block_size, n):
    """A fixed, evenly spread set of n validation example ids (all of them if there are fewer)."""
    total = num_examples(tokens, block_size)
    if total == 0:
        raise DataError(f'block_size={block_size} is larger than the val split ({len(tokens)} tokens): '
                        f'lower --block_size or use a bigger corpus')
    return np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64)) * block_size
