"""No host syncs and static shapes, and an aligned vocabulary, of the distillation step, on CPU:
each change must leave the step's math exactly as it was."""

import numpy as np
import pytest
import torch

from pipeline import batches, losses, models
from pipeline.config import LossSection, RunConfig, StudentSection, TeacherSection
from pipeline.step import Batch, distill_step, encode

VOCAB = 1000
SHAPE = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def _models(vocab: int = VOCAB, seed: int = 0):
    teacher = models.build_teacher_for_pretraining(SHAPE, vocab_size=vocab, pad_token_id=0, seed=seed).eval()
    student = models.build_student(StudentSection(), teacher, seed=seed)
    return teacher, student


def _batch(*, packed: bool, pad_last: int = 0, seed: int = 0, B: int = 3, T: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    if pad_last:
        am[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, ids, -100)
    labels[am == 0] = -100
    return Batch(input_ids_BT=ids, attention_mask_BT=am, labels_BT=labels, packed=packed)


def test_to_torch_says_on_the_host_whether_a_batch_is_packed():
    full = {"input_ids": np.ones((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int8)}
    padded = {"input_ids": np.ones((2, 4), np.int32), "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int8)}
    assert batches.to_torch(full, "cpu")["packed"] is True
    assert batches.to_torch(padded, "cpu")["packed"] is False
    assert batches.to_torch({"input_ids": np.ones((2, 4), np.int32)}, "cpu", {"input_ids": torch.long})["packed"] is False
    assert _batch(packed=True).model_attention_mask is None
    assert _batch(packed=False).model_attention_mask is not None


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_encode_gives_the_last_hidden_state_and_the_logits_of_the_full_forward(which):
    teacher, student = _models()
    model = (teacher if which == "teacher" else student).eval()
    b = _batch(packed=False, pad_last=5)
    hidden_BTD, logits_BTV = encode(model, b.input_ids_BT, b.attention_mask_BT)
    out = model(input_ids=b.input_ids_BT, attention_mask=b.attention_mask_BT, output_hidden_states=True)
    torch.testing.assert_close(hidden_BTD, out.hidden_states[-1])
    torch.testing.assert_close(logits_BTV, out.logits)


def test_a_packed_batch_without_an_attention_mask_gives_the_same_loss_and_gradients():
    teacher, student = _models()
    student.eval()  # no dropout: the two passes must see the same function
    grads = []
    for packed in (False, True):
        student.zero_grad()
        loss, terms = distill_step(student, teacher, _batch(packed=packed), loss_cfg=LossSection())
        loss.backward()
        grads.append((loss.detach(), {k: v.clone() for k, v in terms.items()},
                      [p.grad.clone() for p in student.parameters()]))
    (l0, t0, g0), (l1, t1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_dense_cosine_and_mse_losses_ignore_what_lies_outside_their_positions():
    """Garbage (NaN) outside the mask and a −inf teacher logit add exactly 0 to value and gradient."""
    g = torch.Generator().manual_seed(1)
    mask_BT = torch.tensor([[True, True, False]])
    s_BTD = torch.randn(1, 3, 8, generator=g)
    t_BTD = torch.randn(1, 3, 8, generator=g)
    s_BTD[0, 2], t_BTD[0, 2] = float("nan"), float("nan")
    s_BTD.requires_grad_(True)
    cos = losses.cosine_loss(s_BTD, t_BTD, mask_BT)
    cos.backward()
    ref = (1 - torch.nn.functional.cosine_similarity(s_BTD[0, :2].detach(), t_BTD[0, :2], dim=-1)).mean()
    torch.testing.assert_close(cos.detach(), ref)
    assert torch.isfinite(s_BTD.grad).all() and (s_BTD.grad[0, 2] == 0).all()

    s_BTV = torch.randn(1, 3, 6, generator=g)
    t_BTV = torch.randn(1, 3, 6, generator=g)
    t_BTV[0, 0, 1] = float("-inf")
    s_BTV[0, 2] = float("nan")
    s_BTV.requires_grad_(True)
    mse = losses.mse_loss(s_BTV, t_BTV, mask_BT)
    mse.backward()
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 1] = False
    ref = torch.where(keep, s_BTV[0, :2].detach() - t_BTV[0, :2], 0.0).square().sum() / 2
    torch.testing.assert_close(mse.detach(), ref)
    assert torch.isfinite(s_BTV.grad).all()
    assert s_BTV.grad[0, 0, 1] == 0 and (s_BTV.grad[0, 2] == 0).all()


def test_a_padded_vocabulary_changes_nothing_but_the_shapes():
    """Teacher and student padded from 1,000 to 1,024 rows: the same losses and gradients on the real rows, −inf
    logits on the padded ones, which stay −inf after an optimizer step; export gives back 1,000 rows."""
    teacher, student = _models()
    student.eval()
    p_teacher, _ = _models()
    assert models.pad_vocab(p_teacher, 64) == VOCAB
    p_student = models.build_student(StudentSection(), p_teacher, seed=0).eval()
    models.mask_padded_logits(p_student, VOCAB)
    assert p_teacher.config.vocab_size == p_student.config.vocab_size == 1024
    b = _batch(packed=True)
    _, logits = encode(p_student, b.input_ids_BT, None)
    assert logits.shape[-1] == 1024 and torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()

    out = []
    for t, s in ((teacher, student), (p_teacher, p_student)):
        s.zero_grad()
        loss, terms = distill_step(s, t, b, loss_cfg=LossSection(alpha_mse=0.5))
        loss.backward()
        out.append((terms, s.distilbert.embeddings.word_embeddings.weight.grad, s.vocab_projector.bias.grad))
    (t0, e0, b0), (t1, e1, b1) = out
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1[:VOCAB], e0, rtol=1e-4, atol=1e-7)
    assert (e1[VOCAB:] == 0).all() and (b1[VOCAB:] == 0).all()

    torch.optim.AdamW(p_student.parameters(), lr=1e-2, weight_decay=0.1).step()
    assert torch.isneginf(p_student.vocab_projector.bias[VOCAB:]).all()
    plain = models.unpadded(p_student, VOCAB)
    assert plain.config.vocab_size == VOCAB and plain.vocab_projector.weight.shape[0] == VOCAB
    assert p_student.config.vocab_size == 1024  # the trained model is left as it was
    torch.testing.assert_close(encode(plain, b.input_ids_BT, None)[1], encode(p_student, b.input_ids_BT, None)[1][..., :VOCAB])
    assert models.pad_vocab(plain, 0) == VOCAB and plain.config.vocab_size == VOCAB  # 0: no padding


@pytest.mark.parametrize("sets, message", [
    ({"compute.compile": "fast"}, "compute.compile='fast': use one of ['default', 'max-autotune', 'none', 'reduce-overhead']"),
    ({"compute.compile": ""}, "compute.compile='': use one of"),
    ({"compute.compile": "reduce-overhead"}, "compute.compile=reduce-overhead needs a GPU (it captures CUDA graphs)"),
    ({"compute.pad_vocab_multiple": -64}, "compute.pad_vocab_multiple=-64: use 0 (no padding) or a power of two up to 1024"),
    ({"compute.pad_vocab_multiple": 3}, "compute.pad_vocab_multiple=3: use 0 (no padding) or a power of two"),
    ({"compute.pad_vocab_multiple": 2048}, "compute.pad_vocab_multiple=2048: use 0"),
    ({"compute.pad_vocab_multiple": 10**9}, "compute.pad_vocab_multiple=1000000000: use 0"),
    ({"deepspeed.zero_stage": 0, "deepspeed.offload_optimizer": True},
     "deepspeed.offload_optimizer=true with deepspeed.zero_stage=0: offloading needs ZeRO stage 1, 2 or 3"),
])
def test_bad_compute_settings_are_refused_with_one_line(sets, message):
    """Each before Ray starts (pipeline/config/checks.py), one line each: a huge padding would otherwise fail only in the
    distill workers, after the teacher stage; a padding that is no power of two aligns nothing."""
    from pipeline.config import checks

    problems = checks.problems(RunConfig().with_overrides(sets))
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("sets", [{"compute.pad_vocab_multiple": 64}, {"compute.pad_vocab_multiple": 1024},
                                  {"compute.compile": "default"}, {"compute.compile": "max-autotune"},
                                  {"compute.compile": "reduce-overhead", "scaling.use_gpu": True}])
def test_good_compute_settings_pass(sets):
    from pipeline.config import checks

    assert checks.problems(RunConfig().with_overrides(sets)) == []


def test_a_sweep_over_compute_or_scaling_is_refused_for_what_it_is():
    from pipeline.config import checks

    space = {"compute.pad_vocab_multiple": {"type": "choice", "values": [0, 64]}}
    cfg = RunConfig().with_overrides({"sweep.space": space})
    (line,) = checks.sweep_problems(cfg) or checks.problems(cfg)
    assert "compute.* sets how fast a trial runs, not what it learns: set it for the whole sweep" in line


def test_an_invalid_zero_stage_under_ddp_is_one_line():
    from pipeline.config import checks

    problems = checks.problems(RunConfig().with_overrides({"scaling.strategy": "ddp", "deepspeed.zero_stage": 4}))
    assert problems == ["deepspeed.zero_stage=4: use 0, 1, 2 or 3"]


def test_the_compute_section_names_the_training_runs():
    """A padded vocabulary changes the checkpoint's shapes: a run with another compute section is another run."""
    from pipeline.stages import training

    assert "compute" in training.TRAIN_SECTIONS
    plain, padded = RunConfig(), RunConfig().with_overrides({"compute.pad_vocab_multiple": 64})
    assert training.run_name(plain, "distill", training.TRAIN_SECTIONS) != training.run_name(padded, "distill", training.TRAIN_SECTIONS)


@pytest.mark.parametrize("packed, kd_positions", [(True, "all"), (False, "masked")])
def test_the_distillation_step_compiles_as_one_graph_without_a_host_sync(packed, kd_positions):
    """Lever 1's proof on CPU: teacher and student forwards and all four loss terms trace as one graph under
    ``torch.compile(fullgraph=True)`` (a host sync or data-dependent shape would break it and raise), and the
    compiled forward and backward give the eager step's loss and gradients."""
    teacher, student = _models()
    student.eval()
    b = _batch(packed=packed, pad_last=0 if packed else 4)
    cfg = LossSection(alpha_mse=0.1, kd_positions=kd_positions)
    norms = {"norm_ce": torch.tensor(40.0), "norm_mlm": torch.tensor(12.0)}

    def step(ids_BT, am_BT, labels_BT):
        batch = Batch(input_ids_BT=ids_BT, attention_mask_BT=am_BT, labels_BT=labels_BT, packed=packed)
        return distill_step(student, teacher, batch, loss_cfg=cfg, **norms)[0]

    args = (b.input_ids_BT, b.attention_mask_BT, b.labels_BT)
    # Eager first: transformers installs its output-capturing hooks on a model's first call (under a lock, which
    # Dynamo does not trace); every later call is what a training run compiles.
    want = step(*args)
    want.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*args)
    got.backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(student.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
