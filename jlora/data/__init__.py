"""Data: sources (JSONL, Parquet, text corpora, TFDS/ArrayRecord, generated tasks), chat and
completion rendering with loss masks, and the grain pipeline that packs, shards and batches.

    tok = data.Tokenizer.from_model(path)
    cfg = data.DataConfig(source="train.jsonl", seq_len=512, batch_size=16)
    it = iter(data.dataset(cfg, tok))   # numpy batches for jlora.run.train_step; it.get_state()
    print(data.stats(cfg, tok))
"""

from jlora.data.pipeline import (DataConfig, Stats, dataset, examples, open_source, order_seed,
                                  stats)
from jlora.data.render import Fields, encode, encode_chat, prompt_ids, render_chat
from jlora.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "Fields", "Stats", "Tokenizer", "dataset", "encode", "encode_chat",
           "examples", "open_source", "order_seed", "prompt_ids", "render_chat", "stats"]
