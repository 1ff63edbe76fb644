"""Search QA questions: loaders for the shared question files, answer normalisation, train/validation split.

The shared folder (`../shared/data/search/` relative to the repository root, or `$T2PO_SEARCH_DATA`) holds
NQ and HotpotQA questions in four formats (see its SOURCE.md). Each loader below reads one format into
`SearchQuestion`s, keeping the Wikipedia passages that ship with a question (they make up the corpus,
see `corpus.py`; `gold_passages` are the ones that answer it).

The train and validation splits never share a question: a question's split is a hash of its normalised
text (`split_of`), so the same question from two files lands in the same split, and the split does not
depend on which files or data sources are loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from t2po.errors import InvalidInput

#: environment variable that points at the folder with the Search QA files
DATA_DIR_ENV = "T2PO_SEARCH_DATA"
#: percentage of (normalised) questions that go to the validation split; about 950 of the ~4,700
#: questions, enough for the paper's 512 validation tasks (docs/method.md §6)
VALIDATION_PERCENT = 20
SPLITS = ("train", "validation")
DATA_SOURCES = ("nq", "hotpotqa")
_PUNCTUATION = frozenset(string.punctuation)


def default_data_dir() -> Path:
    """`$T2PO_SEARCH_DATA`, else `<repo root>/../shared/data/search`."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data" / "search"


def normalize_answer(text: str) -> str:
    """Search-R1's answer normalisation: lower case, drop punctuation, drop the articles a/an/the,
    collapse whitespace. Also used for questions (deduplication and the split hash)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers: list[str] | tuple[str, ...]) -> float:
    """1.0 if the normalised prediction equals any normalised golden answer, else 0.0 (Search-R1 EM)."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in golden_answers))


def split_of(question: str) -> str:
    """"train" or "validation", from a hash of the normalised question (stable across runs and files)."""
    digest = hashlib.sha256(normalize_answer(question).encode("utf-8")).hexdigest()
    return "validation" if int(digest[:8], 16) % 100 < VALIDATION_PERCENT else "train"


@dataclass(frozen=True)
class Passage:
    """A Wikipedia passage; `contents` is its wiki-18 corpus form `"Title"\\ntext`."""

    title: str
    text: str

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}'


@dataclass(frozen=True)
class SearchQuestion:
    id: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str  # "nq" or "hotpotqa"
    # every passage shipped with the question (gold and distractors); empty for the Search-R1 parquet
    passages: tuple[Passage, ...] = field(default=(), repr=False)
    # the passages that answer it (NQ: the oracle passage; HotpotQA: the supporting paragraphs)
    gold_passages: tuple[Passage, ...] = field(default=(), repr=False)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{line_no}: not valid JSON ({e}). Each line must be one JSON object.") from e


def _field(path: Path, line_no: int, row: dict, key: str):
    if key not in row:
        raise InvalidInput(f"{path}:{line_no}: missing field {key!r} (fields present: {sorted(row)}). "
                         f"Is this file in the format its loader expects?")
    return row[key]


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def load_search_r1_parquet(path: str | Path) -> list[SearchQuestion]:
    """Search-R1 rows (`nq_search_test.parquet`): question, golden_answers, data_source."""
    import pandas as pd

    path = Path(path)
    frame = pd.read_parquet(path)
    missing = {"question", "golden_answers", "data_source"} - set(frame.columns)
    if missing:
        raise InvalidInput(f"{path}: missing columns {sorted(missing)} (has {list(frame.columns)}); "
                         f"expected Search-R1 rows (question, golden_answers, data_source).")
    questions = []
    for i, row in enumerate(frame.itertuples(index=False)):
        row_id = getattr(row, "id", None) or f"{path.stem}-{i}"
        questions.append(SearchQuestion(
            id=str(row_id),
            question=_clean(row.question),
            golden_answers=tuple(str(a) for a in row.golden_answers),
            data_source=str(row.data_source),
        ))
    return questions


def load_nq_open_oracle(path: str | Path) -> list[SearchQuestion]:
    """NQ-open with its gold wiki-18 passage (`nq-open-oracle.jsonl.gz`: question, answers, ctxs)."""
    path = Path(path)
    questions = []
    for line_no, row in _jsonl_rows(path):
        ctxs = _field(path, line_no, row, "ctxs")
        passages = tuple(Passage(_clean(c["title"]), _clean(c["text"])) for c in ctxs)
        gold = tuple(p for p, c in zip(passages, ctxs) if c.get("isgold", False)) or passages[:1]
        questions.append(SearchQuestion(
            id=f"nq-open-oracle-{line_no - 1}",
            question=_clean(_field(path, line_no, row, "question")),
            golden_answers=tuple(_field(path, line_no, row, "answers")),
            data_source="nq",
            passages=passages,
            gold_passages=gold,
        ))
    return questions


def load_hotpotqa_ircot(path: str | Path) -> list[SearchQuestion]:
    """HotpotQA in the IRCoT format (`hotpotqa_dev_subsampled.jsonl.xz`): question_text,
    answers_objects[].spans, contexts[] with title, paragraph_text, is_supporting."""
    path = Path(path)
    questions = []
    for line_no, row in _jsonl_rows(path):
        answers = [span for obj in _field(path, line_no, row, "answers_objects") for span in obj.get("spans", [])]
        contexts = _field(path, line_no, row, "contexts")
        passages = tuple(Passage(_clean(c["title"]), _clean(c["paragraph_text"])) for c in contexts)
        questions.append(SearchQuestion(
            id=str(row.get("question_id", f"{path.stem}-{line_no - 1}")),
            question=_clean(_field(path, line_no, row, "question_text")),
            golden_answers=tuple(answers),
            data_source="hotpotqa",
            passages=passages,
            gold_passages=tuple(p for p, c in zip(passages, contexts) if c.get("is_supporting")),
        ))
    return questions


def load_hotpotqa_distractor(path: str | Path) -> list[SearchQuestion]:
    """HotpotQA in the distractor format (`hotpotqa_hard_{train,dev}.jsonl.xz`): question, answer,
    context {title[], sentences[][]}, supporting_facts {title[]}. A paragraph is its sentences joined."""
    path = Path(path)
    questions = []
    for line_no, row in _jsonl_rows(path):
        context = _field(path, line_no, row, "context")
        passages = tuple(Passage(_clean(title), _clean("".join(sentences)))
                         for title, sentences in zip(context["title"], context["sentences"]))
        supporting = set(_field(path, line_no, row, "supporting_facts")["title"])
        questions.append(SearchQuestion(
            id=str(row.get("id", f"{path.stem}-{line_no - 1}")),
            question=_clean(_field(path, line_no, row, "question")),
            golden_answers=(str(_field(path, line_no, row, "answer")),),
            data_source="hotpotqa",
            passages=passages,
            gold_passages=tuple(p for p in passages if p.title in supporting),
        ))
    return questions


#: the shared question files and the loader of each
SHARED_FILES: dict[str, Callable[[Path], list[SearchQuestion]]] = {
    "nq_search_test.parquet": load_search_r1_parquet,
    "nq-open-oracle.jsonl.gz": load_nq_open_oracle,
    "hotpotqa_dev_subsampled.jsonl.xz": load_hotpotqa_ircot,
    "hotpotqa_hard_train.jsonl.xz": load_hotpotqa_distractor,
    "hotpotqa_hard_dev.jsonl.xz": load_hotpotqa_distractor,
}


def load_shared_questions(data_dir: str | Path | None = None) -> list[SearchQuestion]:
    """All questions of the shared files, in file order (duplicates across files kept)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Search QA data folder {data_dir} not found. Put the shared data at "
                                f"../shared/data/search (relative to the repository) or set ${DATA_DIR_ENV}.")
    present = [name for name in SHARED_FILES if (data_dir / name).is_file()]
    if not present:
        raise FileNotFoundError(f"{data_dir} holds none of the Search QA files {sorted(SHARED_FILES)}.")
    return [q for name in present for q in SHARED_FILES[name](data_dir / name)]


def question_pool(questions: list[SearchQuestion], split: str, data_sources: tuple[str, ...] | list[str] = DATA_SOURCES
                  ) -> list[SearchQuestion]:
    """The deduplicated questions of one split and the given data sources, in a fixed pseudo-random
    order (sorted by the hash of the normalised question, so task `seed % len(pool)` is stable).

    A question that appears in several files (e.g. NQ in both the parquet and the oracle file) is kept
    once, with the union of the golden answers and of the passages."""
    if split not in SPLITS:
        raise InvalidInput(f"Unknown split {split!r}; use one of {SPLITS}.")
    unknown = set(data_sources) - set(DATA_SOURCES)
    if unknown:
        raise InvalidInput(f"Unknown data source(s) {sorted(unknown)}; use a subset of {DATA_SOURCES}.")
    merged: dict[str, SearchQuestion] = {}
    for q in questions:
        if q.data_source not in data_sources or split_of(q.question) != split:
            continue
        key = normalize_answer(q.question)
        if key not in merged:
            merged[key] = q
            continue
        first = merged[key]
        merged[key] = SearchQuestion(
            id=first.id,
            question=first.question,
            golden_answers=tuple(dict.fromkeys(first.golden_answers + q.golden_answers)),
            data_source=first.data_source,
            passages=tuple(dict.fromkeys(first.passages + q.passages)),
            gold_passages=tuple(dict.fromkeys(first.gold_passages + q.gold_passages)),
        )
    order = sorted(merged, key=lambda key: hashlib.sha256(key.encode("utf-8")).hexdigest())
    return [merged[key] for key in order]
