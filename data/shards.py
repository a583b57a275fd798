"""Local input files for the prepare scripts: resolving --input, reading shards, naming a shard's identity.

--input is one of: a folder (every matching file under it, recursively), a single file, or a glob
(`--input='shards/*.jsonl.gz'`, `**` matches folders too; the matching files it names). Relative paths
and patterns are read from the folder the command was started in, exactly as written (and `~` is
expanded). Files come back sorted by their name, which is their path relative to a base: the folder
itself, a single file's folder, or a glob's leading part without wildcards. So `--input=shards` and
`--input='shards/**/*.jsonl'` give a file the same name, and so the same place and split.

Shards are .parquet (pyarrow), .jsonl or .jsonl.gz files whose rows hold a `text` string and an optional
`id`. A damaged shard is one line naming it (and its line, for jsonl); a truncated .jsonl.gz is found
while the shards are listed, before anything is tokenised. Lone surrogates that JSON can spell
("\\ud800") are left in the text here; the tokenising side replaces them (data/fineweb_edu/prepare.py).
"""
import glob
import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from data.loader import DataError

SHARD_SUFFIXES = ('.parquet', '.jsonl', '.jsonl.gz')
GZIP_ERRORS = (OSError, EOFError, zlib.error)  # EOFError: truncated .gz; zlib.error: damaged deflate data
HEAD_BYTES = 1 << 20  # how much of a file its identity hashes: cheap, and catches a same-size replacement


# -----------------------------------------------------------------------------
# --input: a folder, a file or a glob

def has_wildcards(text):
    return any(c in text for c in '*?[')


def glob_base(pattern):
    """The leading folders of a pattern that hold no wildcard: 'a/b/*/c*.gz' -> 'a/b', '*.gz' -> '.'."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if has_wildcards(part))
    return Path(*parts[:fixed]) if fixed else Path('.')


def find_inputs(pattern, keep, what):
    """[(name, path)] of the files --input=pattern names that keep(path) accepts, sorted by name. A single
    file that keep refuses is an error; `what` names the files wanted ('.parquet, .jsonl or .jsonl.gz shards')."""
    if not pattern:
        raise DataError(f'--input is empty: give a folder, a file or a quoted glob of {what}')
    expanded, here = os.path.expanduser(pattern), os.getcwd()
    if has_wildcards(expanded):
        base, paths = glob_base(expanded), [Path(p) for p in glob.glob(expanded, recursive=True)]
    else:
        path = Path(expanded)
        if not path.exists():
            raise DataError(f'--input={pattern} does not exist (a relative path is read from {here}): '
                            f'give a folder, a file or a quoted glob of {what}')
        if path.is_file() and not keep(path):
            raise DataError(f'--input={pattern} is not one of {what}: give one of those, or their folder')
        base, paths = (path, path.rglob('*')) if path.is_dir() else (path.parent, [path])
    files = [p for p in paths if p.is_file() and keep(p)]
    if not files:
        shown = f"--input='{pattern}' (read from {here})" if has_wildcards(expanded) else f'--input={pattern}'
        raise DataError(f'{shown} holds no {what}')
    return sorted((p.relative_to(base).as_posix(), p) for p in files)


def input_source(pattern):
    """The absolute form of --input, as meta.json records it (a glob keeps its wildcards)."""
    return os.path.abspath(os.path.expanduser(pattern))


def file_identity(path):
    """What names a file's content cheaply: size, modification time and a hash of its first MiB. A shard
    replaced or edited since a prepare stopped has another identity, so its finished part is not reused."""
    st = os.stat(path)
    with open(path, 'rb') as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()[:16]
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'head_sha256': head}


# -----------------------------------------------------------------------------
# shards

class Shard(NamedTuple):
    name: str                    # its name in the corpus: documents without an id are named name:row
    n_rows: Optional[int]        # rows in it, when known before reading (for the progress line)
    read: Callable               # read() -> an iterator of (doc id or None, text)
    identity: dict               # what a resumed prepare compares before reusing its finished part
    path: Optional[Path] = None  # the local file (None for a Hub shard)


def local_shards(pattern):
    """The shards --input names, each opened (and counted) once, so a damaged one stops the prepare
    before anything is tokenised."""
    files = find_inputs(pattern, lambda p: p.name.endswith(SHARD_SUFFIXES), '.parquet, .jsonl or .jsonl.gz shards')
    return [Shard(name, *(parquet_shard(p) if p.suffix == '.parquet' else jsonl_shard(p)), file_identity(p), p)
            for name, p in files]


def parquet_shard(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError('reading .parquet shards needs pyarrow: pip install datasets (it brings pyarrow)') from None
    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f'{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:80]}): '
                        f'download it again or leave it out of --input') from None
    if 'text' not in meta.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(meta.schema_arrow.names)[:80]})")
    columns = ['text'] + (['id'] if 'id' in meta.schema_arrow.names else [])

    def rows():
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns):
                ids = batch.column('id').to_pylist() if 'id' in columns else [None] * batch.num_rows
                yield from zip(ids, batch.column('text').to_pylist())
        except (OSError, ValueError) as e:  # a row group damaged past the footer (pyarrow's errors subclass these)
            raise DataError(f'{path} is damaged ({type(e).__name__}: {str(e)[:80]}): download it again') from None
    return meta.metadata.num_rows, rows


def jsonl_shard(path):
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            n_rows = sum(1 for line in f if line.strip())
    except GZIP_ERRORS as e:
        raise unreadable(path, e) from None

    def rows():
        try:
            with opener(path, 'rb') as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield jsonl_record(line, path, n)
        except GZIP_ERRORS as e:  # changed on disk since it was listed
            raise unreadable(path, e) from None
    return n_rows, rows


def unreadable(path, e):
    """The one line for a shard that cannot be read to its end (a truncated or damaged .gz, a read error)."""
    if isinstance(e, EOFError):
        why = 'a truncated .gz: it ends before its end-of-stream marker'
    else:
        why = f'{type(e).__name__}: {e.strerror or e}' if isinstance(e, OSError) else f'damaged .gz data: {e}'
    return DataError(f'cannot read {path} ({why}): download it again or leave it out of --input')


def jsonl_record(line, path, n):
    """(id, text) of line n; a line that is not UTF-8 or not an object with a 'text' is one error naming it."""
    try:
        text = line.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}:{n} is not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}): '
                        f're-encode that shard as UTF-8') from None
    try:
        record = json.loads(text.lstrip('\ufeff') if n == 1 else text)  # a byte-order mark may open the file
        return record.get('id'), record['text']
    except (ValueError, KeyError, AttributeError, TypeError):
        raise DataError(f"{path}:{n} is not a JSON object with a 'text' string: fix or remove that line") from None
