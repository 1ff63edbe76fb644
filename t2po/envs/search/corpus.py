"""The passage corpus the retriever searches, in the wiki-18 JSONL format.

Each line is `{"id": "...", "contents": "\\"Title\\"\\npassage text"}` (the format of Search-R1's wiki-18
dump). `build_corpus` makes such a file from the Wikipedia passages that ship with the shared questions
(NQ-open oracle passages, HotpotQA context paragraphs, the wiki-18 example passages: about 12,900
unique passages); `Corpus` opens any file in that format, so a user with the full 21M-passage wiki-18
dump uses the same code path (`t2po serve-retriever --corpus wiki-18.jsonl`).

`Corpus` keeps only the byte offset of each line in memory and reads a passage from the file when it
is asked for, so opening a large corpus costs 8 bytes per passage. The offsets, the content hash and
the retriever indexes live in a cache folder keyed by the file's path, size and modification time
(`index_dir`); the first open of a file validates every line and writes that cache.

Command line (build the default corpus): `python -m t2po.envs.search.corpus [--data-dir D] [--out F]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from t2po.envs.search.data import default_data_dir, load_shared_questions
from t2po.errors import InvalidInput

logger = logging.getLogger(__name__)

#: environment variable for the cache folder (default `~/.cache/t2po`)
CACHE_ENV = "T2PO_CACHE"
#: the wiki-18 example passages shipped next to the questions (added to the built corpus)
EXAMPLE_CORPUS = "wiki18_example_corpus.jsonl"


def cache_dir() -> Path:
    """`$T2PO_CACHE`, else `~/.cache/t2po`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "t2po")


def default_corpus_path() -> Path:
    """Where `build_corpus` writes by default: `<cache>/search/corpus.jsonl`."""
    return cache_dir() / "search" / "corpus.jsonl"


def _atomic_write_lines(path: Path, lines: Iterator[str]) -> None:
    """Write to a temporary file next to `path`, then rename it over `path` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a corpus or cache file is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_corpus(data_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the deduplicated passages of the shared question files as a wiki-18 JSONL corpus.

    Passages are deduplicated on their exact contents and numbered "0", "1", ... in file order
    (deterministic). Returns the written path (`default_corpus_path()` unless `out` is given)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out = Path(out) if out is not None else default_corpus_path()
    contents: dict[str, None] = {}  # insertion-ordered set
    for question in load_shared_questions(data_dir):
        for passage in question.passages:
            contents.setdefault(passage.contents)
    example = data_dir / EXAMPLE_CORPUS
    if example.is_file():
        with open(example, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    contents.setdefault(json.loads(line)["contents"])
    if not contents:
        raise InvalidInput(f"No passages found in {data_dir}; the corpus would be empty.")
    _atomic_write_lines(out, (json.dumps({"id": str(i), "contents": c}, ensure_ascii=False) + "\n"
                              for i, c in enumerate(contents)))
    logger.info("Wrote %d passages to %s", len(contents), out)
    return out


def ensure_corpus(data_dir: str | Path | None = None) -> Path:
    """The default corpus path, building the corpus first if it is not there yet."""
    path = default_corpus_path()
    if not path.is_file():
        build_corpus(data_dir, path)
    return path


def index_dir(corpus_path: str | Path) -> Path:
    """Cache folder for one corpus file: `<cache>/search/index/<stem>-<key>`, where the key hashes the
    resolved path, size and modification time (a changed or replaced file gets a fresh folder)."""
    path = Path(corpus_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "search" / "index" / f"{path.stem}-{key}"


def _scan(path: Path) -> tuple[np.ndarray, str]:
    """Validate every line of a wiki-18 JSONL file; return the line start offsets (plus the end
    offset) and the SHA-256 of the file."""
    offsets = [0]
    digest = hashlib.sha256()
    ids: set[str] = set()
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            digest.update(line)
            offsets.append(offsets[-1] + len(line))
            if not line.strip():
                raise InvalidInput(f"{path}:{line_no}: empty line. A wiki-18 corpus has one passage per line.")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{line_no}: not valid JSON ({e}). Each line must be "
                                 '{"id": ..., "contents": "\\"Title\\"\\ntext"}.') from e
            if not isinstance(row, dict) or not isinstance(row.get("contents"), str) or "id" not in row:
                raise InvalidInput(f"{path}:{line_no}: expected an object with an \"id\" and a string "
                                 f"\"contents\" (wiki-18 format), got {str(row)[:120]!r}.")
            passage_id = str(row["id"])
            if passage_id in ids:
                raise InvalidInput(f"{path}:{line_no}: duplicate passage id {passage_id!r}; ids must be unique.")
            ids.add(passage_id)
    if len(offsets) == 1:
        raise InvalidInput(f"{path}: the corpus is empty.")
    return np.asarray(offsets, dtype=np.int64), digest.hexdigest()


class Corpus:
    """A wiki-18 JSONL corpus opened for random access: `len(corpus)`, `corpus.document(i)` ->
    `{"id", "contents"}`, `corpus.iter_contents()` streams the passages in file order."""

    def __init__(self, path: str | Path):
        self._fd = -1
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"Corpus file {self.path} not found. Build the default corpus with "
                                    f"`python -m t2po.envs.search.corpus` or pass a wiki-18 JSONL file.")
        self.cache = index_dir(self.path)
        meta_path, offsets_path = self.cache / "corpus.json", self.cache / "offsets.npy"
        if meta_path.is_file() and offsets_path.is_file():
            self.offsets = np.load(offsets_path)
            self.sha256 = json.loads(meta_path.read_text())["sha256"]
        else:
            self.offsets, self.sha256 = _scan(self.path)
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = offsets_path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, self.offsets)
            os.replace(tmp, offsets_path)
            _atomic_write_lines(meta_path, [json.dumps({"path": str(self.path), "sha256": self.sha256,
                                                        "num_passages": len(self)})])
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> dict[str, str]:
        """Passage `index` (0-based line number) as `{"id", "contents"}`. Thread-safe (positional read)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        row = json.loads(os.pread(self._fd, end - start, start))
        return {"id": str(row["id"]), "contents": row["contents"]}

    def iter_contents(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["contents"]

    def describe(self) -> dict[str, object]:
        """What every result should cite: the corpus name (file stem + content hash prefix, e.g.
        `corpus-34a1d02a0756`), path, number of passages and content hash."""
        return {"name": f"{self.path.stem}-{self.sha256[:12]}", "path": str(self.path),
                "num_passages": len(self), "sha256": self.sha256}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def remove_cache(corpus_path: str | Path) -> None:
    """Delete the cached offsets and indexes of one corpus file (they are rebuilt on the next open)."""
    shutil.rmtree(index_dir(corpus_path), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2po.envs.search.corpus",
                                     description="Build the wiki-18-format passage corpus from the shared "
                                                 "Search QA files.")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the question files (default: {default_data_dir()})")
    parser.add_argument("--out", default=None, help=f"output JSONL (default: {default_corpus_path()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = build_corpus(args.data_dir, args.out)
    print(json.dumps(Corpus(out).describe()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
