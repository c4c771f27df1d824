"""Model families: everything that differs between BERT, RoBERTa and GPT-2 teachers, one object per family.

The rest of the pipeline asks a family (:func:`get` by the config's ``teacher.family``, :func:`of` by a model or
config) and never tests a family's name:

| family | teacher | student | tokenizer | objective | exported as |
|---|---|---|---|---|---|
| ``bert`` | ``BertForMaskedLM`` | ``DistilBertForMaskedLM`` (Sanh et al. 2019) | WordPiece, [CLS] … [SEP] | MLM | fill-mask |
| ``roberta`` | ``RobertaForMaskedLM`` | ``RobertaForMaskedLM``, half the layers (HF's DistilRoBERTa) | byte-level BPE, <s> … </s> | MLM | fill-mask |
| ``gpt2`` | ``GPT2LMHeadModel`` | ``GPT2LMHeadModel``, half the layers (HF's DistilGPT2) | byte-level BPE, <|endoftext|> between documents | causal LM | text-generation |

A family is a :class:`~pipeline.families.base.Family` in its own module, registered in :data:`FAMILIES`; the names
the config accepts (``pipeline.config.FAMILY_NAMES``) are these keys (tests/test_families.py checks it).
"""

from __future__ import annotations

from pipeline.families.base import Family
from pipeline.families.bert import BERT
from pipeline.families.gpt2 import GPT2
from pipeline.families.roberta import ROBERTA

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, GPT2)}


def get(name: str) -> Family:
    """The family called ``name`` (``teacher.family``); ValueError naming the supported ones."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported: supported families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def of(model_or_config) -> Family:
    """The family of an HF model or config, by its ``model_type`` (a teacher's or a student's); ValueError, one
    line naming the supported model types, for any other (ALBERT, ELECTRA, T5, …)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", "")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(f"model_type {model_type!r} is of no family distil distils: {supported_types()}")


def takes_segments(model) -> bool:
    """Whether ``model`` (a classifier or encoder of any HF type) should be given ``token_type_ids``: its forward
    takes them and, for a family's model, the family reads them as segments (DistilBERT's forward has none; GPT-2's
    would add the embedding of token 0 to every position)."""
    import inspect

    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    try:
        return of(model).token_types
    except ValueError:  # a model type of no family (a task teacher given by the user): its signature decides
        return True


def fix_for(config) -> str:
    """What to set for a model of ``config``'s type in a run of another family: ``set teacher.family: <its
    family>``, or, for a type of no family, the families there are."""
    try:
        return f"set teacher.family: {of(config).name}"
    except ValueError:
        return supported_types()


def supported_types() -> str:
    """One phrase naming the teacher families, for error messages: "the teacher families are bert (e.g.
    bert-base-uncased), …"."""
    return "the teacher families are " + ", ".join(f"{f.name} (e.g. {f.example_teacher})" for f in FAMILIES.values())


__all__ = ["BERT", "FAMILIES", "Family", "GPT2", "ROBERTA", "get", "of", "supported_types", "takes_segments", "fix_for"]
