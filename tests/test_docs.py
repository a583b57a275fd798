"""The user guide, the results and the method cards link to what exists: every relative link in a markdown
file of the repository names a file that is there, and every #anchor a heading of its target (GitHub's
anchors: the heading in lower case, punctuation but - and _ dropped, spaces as -)."""
import re
import subprocess

import pytest

from conftest import ROOT

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
TEMPLATE = ROOT / 'studies' / 'results.in.md'  # RESULTS.md's source: its links are checked in RESULTS.md


def tracked_markdown():
    """The repository's markdown files (git's list: never a study's output or a cache on this machine)."""
    try:
        names = subprocess.run(['git', 'ls-files', '*.md'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout: the repository\'s markdown files are git\'s list', allow_module_level=True)
    return sorted(p for p in (ROOT / n for n in names.splitlines()) if p != TEMPLATE)


DOCS = tracked_markdown()


def anchors(path):
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        fenced ^= line.startswith('```')
        if not fenced and re.match(r'#{1,6} ', line):
            found.add(re.sub(r'[^\w\- ]', '', line.lstrip('#').strip().lower()).replace(' ', '-'))
    return found


def broken_links(doc, root=ROOT):
    for target in LINK.findall(doc.read_text()):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, mailto: ...: not checked here (no network)
            continue
        path, _, anchor = target.partition('#')
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.is_relative_to(root.resolve()):
            yield f'{target} (outside the repository)'
        elif not linked.exists():
            yield f'{target} (no such file)'
        elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
            yield f'{target} (no heading with that anchor)'


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert list(broken_links(doc)) == []


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / 'a.md').write_text('# A title, with punctuation\n')
    doc = tmp_path / 'b.md'
    doc.write_text('[ok](a.md#a-title-with-punctuation) [self](#) [gone](nope.md) [bad](a.md#other) [web](https://x.org/y) '
                   '[out](../b.md)\n')
    assert list(broken_links(doc, tmp_path)) == ['nope.md (no such file)', 'a.md#other (no heading with that anchor)',
                                       '../b.md (outside the repository)']
