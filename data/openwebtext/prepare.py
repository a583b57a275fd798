"""OpenWebText (Skylion007/openwebtext, the corpus nanoGPT reproduces GPT-2 on) as a tokenized corpus.

The same shard pipeline as data/fineweb_edu/prepare.py (parallel tiktoken, end-of-text between
documents, a document-hash val split, --max_tokens, resumable per shard, swapped in when complete);
only the source differs. Streaming needs `pip install datasets`; --input reads local .parquet, .jsonl or
.jsonl.gz shards instead (a folder, one file or a quoted glob). nanoGPT's own train.bin/val.bin of this
corpus import as they are: data/import_bins.py.

    python data/openwebtext/prepare.py                       # -> data/openwebtext/gpt2/
    python data/openwebtext/prepare.py --input=~/owt_parquet
    python data/import_bins.py --input=~/nanoGPT/data/openwebtext --out_dir=data/openwebtext/gpt2
    python train.py config/gpt2_124m.py --dataset=openwebtext

The Hub repository was a loading script, which datasets >= 4 no longer runs: if opening it fails that
way, --hub_revision=refs/convert/parquet streams the Hub's automatic parquet export (check on the dataset
page that the export is complete), or download the data elsewhere and pass --input.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import cli  # noqa: E402
from data.fineweb_edu.prepare import PrepareConfig as FineWebEduConfig, prepare  # noqa: E402


@dataclass(frozen=True)
class PrepareConfig(FineWebEduConfig):
    val_frac: float = 0.0005                     # fraction of documents in val (nanoGPT's test_size)
    hub_path: str = 'Skylion007/openwebtext'     # the Hub dataset streamed when --input is ''
    hub_subset: str = ''                         # its config name ('' = the default one)
    hub_revision: str = ''                       # a branch or commit ('' = main; see the docstring)

    corpus = 'openwebtext'  # the folder under data/


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
