"""What a model family is: the one object the pipeline asks about everything that differs between BERT,
RoBERTa and other teachers (pipeline/families/__init__.py lists them). No Ray, DeepSpeed or MLflow here.

A family knows its teacher's Hugging Face class and the student it builds from that teacher, where the encoder
and the language-model head of each sit, the tensor names of a trained head, the position offset of its
position table, how its tokenizer marks a word's continuation, and what its exported folder is for MLflow.
"""

from __future__ import annotations

import abc
import re

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


class Family(abc.ABC):
    """One model family. Subclasses set the attributes and implement the abstract methods."""

    name: str  # the config's teacher.family
    teacher_type: str  # the HF model_type of its teachers ("bert")
    student_type: str  # the HF model_type of its students ("distilbert")
    head_prefix: str | None  # state-dict prefix of the trained LM head ("cls.predictions."); None: tied, no own tensors
    tokenizer_model: str  # the `tokenizers` model of its tokenizers: "WordPiece" | "BPE"
    example_tokenizer: str  # a tokenizer of the family this machine has, for messages
    example_teacher: str  # a hub teacher of the family, for messages
    pipeline_task: str = "fill-mask"  # what MLflow's transformers flavour serves its exported folder as

    @property
    def pipeline_kwargs(self) -> dict:
        """What every call of the registered pipeline gets (MLflow's ``model_config``, and the summary's load line):
        a fill-mask pipeline cuts a long text to the model's window (``tokenizer_kwargs``; a call-time
        ``truncation=`` is a TypeError there); a text-generation pipeline takes none (it would hand
        ``tokenizer_kwargs`` to ``generate``)."""
        return {"tokenizer_kwargs": {"truncation": True}} if self.pipeline_task == "fill-mask" else {}
    objective: str = "mlm"  # the label term of the teacher's pre-training and of distillation: "mlm" | "clm"
    token_types: bool = True  # its models read token_type_ids as segments (GPT-2's would embed them as words)

    @property
    def model_types(self) -> tuple[str, ...]:
        """The HF model_types of this family's models: the teacher's and the student's."""
        return tuple(dict.fromkeys((self.teacher_type, self.student_type)))

    @abc.abstractmethod
    def teacher_config(self, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
                       max_tokens: int, vocab_size: int, pad_token_id: int) -> PretrainedConfig:
        """The HF config of a fresh teacher of this shape; ``max_tokens`` is the longest input in tokens (the
        position table may have more rows: :meth:`max_tokens`)."""

    @abc.abstractmethod
    def teacher_class(self) -> type[PreTrainedModel]:
        """The teacher's HF class with its LM head (``BertForMaskedLM``)."""

    @abc.abstractmethod
    def student_config(self, teacher_config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
        """The student's config: the teacher's vocabulary, positions, width, heads and FFN width, ``num_layers``
        layers, so that the teacher's weights fit it."""

    @abc.abstractmethod
    def student_class(self) -> type[PreTrainedModel]:
        """The student's HF class with its LM head."""

    @abc.abstractmethod
    def init_student(self, student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int]) -> None:
        """Copy the teacher's weights into ``student`` in place: embeddings, student layer i from teacher layer
        ``layers[i]``, the LM head. RuntimeError from torch on a shape mismatch."""

    @abc.abstractmethod
    def lm_logits(self, model: PreTrainedModel, hidden_NxD: torch.Tensor) -> torch.Tensor:
        """The LM head of ``model`` (teacher or student of this family) on last hidden states …×D: logits …×V."""

    @abc.abstractmethod
    def output_bias(self, model: PreTrainedModel) -> torch.nn.Parameter:
        """The LM head's output bias (V), where padded vocabulary rows get −inf."""

    def padding_bias(self, model: PreTrainedModel) -> torch.Tensor:
        """The V-row bias whose padded rows get −inf (:func:`pipeline.models.mask_padded_logits`): the LM head's
        own output bias."""
        return self.output_bias(model)

    def drop_padding_bias(self, model: PreTrainedModel) -> None:
        """Undo what :meth:`padding_bias` added once the padded rows are cut (export): nothing, for a head with its
        own bias."""

    @abc.abstractmethod
    def head_modules(self, model: PreTrainedModel) -> list[torch.nn.Module]:
        """The modules of the LM head (to compile beside the encoder)."""

    def for_lm(self, model: PreTrainedModel) -> PreTrainedModel:
        """``model`` set up to train or teach as a language model (in place; returned): nothing to change for a
        masked LM."""
        return model

    def encoder(self, model: PreTrainedModel) -> torch.nn.Module:
        """The model without its head (HF's ``base_model``): input ids → ``last_hidden_state`` B×T×D."""
        return model.base_model

    def max_tokens(self, config: PretrainedConfig) -> int:
        """The longest input in tokens the model's position table takes (BERT: one row per token)."""
        return config.max_position_embeddings

    def shape(self, config: PretrainedConfig) -> dict:
        """(layers, d, f, vocab) of a model of this family, for FLOP counts (pipeline/flops.py)."""
        return {"layers": config.num_hidden_layers, "d": config.hidden_size, "f": config.intermediate_size,
                "vocab": config.vocab_size}

    def starts_word(self, token: str) -> bool:
        """Whether a vocabulary entry begins a word (whole-word masking groups the rest with the word before)."""
        return True

    def tokenizer_problem(self, tokenizer: PreTrainedTokenizerBase, source: str) -> str | None:
        """Why ``tokenizer`` cannot serve this family's models (another kind of vocabulary, a missing special
        token), or None."""
        model = type(tokenizer.backend_tokenizer.model).__name__ if getattr(tokenizer, "is_fast", False) else "slow"
        if model != self.tokenizer_model:
            return (f"data.tokenizer {source!r} is a {model} tokenizer, but a {self.name} teacher reads "
                    f"{self.tokenizer_model} tokens: use the teacher's own tokenizer (e.g. {self.example_tokenizer})")
        missing = [name for name in ("cls", "sep", "mask", "pad") if getattr(tokenizer, f"{name}_token_id") is None]
        if missing:
            return (f"data.tokenizer {source!r} has no {'/'.join(missing)} token, which a {self.name} masked LM "
                    f"needs: use the teacher's own tokenizer (e.g. {self.example_tokenizer})")
        return None


class SameClassFamily(Family):
    """A family whose student is the teacher's own class with fewer layers (DistilRoBERTa, DistilGPT2): the
    student takes every tensor of the teacher whose name does not name a layer, and layer i takes teacher layer
    ``layers[i]`` (HF's ``extract.py``)."""

    layer_pattern: re.Pattern  # matches the layer index in a state-dict key, group 1 the index

    def student_class(self) -> type[PreTrainedModel]:
        return self.teacher_class()

    @torch.no_grad()
    def init_student(self, student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int]) -> None:
        source = teacher.state_dict()
        out = {}
        for key in student.state_dict():
            match = self.layer_pattern.search(key)
            src = key if match is None else f"{key[:match.start(1)]}{layers[int(match.group(1))]}{key[match.end(1):]}"
            out[key] = source[src]
        student.load_state_dict(out)
