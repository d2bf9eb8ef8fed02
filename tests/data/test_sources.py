"""jlora.data.sources (and builder): JSONL, Parquet, text and a TFDS dataset built from files,
read back record for record."""

from jlora import data
from jlora.data import builder, sources
from tests.helpers import byte_tokenizer, write_jsonl


def test_sources_parquet_text_and_tfds_build(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
  pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
  assert [sources.open_source(str(tmp_path / "d.parquet"))[i] for i in range(5)] == records
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a").write_text("one\n%\ntwo lines\nhere\n%\n\n%\nthree\n")
  text = sources.open_source(str(tmp_path / "corpus"), separator="\n%\n")
  assert [text[i]["text"] for i in range(len(text))] == ["one", "two lines\nhere", "three"]
  chats = [{"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}"}], "id": i} for i in range(4)]
  train = write_jsonl(tmp_path / "chat.jsonl", chats)
  test = write_jsonl(tmp_path / "chat_test.jsonl", chats[:2])
  out = builder.build({"train": train, "test": test}, str(tmp_path / "tfds"), "my_chats")
  built = sources.open_source(out)
  assert sorted((built[i] for i in range(len(built))), key=lambda r: r["id"]) == chats
  assert len(sources.open_source(out, split="test")) == 2
  tok = byte_tokenizer()
  ids, mask = data.encode(built[0], tok)
  assert tok.decode(ids[mask == 1]).startswith("a")
