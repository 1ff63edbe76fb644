"""Search QA agents (Search-R1 / verl-agent setting): corpus, retrievers, retrieval server, environment.

- `data.py`: question loaders (Search-R1 parquet, NQ-open oracle, HotpotQA), answer normalisation,
  the train/validation split.
- `corpus.py`: builds the wiki-18-format passage corpus from the shared files; opens any such corpus.
- `retriever.py`: BM25 (default) and dense MiniLM retrievers with on-disk indexes.
- `server.py`: the HTTP retrieval server (`t2po serve-retriever`) and its client.
- `env.py`: the `search` environment (`make_env("search", ...)`).

Modules are imported on use (the environment registry imports `t2po.envs.search.env`), so that
importing this package loads neither FastAPI nor bm25s.
"""
