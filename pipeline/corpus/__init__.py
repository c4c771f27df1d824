"""The corpus: sources → packed parquet shards + manifest (the prepare stage), and the shards → Ray Train datasets.

On the driver:
    sources.py      resolve ``data.sources`` (paths, globs, folders, s3://, hub:, package:) into files by format
    compression.py  gzip, bz2, xz and zstd files, told by their magic bytes: decompressed streams, first bytes
    formats.py      Group (the files of one format), and what is inside them, checked before Ray starts: JSON
                    layout, text field, parquet, datasets files
    corpora.py      the ``package:`` corpora, exported once to jsonl
    prepare.py      the cache key and the stage: builds the Ray Data pass, sums its stats into the manifest
    loading.py      train-time loading: the manifest's splits as datasets, held in memory or streamed
    data_context.py Ray Data options scoped to a block (progress bars, order)
In Ray Data tasks:
    readers.py      files → documents (ranges.py, decoding.py), then the tokenize-and-pack batch function and its
                    stats rows
    ranges.py       a file's bytes: byte ranges of a large file, one decompressed stream of a compressed one
    decoding.py     bytes → documents, counting what is skipped (encodings, line ends, JSON)
    worker_tokenizer.py  the tokenizer the tasks encode with (the driver builds it)
    packing.py      pure batch functions: clean, split by hash, pack into rows (no Ray)
    sink.py         the datasink that writes the parquet shards
The rest of the pipeline calls ``prepare.prepare``, ``prepare.MANIFEST``, ``loading.load_splits`` and
``loading.fits_in_memory``.
"""
