"""The embedded default corpus: the running Python's own standard library, needing no network.

Documents are the stdlib's .py sources (test folders and site-packages left out) and the pydoc topic
texts, in sorted order; a hash of each document's name puts about 5% of them in val.

    python data/stdlib/prepare.py                     # byte tokenizer -> data/stdlib/byte/
    python data/stdlib/prepare.py --tokenizer=gpt2    # tiktoken's gpt2 -> data/stdlib/gpt2/
"""
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import DATA_ROOT, NAME_RE, get_tokenizer, write_corpus  # noqa: E402

SKIP_PARTS = {'test', 'tests', 'idle_test', 'site-packages', '__pycache__'}


@dataclass(frozen=True)
class PrepareConfig:
    tokenizer: str = 'byte'  # 'byte' or a tiktoken encoding name (gpt2, cl100k_base, ...)
    val_frac: float = 0.05   # fraction of documents (by name hash) in val
    out_dir: str = ''        # '' = data/stdlib/<tokenizer>

    def __post_init__(self):
        require(0 < self.val_frac < 1, f'--val_frac must be in (0, 1), got {self.val_frac}')
        require(NAME_RE.fullmatch(self.tokenizer), f"--tokenizer must be 'byte' or an encoding's name, got '{self.tokenizer}'")


def stdlib_documents():
    """(name, text) for every stdlib source file and pydoc topic, in a fixed order."""
    root = Path(sysconfig.get_paths()['stdlib'])
    files = sorted(p for p in root.rglob('*.py') if not SKIP_PARTS & set(p.relative_to(root).parts))
    for path in files:
        yield path.relative_to(root).as_posix(), path.read_text(encoding='utf-8', errors='replace')
    from pydoc_data.topics import topics
    for key in sorted(topics):
        yield f'pydoc_data/topics/{key}', topics[key]


def prepare(cfg, if_missing=False):
    """if_missing (train.py's first use): wait for a parallel run's prepare of it and keep what it built."""
    out_dir = cfg.out_dir or DATA_ROOT / 'stdlib' / cfg.tokenizer
    tokenizer = get_tokenizer(cfg.tokenizer)
    meta = write_corpus(out_dir, stdlib_documents(), tokenizer, source='python stdlib + pydoc topics',
                        val_frac=cfg.val_frac, if_missing=if_missing)
    print(f"wrote {out_dir}: train {meta['counts']['train']['tokens']:,} tokens, "
          f"val {meta['counts']['val']['tokens']:,} tokens ({cfg.tokenizer})")
    return out_dir


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
