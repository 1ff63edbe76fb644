"""The WebShop shop: search, pages, the actions `search[query]` / `click[element]`, purchases.

This is WebShop's text environment (`web_agent_text_env.py`: `SimServer` + `SimBrowser`) without
the HTML round trip: a page is a list of elements (text, buttons, product links, option choices)
from which the text observations, the available actions and the HTML view (`web.py`) are all
rendered, so the three always agree. Pages and navigation follow the templates verl-agent ships:

- search page: "WebShop", the instruction, a search box and its "Search" button;
- results: "Back to Search", "Page p (Total results: n)", "< Prev" (from page 2 on), "Next >"
  (always shown, as in those templates), then 10 products (ASIN link, title, price) of the top 50;
- item page: "Back to Search", "< Prev" (back to the results), each option group (name, values),
  title, price, rating, "Description", "Features", "Reviews", "Buy Now";
- description / features / reviews sub-pages: "Back to Search", "< Prev" (back to the item), text;
- done page after "Buy Now", with the reward.

Actions follow `WebAgentTextEnv.step`: the action is parsed with WebShop's pattern `name[arg]` and
its argument lower-cased; `search[q]` with a non-empty query searches from any page; `click[x]` acts
when `x` is a clickable of the current page (buttons and product links by their lower-cased text,
option values as written) other than "search"; anything else changes nothing.

Search is BM25 over each product's title, description, first bullet point and option text (WebShop's
indexed document), with Lucene's scoring (k1 0.9, b 0.4: pyserini's defaults), an analyzer like
Lucene's English one (standard tokens, possessives and Lucene's English stop words removed, Porter
stemming), and Lucene's order (score, then index position); 50 results at most, only documents that
contain a query term. Lucene's lossy document-length norms are not reproduced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from t2po.envs.webshop.catalog import Catalog, Goal, Product, paused_gc
from t2po.envs.webshop.reward import RewardBreakdown, purchase_reward

SEARCH_RETURN_N = 50  # results a search returns (engine.py SEARCH_RETURN_N)
PRODUCT_WINDOW = 10  # results per page
BM25_K1, BM25_B = 0.9, 0.4  # pyserini's LuceneSearcher defaults
END_BUTTON, NEXT_PAGE, PREV_PAGE, BACK_TO_SEARCH = "Buy Now", "Next >", "< Prev", "Back to Search"
SUB_PAGES = ("description", "features", "reviews")
# Lucene's EnglishAnalyzer stop words (ENGLISH_STOP_WORDS_SET).
LUCENE_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split()
)
ANALYZER_VERSION = "webshop-bm25-v2"  # part of the index cache key: bump when the analyzer changes
INDEX_CACHE_MIN_PRODUCTS = 10_000  # smaller indexes build in about a second: not worth a cache

_TOKEN = re.compile(r"\w+(?:['.]\w+)*")


def parse_action(action: str) -> tuple[str, str | None]:
    """WebShop's `parse_action`: "click[buy now]" -> ("click", "buy now"); no brackets -> (action, None).

    The same result as WebShop's `re.match(r"(.+)\[(.+)\]", action)` (name: up to the last "[" of the
    first line that still has a "]" after it; argument: up to that line's last "]"), found with
    two scans: the regex backtracks quadratically on text with many "[" and no "]"."""
    line = action.split("\n", 1)[0]
    close = line.rfind("]")
    open_ = line.rfind("[", 1, close - 1) if close >= 3 else -1
    if open_ == -1:
        return action, None
    return line[:open_], line[open_ + 1 : close]


# --------------------------------------------------------------------------- search


class Analyzer:
    """Lucene-like English analysis: tokens, possessive "'s" dropped, stop words, Porter stems.

    Words of one or two letters are not stemmed, as in Lucene's (and Porter's original) stemmer:
    Snowball's Porter turns "s" into "" and "xs" into "x", and an empty term must never reach the
    index (a size "s" in a query used to crash the search)."""

    def __init__(self) -> None:
        self._stemmer = Stemmer.Stemmer("porter")
        self._stems: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        words = []
        for token in _TOKEN.findall(text.lower()):
            if token.endswith("'s"):
                token = token[:-2]
            if token and token not in LUCENE_STOP_WORDS:
                words.append(token)
        unseen = [w for w in set(words) if w not in self._stems and len(w) > 2]
        if unseen:
            self._stems.update(zip(unseen, self._stemmer.stemWords(unseen)))
        return [self._stems.get(w, w) for w in words]


class SearchIndex:
    """BM25 search over a catalog's products (see the module docstring)."""

    def __init__(self, retriever: bm25s.BM25, asins: list[str]) -> None:
        self._retriever = retriever
        self._vocab: dict[str, int] = retriever.vocab_dict
        self._asins = asins
        self._analyze = Analyzer()

    @classmethod
    def build(cls, products: list[Product], cache_dir: Path | None = None) -> "SearchIndex":
        """Index `products`; with `cache_dir`, reuse (or write) an index saved there for the same
        documents. Writing is atomic: a half-written index is never left behind."""
        texts = [p.search_text() for p in products]
        asins = [p.asin for p in products]
        path = None
        if cache_dir is not None:
            digest = hashlib.sha256(f"{ANALYZER_VERSION} {BM25_K1} {BM25_B}".encode())
            for asin, text in zip(asins, texts):
                digest.update(f"\x00{asin}\x01{text}".encode())
            path = Path(cache_dir) / "webshop" / f"index-{digest.hexdigest()[:20]}"
            if (path / "asins.json").is_file():
                retriever = bm25s.BM25.load(str(path), show_progress=False, verbosity=0)
                return cls(retriever, json.loads((path / "asins.json").read_text()))

        analyze = Analyzer()
        vocab: dict[str, int] = {}
        with paused_gc():
            doc_ids = [[vocab.setdefault(t, len(vocab)) for t in analyze(text)] for text in texts]
            retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
            retriever.index(bm25s.tokenization.Tokenized(ids=doc_ids, vocab=vocab), show_progress=False)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
            try:
                retriever.save(str(tmp), show_progress=False)
                (tmp / "asins.json").write_text(json.dumps(asins))
                os.replace(tmp, path)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (path / "asins.json").is_file():  # else another process saved it first
                    warnings.warn(f"Could not cache the WebShop search index in {path} ({err}); it will be rebuilt "
                                  "next time.")
        return cls(retriever, asins)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[str]:
        """ASINs of the top `k` products for `query`, best first (ties: catalog order)."""
        index = self._retriever.scores
        # bm25s keeps a few vocabulary entries (its empty-document placeholder "") without postings:
        # only ids inside the posting table are terms of the index
        n_terms = len(index["indptr"]) - 1
        ids = [i for i in (self._vocab.get(t) for t in self._analyze(query)) if i is not None and i < n_terms]
        if not ids:
            return []
        # sum the precomputed per-document BM25 term scores of each query term (a repeated term
        # counts again, as in Lucene); one bincount is much faster than bm25s' per-term add.at
        postings = [slice(index["indptr"][i], index["indptr"][i + 1]) for i in ids]
        docs = np.concatenate([index["indices"][p] for p in postings])
        scores = np.bincount(docs, weights=np.concatenate([index["data"][p] for p in postings]),
                             minlength=index["num_docs"])
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:  # keep every document that ties with the k-th score, then order exactly
            kth = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
            hits = hits[scores[hits] >= kth]
        order = hits[np.lexsort((hits, -scores[hits]))][:k]
        return [self._asins[i] for i in order]


# --------------------------------------------------------------------------- pages


@dataclass(frozen=True)
class Element:
    """One visible thing on a page. `kind`: "text", "instruction" (the task text), "button",
    "product" (a product's ASIN link), "option" (one value of option group `group`)."""

    kind: str
    text: str
    group: str | None = None
    selected: bool = False  # option: the chosen value of its group; product: already visited


@dataclass
class Page:
    kind: str  # "search", "results", "item", "description", "features", "reviews", "done"
    elements: list[Element]
    has_search_bar: bool = False

    def clickables(self) -> dict[str, Element]:
        """WebShop's `text_to_clickable`: buttons, then product links (lower-cased text), then option
        values; a later element with the same text replaces an earlier one."""
        found: dict[str, Element] = {}
        for kind in ("button", "product", "option"):
            for e in self.elements:
                if e.kind == kind:
                    found[e.text if kind == "option" else e.text.lower()] = e
        return found

    def texts(self) -> list[str]:
        return [e.text for e in self.elements]


def simple_text(page: Page) -> str:
    """WebShop's "text" observation: the visible texts joined by " [SEP] "."""
    return " [SEP] ".join(page.texts())


def rich_text(page: Page) -> str:
    """WebShop's "text_rich" observation: one line per text, buttons as "[button] x [button_]",
    chosen options and visited products as "[clicked button] x [clicked button_]"."""
    lines, clicked = [], []
    for e in page.elements:
        if e.kind == "button":
            lines.append(f"[button] {e.text} [button_]")
        elif e.kind == "option":
            tag = "clicked button" if e.selected else "button"
            lines.append(f"  [{tag}] {e.text} [{tag}_]")
            if e.selected:
                clicked.append(f"You have clicked {e.text}.")
        elif e.kind == "product":
            tag = "clicked button" if e.selected else "button"
            lines.append(f"\n[{tag}] {e.text} [{tag}_]")
        else:
            lines.append(e.text)
    return "".join(line + "\n" for line in clicked[::-1] + lines)


# --------------------------------------------------------------------------- sessions


@dataclass
class ShopSession:
    """One shopper's state: the goal, the current page and what has been chosen."""

    goal: Goal
    page: str = "search"
    keywords: str | None = None
    results: list[str] = field(default_factory=list)  # ASINs of the last search
    page_num: int = 1
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # option name -> chosen value
    visited: set[str] = field(default_factory=set)
    searches: int = 0
    done: bool = False
    outcome: RewardBreakdown | None = None  # set by "Buy Now"

    @property
    def page_results(self) -> list[str]:
        start = (self.page_num - 1) * PRODUCT_WINDOW
        return self.results[start : start + PRODUCT_WINDOW]


class Shop:
    """The shop over one catalog: sessions, pages and actions (see the module docstring)."""

    def __init__(self, catalog: Catalog, index: SearchIndex, title_nouns: str = "closed_class") -> None:
        self.catalog = catalog
        self.index = index
        self.title_nouns = title_nouns

    def new_session(self, goal: Goal) -> ShopSession:
        return ShopSession(goal=goal)

    # ---- rendering

    def render(self, s: ShopSession) -> Page:
        """The page `s` is on."""
        instruction = [Element("text", "Instruction:"), Element("instruction", s.goal.instruction_text)]
        if s.page == "search":
            return Page("search", [Element("text", "WebShop"), *instruction, Element("button", "Search")],
                        has_search_bar=True)
        if s.page == "done":
            assert s.outcome is not None
            texts = ["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", str(s.outcome.reward)]
            return Page("done", [Element("text", t) for t in texts])
        elements = [*instruction, Element("button", BACK_TO_SEARCH)]
        if s.page == "results":
            elements.append(Element("text", f"Page {s.page_num} (Total results: {len(s.results)})"))
            if s.page_num > 1:
                elements.append(Element("button", PREV_PAGE))
            elements.append(Element("button", NEXT_PAGE))
            for asin in s.page_results:
                product = self.catalog.by_asin[asin]
                elements += [Element("product", asin, selected=asin in s.visited), Element("text", product.name),
                             Element("text", product.price_tag)]
            return Page("results", _visible(elements))
        product = self.catalog.by_asin[s.asin]
        elements.append(Element("button", PREV_PAGE))
        if s.page == "item":
            for name, values in product.options.items():
                elements.append(Element("text", name))
                elements += [Element("option", v, group=name, selected=s.options.get(name) == v) for v in values]
            elements += [
                Element("text", product.name),
                Element("text", f"Price: {product.price_tag}"),
                Element("text", f"Rating: {product.rating}"),
                *[Element("button", b) for b in ("Description", "Features", "Reviews", END_BUTTON)],
            ]
        elif s.page == "description":
            elements.append(Element("text", product.description))
        elif s.page == "features":
            elements += [Element("text", b) for b in product.bullet_points]
        elif s.page == "reviews":
            for r in product.reviews:
                elements += [Element("text", f'"{r.title}"'), Element("text", str(r.score)), Element("text", r.body)]
        return Page(s.page, _visible(elements))

    # ---- actions

    def act(self, s: ShopSession, action: str) -> bool:
        """Apply one `search[...]` / `click[...]` action; False when it changes nothing (WebShop
        ignores such actions). A finished session ignores every action."""
        if s.done:
            return False
        name, arg = parse_action(action)
        arg = arg.lower() if arg is not None else None
        if name == "search" and arg:
            self.search(s, arg)
            return True
        if name == "click" and arg is not None and arg != "search":
            element = self.render(s).clickables().get(arg)
            if element is not None:
                self._click(s, arg, element)
                return True
        return False

    def search(self, s: ShopSession, query: str) -> None:
        s.keywords = query
        s.results = self.index.search(query)
        s.searches += 1
        self._show_results(s, page_num=1)

    def _show_results(self, s: ShopSession, page_num: int) -> None:
        # WebShop re-renders the results for every visit, which clears the product and options
        s.page, s.page_num, s.asin, s.options = "results", page_num, None, {}

    def _click(self, s: ShopSession, name: str, element: Element) -> None:
        if name == END_BUTTON.lower():
            product = self.catalog.by_asin[s.asin]
            s.outcome = purchase_reward(product, s.goal, self.catalog.prices[s.asin], s.options, self.title_nouns)
            s.page, s.done = "done", True
        elif name == BACK_TO_SEARCH.lower():
            s.page, s.keywords, s.results, s.page_num, s.asin, s.options, s.visited = ("search", None, [],
                                                                                       1, None, {}, set())
        elif name == NEXT_PAGE.lower() and s.page == "results":
            self._show_results(s, s.page_num + 1)
        elif name == PREV_PAGE.lower() and s.page == "results":
            self._show_results(s, s.page_num - 1)
        elif name == PREV_PAGE.lower() and s.page in SUB_PAGES:
            s.page = "item"
        elif name == PREV_PAGE.lower() and s.page == "item":
            self._show_results(s, s.page_num)
        elif name in SUB_PAGES:
            s.page = name
        elif element.kind == "product":
            s.asin = name.upper()
            s.visited.add(s.asin)
            s.page = "item"
        elif element.kind == "option":
            s.options[element.group] = name
            s.page = "item"


def _visible(elements: list[Element]) -> list[Element]:
    """Texts as the text observation shows them: stripped, empty ones dropped."""
    out = []
    for e in elements:
        text = e.text.strip()
        if text:
            out.append(Element(e.kind, text, e.group, e.selected) if text != e.text else e)
    return out
