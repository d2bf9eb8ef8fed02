"""jlora.study.assets: the text split is disjoint, deterministic and by content."""

import json

from jlora.study import assets


def test_text_split_is_disjoint_deterministic_and_by_content(tmp_path, monkeypatch):
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache"))
  corpus = tmp_path / "cache" / "corpora" / "fortunes"
  corpus.mkdir(parents=True)
  docs = [f"saying number {i}: {'x' * (i % 7 + 1)}" for i in range(400)]
  (corpus / "a").write_text("\n%\n".join(docs[:250]) + "\n%\n")
  (corpus / "b").write_text("\n%\n".join(docs[250:]))
  train, test = assets.text_split("fortunes", str(tmp_path / "one"))
  read = lambda p: [json.loads(line)["text"] for line in open(p)]  # noqa: E731
  tr, te = read(train), read(test)
  assert sorted(tr + te) == sorted(docs) and not set(tr) & set(te)
  assert 5 <= len(te) <= 40  # ~5%
  # Another file layout of the same documents: the same split.
  (corpus / "a").write_text("\n%\n".join(docs[::2]))
  (corpus / "b").write_text("\n%\n".join(docs[1::2]))
  train2, test2 = assets.text_split("fortunes", str(tmp_path / "two"))
  assert sorted(read(test2)) == sorted(te) and sorted(read(train2)) == sorted(tr)
