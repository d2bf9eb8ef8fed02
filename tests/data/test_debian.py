"""jlora.data.debian: a text corpus from a Debian package, offline."""

import pytest

from jlora.data import sources


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("apt-get"), reason="needs a Debian system")
def test_fetch_the_fortunes_corpus_from_debian(tmp_path):
  from jlora.data import debian
  out = debian.fetch("fortunes", str(tmp_path))
  corpus = sources.open_source(out, separator=debian.separator("fortunes"))
  assert len(corpus) > 1000
  assert all("\n%\n" not in corpus[i]["text"] for i in range(0, len(corpus), 97))
