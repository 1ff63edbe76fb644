"""WebShop (Yao et al., 2022): a simulated web shop where an agent searches, compares products,
chooses options and buys what an instruction asks for. The paper's first benchmark.

    from t2po.envs import make_env
    env = make_env("webshop", split="train")                      # generated catalog, 1,000 products
    env = make_env("webshop", data_dir="~/webshop/data")          # WebShop's own data files

Modules, in reading order:
- `catalog`: products and goals, from WebShop's data files or generated (same schema);
- `reward`: WebShop's purchase reward (`get_reward`), with its fuzzy matching;
- `engine`: the shop: BM25 search, pages, `search[...]` / `click[...]` actions;
- `env`: the `BatchEnv` ("webshop") with verl-agent's observation format, prompt and reward;
- `web`: the same shop as HTML pages a person can browse (`t2po webshop-server`).

Deviations from the original, and why:
- Title nouns for the type reward: WebShop tags titles with spaCy's `en_core_web_sm`, which is not
  installed here; by default every alphabetic word of a title that is not a closed-class word
  counts as a noun (`title_nouns="closed_class"`). Buying the target product scores exactly as in
  the original; buying another product may get a different type factor. `title_nouns="spacy"`
  restores the original where the model is installed.
- Search: BM25 with bm25s and PyStemmer's Porter stemmer instead of pyserini/Lucene (same k1, b,
  analyzer steps and result order; Lucene's lossy length norms are not reproduced).
- WebShop's unseeded random draws (the price paid for a product with a price range, goal price
  bounds) use `random.Random(catalog_seed)`, so that runs are reproducible.
- The done page shows only the thanks and the score (the original also printed hidden debug text).
"""

from t2po.envs.webshop.catalog import Catalog, Goal, Product, generate_catalog, load_official_catalog
from t2po.envs.webshop.engine import SearchIndex, Shop, ShopSession
from t2po.envs.webshop.reward import purchase_reward

__all__ = [
    "Catalog",
    "Goal",
    "Product",
    "SearchIndex",
    "Shop",
    "ShopSession",
    "generate_catalog",
    "load_official_catalog",
    "purchase_reward",
]
