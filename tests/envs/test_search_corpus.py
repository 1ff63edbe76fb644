"""The wiki-18-format corpus: building it from the shared data, opening any such file, bad files."""

from __future__ import annotations

import json

import pytest

from t2po.envs.search.corpus import Corpus, default_corpus_path, ensure_corpus, index_dir
from t2po.envs.search.data import default_data_dir, load_shared_questions

DATA = default_data_dir()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared Search QA data not at {DATA}")
def test_build_corpus_from_shared_data():
    path = ensure_corpus()
    assert path == default_corpus_path() and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(rows))]
    contents = [r["contents"] for r in rows]
    assert len(set(contents)) == len(contents)  # deduplicated
    assert all(c.startswith('"') and '"\n' in c for c in contents)  # "Title"\ntext
    shipped = {p.contents for q in load_shared_questions() for p in q.passages}
    assert shipped <= set(contents)
    assert 12_000 < len(rows) < 20_000
    # built once: a second call finds the file and leaves it alone
    built_at = path.stat().st_mtime_ns
    assert ensure_corpus() == path and path.stat().st_mtime_ns == built_at


def test_corpus_opens_any_wiki18_file(tmp_path):
    path = _write(tmp_path / "mini.jsonl", [{"id": "a7", "contents": '"Paris"\nParis is the capital of France.'},
                                            {"id": 12, "contents": '"Oslo"\nOslo is the capital of Norway.'}])
    corpus = Corpus(path)
    assert len(corpus) == 2
    assert corpus.document(1) == {"id": "12", "contents": '"Oslo"\nOslo is the capital of Norway.'}
    assert list(corpus.iter_contents())[0].startswith('"Paris"')
    info = corpus.describe()
    assert info["num_passages"] == 2 and info["path"] == str(path.resolve()) and len(info["sha256"]) == 64
    assert info["name"] == f"mini-{info['sha256'][:12]}"
    # a second open reads the cached offsets and agrees
    assert Corpus(path).document(0)["id"] == "a7"


def test_cache_key_follows_the_file(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": "0", "contents": '"A"\nalpha'}])
    before = index_dir(path)
    _write(path, [{"id": "0", "contents": '"A"\nalpha'}, {"id": "1", "contents": '"B"\nbeta'}])
    assert index_dir(path) != before
    assert len(Corpus(path)) == 2


@pytest.mark.parametrize("rows, problem", [
    (["{not json"], "c.jsonl:1: not valid JSON"),
    ([{"id": "0"}], 'c.jsonl:1: expected an object with an "id" and a string "contents"'),
    ([{"id": "0", "contents": '"A"\na'}, {"id": "0", "contents": '"B"\nb'}], "c.jsonl:2: duplicate passage id '0'"),
    ([], "the corpus is empty"),
])
def test_bad_corpus_lines_are_named(tmp_path, rows, problem):
    path = _write(tmp_path / "c.jsonl", rows) if rows else tmp_path / "c.jsonl"
    if not rows:
        path.write_text("")
    with pytest.raises(ValueError) as error:
        Corpus(path)
    assert problem in str(error.value)


def test_missing_corpus_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m t2po.envs.search.corpus"):
        Corpus(tmp_path / "absent.jsonl")
