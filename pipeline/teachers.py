"""A pretrained teacher: loading it, continuing its pre-training from an encoder, and checking it before Ray.

A teacher is a masked LM of a supported family (pipeline/families/: BERT, RoBERTa), the family the config's
``teacher.family`` names. It must carry a trained
masked-LM head (an encoder-only ``BertModel`` would teach the student a random head), enough positions for
``data.max_seq_len`` and the vocabulary of ``data.tokenizer``. :func:`check_teacher` finds these problems from
the teacher's config, tensor names and tokenizer files without building the model (preflight); :func:`load_teacher`
loads it frozen for the workers, its vocabulary cut to the tokenizer's rows: a table with more rows than the
tokenizer has ids (NVIDIA's BERT checkpoints: 30,528 rows for 30,522 tokens) would give the extra ids logits, and
probability mass in L_ce that the student would learn to put on ids no text has. No Ray, DeepSpeed or MLflow here.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import families, models
from pipeline.assets import checkpoint_keys, local_or_error, quiet_from_pretrained, readable_weights, resolve_local


def load_teacher(source: str, *, cache_root: str, dtype: str = "fp32", num_tokens: int | None = None) -> PreTrainedModel:
    """Load a pretrained teacher (hub id, local directory or s3://) as its family's LM class (a masked LM, or
    GPT-2's causal LM), frozen and in eval mode.

    ``num_tokens`` (the tokenizer's rows, pipeline.assets.tokenizer_rows): a vocabulary with more rows is cut to
    them in place (:func:`pipeline.models.cut_vocab`), so that its logits cover exactly the tokenizer's ids.
    Raises ValueError for a folder without config.json, a model of no supported family, a checkpoint without
    trained masked-LM head weights (an encoder-only ``BertModel``: its head would be random), and a vocabulary
    with fewer rows than ``num_tokens``.
    """
    path = resolve_local(source, cache_root)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"teacher {source!r} is a directory without config.json: point at a saved HF model directory")
    family = _family_of(source, AutoConfig.from_pretrained(path))
    model, info = family.teacher_class().from_pretrained(path, output_loading_info=True)
    prefix = family.head_prefix
    missing_head = sorted(k for k in info["missing_keys"] if prefix is not None and k.startswith(prefix))
    if missing_head:
        raise ValueError(_no_head_message(source, family, f"{len(missing_head)} head weights missing, e.g. {missing_head[0]}"))
    if num_tokens is not None:
        _fit_vocab(model, num_tokens, f"teacher {source!r}")
    family.for_lm(model).requires_grad_(False).eval()
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def teacher_from_encoder(source: str, *, cache_root: str, vocab_size: int, max_seq_len: int, seed: int,
                         family: str = "bert"):
    """The start of continued MLM pre-training (``teacher.init_from``): a pretrained encoder of ``family``
    (package:NAME, a folder, a hub id, s3://) with a new masked-LM head whose decoder is tied to the word
    embeddings, its vocabulary cut to the tokenizer's ``vocab_size`` rows when it has more. Returns (model, one
    line naming the new and the left-out tensors). ValueError for a model of another family, a vocabulary smaller
    than the tokenizer's (``vocab_size``) or fewer positions than ``max_seq_len``."""
    fam = families.get(family)
    torch.manual_seed(seed)  # the new head's initialisation
    path = local_or_error(source, cache_root, what="teacher.init_from")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"teacher.init_from {source!r} is a folder without config.json (a tokenizer only?): give a "
                         f"{fam.teacher_type} encoder saved with save_pretrained")
    config = AutoConfig.from_pretrained(path) if os.path.isdir(path) else None
    if config is not None and config.model_type != fam.teacher_type:
        raise ValueError(f"teacher.init_from {source!r} has model_type {config.model_type!r}, but teacher.family is "
                         f"{fam.name}: give a {fam.teacher_type} encoder, or {families.fix_for(config)}")
    if os.path.isdir(path):
        readable_weights(path, f"teacher.init_from {source!r}")
    model, line = quiet_from_pretrained(fam.teacher_class(), path)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"teacher.init_from {source!r}: its vocabulary ({model.config.vocab_size}) is smaller than "
                         f"data.tokenizer's ({vocab_size}): use the tokenizer it was trained with")
    if fam.max_tokens(model.config) < max_seq_len:
        raise ValueError(f"teacher.init_from {source!r} has {fam.max_tokens(model.config)} positions, fewer than "
                         f"data.max_seq_len={max_seq_len}")
    models.cut_vocab(model, vocab_size)
    return model, line


def _fit_vocab(model: PreTrainedModel, num_tokens: int, what: str) -> None:
    """Cut ``model``'s vocabulary to ``num_tokens`` rows in place; ValueError (one line) when it has fewer."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < num_tokens:
        raise ValueError(f"data.tokenizer has {num_tokens:,} tokens but {what}'s vocabulary has {rows:,} rows: ids past "
                         f"{rows - 1} would index beyond its embedding table; set data.tokenizer to the teacher's own "
                         "tokenizer")
    models.cut_vocab(model, num_tokens)


def _no_head_message(source: str, family, what: str) -> str:
    cls = family.teacher_class().__name__
    return (f"teacher {source!r} has no trained masked-LM head ({what}): it is an encoder only "
            f"({cls.replace('ForMaskedLM', 'Model')}), and distilling from a random head teaches noise. Use a {cls} "
            f"checkpoint (e.g. {family.example_teacher}), or teacher.source: pretrain")


def _family_of(source: str, config, expected: str | None = None):
    """The family of a teacher's config; ValueError (one line) for an unsupported model type, or for one of
    another family than ``expected`` (``teacher.family``)."""
    try:
        family = families.of(config)
    except ValueError:
        raise ValueError(f"teacher {source!r} has model_type {config.model_type!r}, of no family distil distils: "
                         f"{families.supported_types()}") from None
    if family.teacher_type != config.model_type:
        raise ValueError(f"teacher {source!r} is a {config.model_type!r} model, a student: give the {family.teacher_type} "
                         "teacher it was distilled from")
    if expected is not None and family.name != expected:
        raise ValueError(f"teacher {source!r} is a {family.name} model but teacher.family is {expected}: set "
                         f"teacher.family: {family.name}")
    return family


def check_teacher(source: str, *, cache_root: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                  family: str = "bert") -> list[str]:
    """Problems of a pretrained teacher, found from its config, tensor names and tokenizer files, without
    building the model: of no supported family or not of ``family`` (``teacher.family``), no masked-LM head, fewer
    positions than ``max_seq_len``, a vocabulary that does not match ``tokenizer`` (either way). Returns one
    message per problem."""
    try:
        path = local_or_error(source, cache_root, what="teacher")
    except ValueError as e:
        return [str(e)]
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return [f"teacher {source!r} is a directory without config.json: point at a saved HF model directory"]
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, JSON errors, transformers' strict config validation
        return [f"teacher {source!r} cannot be loaded ({' '.join(str(e).split())[:300]}): give a hub id this machine "
                "can reach, a local HF folder or s3://"]
    try:
        fam = _family_of(source, config, family)
    except ValueError as e:
        return [str(e)]
    problems = []
    try:
        keys = checkpoint_keys(path) if os.path.isdir(path) else None
    except Exception as e:  # a cut-off or foreign weights file: safetensors, torch and OS errors
        return [f"teacher {source!r}: its weights cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"]
    if os.path.isdir(path) and keys is None:
        problems.append(f"teacher {source!r} holds no weights (model.safetensors or pytorch_model.bin)")
    elif keys is not None and fam.head_prefix is not None and \
            not any(k.startswith(fam.head_prefix) and "decoder.weight" not in k for k in keys):
        problems.append(_no_head_message(source, fam, f"its weights hold no {fam.head_prefix}* tensors"))
    if max_seq_len > fam.max_tokens(config):
        problems.append(f"data.max_seq_len={max_seq_len} > the {fam.max_tokens(config)} tokens the teacher's positions "
                        f"take ({source}): lower data.max_seq_len")
    problems.extend(vocabulary_problems(source, path, config.vocab_size, tokenizer))
    return problems


def vocabulary_problems(source: str, path: str, vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's ids must index the teacher's embedding table and mean the same tokens. The teacher's own
    tokenizer files, when its folder has them, must hold the same vocabulary; without them the table may exceed
    the tokenizer only by padding (< 128 rows, as vocabularies padded to a multiple of 64 or 128)."""
    n = len(tokenizer)
    fix = f"set data.tokenizer to the teacher's own tokenizer (e.g. data.tokenizer: {source})"
    if vocab_size < n:
        return [f"data.tokenizer has {n:,} tokens but the teacher's vocabulary has {vocab_size:,}: ids past "
                f"{vocab_size - 1} would index beyond its embedding table; {fix}"]
    own = _own_tokenizer(path)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        return [f"the teacher's own tokenizer ({len(own):,} tokens) and data.tokenizer ({n:,} tokens) differ, so "
                f"ids would mean other tokens to the teacher; {fix}"]
    if own is None and vocab_size - n >= 128:
        return [f"the teacher's vocabulary has {vocab_size:,} entries and data.tokenizer {n:,}: more than padding "
                f"apart, so it was trained with another tokenizer; {fix}"]
    return []


def _own_tokenizer(path: str):
    names = ("tokenizer.json", "vocab.txt", "vocab.json")  # vocab.json (+ merges.txt): a byte-level BPE's files
    if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)):
        return None
    return AutoTokenizer.from_pretrained(path, use_fast=True)


def teacher_num_layers(source: str, cache_root: str) -> int:
    """The encoder depth of a pretrained teacher (read from its config only); ValueError when it cannot be found."""
    return AutoConfig.from_pretrained(local_or_error(source, cache_root, what="teacher")).num_hidden_layers
