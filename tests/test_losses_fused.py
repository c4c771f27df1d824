"""losses.kd_mlm_loss, the fused L_ce + L_mlm, against today's ce_loss and mlm_loss.

Most tests run the block math eagerly (``COMPILE_BLOCKS`` off): the compiled path is exercised by a few small
calls (golden file, one recompile check, fullgraph), because each compile costs seconds on this machine.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import losses
from pipeline.masking import IGNORE_INDEX

NEG_INF = -math.inf
ALPHA_CE, ALPHA_MLM = 5.0, 2.0


@pytest.fixture(autouse=True)
def _eager_blocks(monkeypatch):
    monkeypatch.setattr(losses, "COMPILE_BLOCKS", False)


def _inputs(b=2, t=6, v=40, seed=0, dtype=torch.float32):
    """Student and teacher logits, labels at ~1/3 of the positions, an attention mask with padding."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g).to(dtype)
    te = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[-1, t - 2 :] = 0  # padding
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[(torch.rand(b, t, generator=g) > 0.4) | (attention == 0)] = IGNORE_INDEX
    labels[0, 1] = 3  # at least one label
    return s, te, labels, attention


def _kd_weight(kind, labels, attention):
    return attention.float() if kind == "all" else (labels != IGNORE_INDEX).float()


def _reference(s, te, labels, weight, *, temperature, norm_ce=None, norm_mlm=None):
    """alpha_ce · ce_loss + alpha_mlm · mlm_loss, their values and torch.autograd's gradient (fp32)."""
    s = s.detach().float().requires_grad_(True)
    ce = losses.ce_loss(s, te.float(), weight.bool(), temperature=temperature, normalizer=norm_ce)
    mlm = losses.mlm_loss(s, labels, normalizer=norm_mlm)
    total = ALPHA_CE * ce + ALPHA_MLM * mlm
    (grad,) = torch.autograd.grad(total, s)
    return total.detach(), ce.detach(), mlm.detach(), grad


def _fused(s, te, labels, weight, *, temperature, norm_ce=None, norm_mlm=None, alpha_ce=ALPHA_CE,
           alpha_mlm=ALPHA_MLM):
    s = s.detach().clone().requires_grad_(True)
    weighted, ce, mlm = losses.kd_mlm_loss(s, te, labels, weight, temperature=temperature, alpha_ce=alpha_ce,
                                           alpha_mlm=alpha_mlm, norm_ce=norm_ce, norm_mlm=norm_mlm)
    (grad,) = torch.autograd.grad(weighted, s)
    return weighted.detach(), ce, mlm, grad


def _norms(kind, weight, labels):
    n_ce, n_mlm = weight.sum(), (labels != IGNORE_INDEX).sum().float()
    if kind == "none":
        return None, None
    if kind == "float":
        return float(n_ce) * 1.5, float(n_mlm) + 2.0  # not the local counts, so a wrong norm shows
    return n_ce * 1.5, n_mlm + 2.0


def _assert_close(got, want, rel=1e-5):
    assert got.item() == pytest.approx(want.item(), rel=rel)


def _assert_grad_close(got, want, rel=1e-5):
    """Elementwise, to ``rel`` of the gradient's largest entry (entries near 0 have no relative precision)."""
    assert got.shape == want.shape
    assert torch.allclose(got.float(), want, rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("block_rows", [1, 5, None])  # None: the default block (the 12 rows fit in one)
@pytest.mark.parametrize("norm_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("kd_positions", ["all", "masked"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_value_and_gradient_equal_ce_loss_plus_mlm_loss(monkeypatch, block_rows, norm_kind, kd_positions,
                                                        temperature):
    s, te, labels, attention = _inputs()
    if block_rows is not None:  # 12 rows in blocks of 5: the last block (2 rows) runs padded
        monkeypatch.setitem(losses.KD_BLOCK_ELEMS, "cpu", block_rows * s.shape[-1])
        assert losses._block_rows(s.shape[-1], s.device) == block_rows
    weight = _kd_weight(kd_positions, labels, attention)
    norm_ce, norm_mlm = _norms(norm_kind, weight, labels)
    want = _reference(s, te, labels, weight, temperature=temperature, norm_ce=norm_ce, norm_mlm=norm_mlm)
    got = _fused(s, te, labels, weight, temperature=temperature, norm_ce=norm_ce, norm_mlm=norm_mlm)
    for g, w in zip(got[:3], want[:3]):
        _assert_close(g, w)
    _assert_grad_close(got[3], want[3])
    assert got[1].dtype == got[2].dtype == torch.float32 and not got[1].requires_grad and not got[2].requires_grad


def test_bool_kd_mask_and_a_norm_tensor_that_requires_grad_are_accepted():
    s, te, labels, attention = _inputs()
    norm = torch.tensor(7.0, requires_grad=True)  # a constant to the loss: no gradient flows to it
    want = _reference(s, te, labels, attention.float(), temperature=2.0, norm_ce=7.0)
    got = _fused(s, te, labels, attention.bool(), temperature=2.0, norm_ce=norm)
    _assert_close(got[0], want[0])
    _assert_grad_close(got[3], want[3])
    assert norm.grad is None


def test_a_term_with_alpha_zero_is_left_out_but_reported():
    s, te, labels, attention = _inputs()
    te[0, 0, :] = NEG_INF  # L_ce is NaN; with alpha_ce = 0 it must not reach the weighted loss or the gradient
    weighted, ce, mlm, grad = _fused(s, te, labels, attention.float(), temperature=2.0, alpha_ce=0.0)
    assert math.isnan(ce.item())
    _assert_close(weighted, ALPHA_MLM * losses.mlm_loss(s, labels))
    assert torch.isfinite(grad).all()


def test_a_second_backward_with_retain_graph_gives_the_same_gradient():
    s, te, labels, attention = _inputs()
    s.requires_grad_(True)
    weighted, _, _ = losses.kd_mlm_loss(s, te, labels, attention.float(), temperature=2.0, alpha_ce=ALPHA_CE,
                                        alpha_mlm=ALPHA_MLM, norm_ce=None, norm_mlm=None)
    (first,) = torch.autograd.grad(weighted * 3.0, s, retain_graph=True)
    (second,) = torch.autograd.grad(weighted * 3.0, s)
    assert torch.equal(first, second)
    _assert_grad_close(first, 3.0 * _reference(s, te, labels, attention.float(), temperature=2.0)[3])


def _ops_and_outputs(fn):
    """(aten op, output dtype, numel) of every tensor an op allocates while ``fn`` runs."""

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.seen.append((str(func), o.dtype, o.numel()))
            return out

    with Record() as rec:
        fn()
    return rec.seen


def test_bf16_logits_agree_with_the_fp32_reference_and_no_fp32_copy_of_the_logits_is_made(monkeypatch):
    s, te, labels, attention = _inputs(b=4, t=6, dtype=torch.bfloat16)  # 24 rows
    vocab = s.shape[-1]
    monkeypatch.setitem(losses.KD_BLOCK_ELEMS, "cpu", 4 * vocab)  # blocks of 4 rows
    weight = attention.float()
    want = _reference(s, te, labels, weight, temperature=2.0)  # fp32 math on the same (bf16-valued) logits
    s = s.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = {}
        ops = _ops_and_outputs(lambda: out.update(zip(("w", "ce", "mlm"), losses.kd_mlm_loss(
            s, te, labels, weight, temperature=2.0, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM, norm_ce=None,
            norm_mlm=None))))
    ops += _ops_and_outputs(lambda: out.update(grad=torch.autograd.grad(out["w"], s)[0]))
    for name, w in zip(("w", "ce", "mlm"), want[:3]):
        _assert_close(out[name], w, rel=1e-5)  # fp32 inside the block: only the reduction order differs
    assert out["grad"].dtype == torch.bfloat16
    _assert_grad_close(out["grad"], want[3], rel=1e-2)  # the buffer is rounded to bf16 (8 bits)
    # fp32 exists only block-sized: nothing fp32 of more than 4 rows × V, and the single saved tensor is the
    # bf16 gradient buffer (not the logits: no recomputing backward).
    big_fp32 = [(op, n) for op, dtype, n in ops if dtype == torch.float32 and n > 4 * vocab]
    assert not big_fp32, big_fp32
    assert any(dtype == torch.float32 and n == 4 * vocab for _, dtype, n in ops)  # the check sees the blocks
    assert [(x.dtype, tuple(x.shape)) for x in saved] == [(torch.bfloat16, (24, vocab))]
    assert saved[0].data_ptr() not in (s.data_ptr(), te.data_ptr())


# ---- −inf and NaN -----------------------------------------------------------------------------------------


def _teacher_with_masked_entries():
    _, te, _, _ = _inputs(seed=1)
    te[0, 0, [3, 17, 39]] = NEG_INF  # a few masked vocabulary entries
    te[0, 2, :] = NEG_INF
    te[0, 2, 5] = 1.0  # a one-hot teacher
    te[1, :, 0] = NEG_INF  # an unused token id
    return te


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_minus_inf_teacher_logits_add_nothing_even_where_the_student_masks_them_too(temperature):
    s, _, labels, attention = _inputs()
    te = _teacher_with_masked_entries()
    s[~torch.isfinite(te)] = NEG_INF  # the student masks the same entries (F.kl_div alone would give NaN)
    s[0, 0, 3] = 0.0  # … but not this one: still p_t = 0 there, so it adds nothing either
    labels[~torch.isfinite(s).all(-1)] = IGNORE_INDEX  # keep L_mlm finite: its −inf case is tested below
    weight = attention.float()
    want = _reference(s, te, labels, weight, temperature=temperature)
    got = _fused(s, te, labels, weight, temperature=temperature)
    assert torch.isfinite(want[0])
    for g, w in zip(got[:3], want[:3]):
        _assert_close(g, w)
    _assert_grad_close(got[3], want[3])
    assert not got[3][torch.isneginf(s)].any()


def test_student_minus_inf_where_the_teacher_has_probability_gives_plus_inf_and_a_finite_gradient():
    s, te, labels, attention = _inputs()
    s[0, 1, 7] = NEG_INF
    labels[0, 1] = 3
    weight = attention.float()
    weighted, ce, _, grad = _fused(s, te, labels, weight, temperature=2.0)
    assert ce.item() == math.inf and weighted.item() == math.inf
    assert torch.isfinite(grad).all()
    _assert_grad_close(grad, _reference(s, te, labels, weight, temperature=2.0)[3])


@pytest.mark.parametrize("bad", ["all -inf", "+inf", "nan"])
def test_a_teacher_row_that_is_no_distribution_gives_nan_where_weighted_and_nothing_where_not(bad):
    s, te, labels, attention = _inputs()
    weight = attention.float()
    clean = _fused(s, te, labels, weight, temperature=2.0)
    value = {"all -inf": NEG_INF, "+inf": math.inf, "nan": math.nan}[bad]
    te_bad = te.clone()
    if bad == "all -inf":
        te_bad[0, 4, :] = value
    else:
        te_bad[0, 4, 9] = value
    assert math.isnan(_fused(s, te_bad, labels, weight, temperature=2.0)[1].item())
    weight[0, 4] = 0.0  # the same row, not weighted: exactly what the loss is without it
    want = _reference(s, te, labels, weight, temperature=2.0)
    got = _fused(s, te_bad, labels, weight, temperature=2.0)
    assert got[1].item() == pytest.approx(want[1].item(), rel=1e-5) and clean[1].item() != got[1].item()
    assert torch.isfinite(got[3]).all()


def test_garbage_logits_at_an_unsupervised_position_add_exactly_zero_to_loss_and_gradient():
    s, te, labels, attention = _inputs()
    weight = attention.float()
    assert weight[1, 5] == 0 and labels[1, 5] == IGNORE_INDEX  # a padded position
    want = _fused(s, te, labels, weight, temperature=2.0)
    s_bad, te_bad = s.clone(), te.clone()
    s_bad[1, 5, :5], s_bad[1, 5, 5:10], s_bad[1, 5, 10:] = math.nan, math.inf, NEG_INF
    te_bad[1, 5, :] = math.nan
    got = _fused(s_bad, te_bad, labels, weight, temperature=2.0)
    for g, w in zip(got[:3], want[:3]):
        assert g.item() == w.item()
    assert torch.equal(got[3], want[3]) and not got[3][1, 5].any()
    s_bad[0, 0, 0] = math.nan  # at a weighted position the NaN is reported
    assert math.isnan(_fused(s_bad, te, labels, weight, temperature=2.0)[0].item())


def test_mlm_with_minus_inf_student_logits_agrees_with_cross_entropy():
    s, te, labels, attention = _inputs()
    labels[:] = IGNORE_INDEX
    labels[0, 1], labels[1, 3] = 5, 7
    s[0, 1, [0, 9, 33]] = NEG_INF  # masked entries that are not the label
    s[1, :, 2] = NEG_INF
    weight = torch.zeros(2, 6)  # L_mlm alone, to compare with F.cross_entropy directly
    s_ref = s.clone().requires_grad_(True)
    ref = F.cross_entropy(s_ref.reshape(-1, 40), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    (g_ref,) = torch.autograd.grad(ref * ALPHA_MLM, s_ref)
    weighted, ce, mlm, grad = _fused(s, te, labels, weight, temperature=2.0)
    assert ce.item() == 0.0
    _assert_close(mlm, ref)
    _assert_close(weighted, ref * ALPHA_MLM)
    _assert_grad_close(grad, g_ref)
    s[0, 1, 5] = NEG_INF  # the label itself has probability 0: the true cross-entropy is +inf
    assert _fused(s, te, labels, weight, temperature=2.0)[2].item() == math.inf


@pytest.mark.parametrize("norm_kind", ["none", "float"])
def test_no_labels_give_mlm_zero_and_no_weights_give_ce_zero_never_nan(norm_kind):
    s, te, _, attention = _inputs()
    no_labels = torch.full((2, 6), IGNORE_INDEX)
    norms = {"none": {}, "float": {"norm_ce": 10.0, "norm_mlm": 4.0}}[norm_kind]
    weighted, ce, mlm, grad = _fused(s, te, no_labels, attention.float(), temperature=2.0, **norms)
    assert mlm.item() == 0.0 and torch.isfinite(grad).all()
    _assert_close(weighted, ALPHA_CE * losses.ce_loss(s, te, attention.bool(), temperature=2.0,
                                                      normalizer=norms.get("norm_ce")))
    weighted, ce, mlm, grad = _fused(s, te, no_labels, torch.zeros(2, 6), temperature=2.0, **norms)
    assert weighted.item() == ce.item() == mlm.item() == 0.0 and not grad.any()


# ---- the golden file, the compiled path ---------------------------------------------------------------------


@pytest.mark.parametrize("compiled, fused", [(False, True), (True, True), (False, False)])
def test_the_step_reproduces_the_golden_losses_fused_or_not(monkeypatch, compiled, fused):
    """pipeline.step.distill_step (fused by default, its blocks compiled or eager; and the separate terms)."""
    import functools

    import test_step_golden
    from pipeline import step as step_lib

    monkeypatch.setattr(losses, "COMPILE_BLOCKS", compiled)
    monkeypatch.setattr(test_step_golden.step_lib, "distill_step", functools.partial(step_lib.distill_step, fused=fused))
    got = test_step_golden._measure()["distill"]
    want = json.loads(test_step_golden.GOLDEN.read_text())["distill"]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w)
        for term in w:  # three AdamW steps: the summation order differs, so not bit for bit
            assert g[term] == pytest.approx(w[term], rel=1e-5), f"step {i + 1}: {term}"
    assert losses.COMPILE_BLOCKS is compiled  # a compile failure would have switched it off


def test_compiled_blocks_agree_with_eager_and_a_new_row_count_compiles_nothing_new(monkeypatch):
    """The compiled path itself runs (a failed compile falls back to eager with a warning, which would compare eager
    with eager): no fallback warning, compilation still on, and frames compiled by the first call only."""
    import warnings

    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled by an earlier test, the block would count no frame here
    monkeypatch.setattr(losses, "_compiled_block", None)
    monkeypatch.setattr(losses, "COMPILE_BLOCKS", True)
    monkeypatch.setitem(losses.KD_BLOCK_ELEMS, "cpu", 8 * 40)  # blocks of 8 rows
    frames = [counters["frames"]["ok"]]
    for b in (5, 7):  # 30 rows (8, 8, 8, 6 padded) then 42 rows (…, 2 padded): one block shape, one compile
        s, te, labels, attention = _inputs(b=b, t=6)
        weight = attention.float()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _fused(s, te, labels, weight, temperature=2.0)
        fallbacks = [str(w.message) for w in caught if "running it eagerly" in str(w.message)]
        assert not fallbacks and losses.COMPILE_BLOCKS is True, fallbacks
        frames.append(counters["frames"]["ok"])
        monkeypatch.setattr(losses, "COMPILE_BLOCKS", False)
        want = _fused(s, te, labels, weight, temperature=2.0)
        monkeypatch.setattr(losses, "COMPILE_BLOCKS", True)
        for g, w in zip(got[:3], want[:3]):
            _assert_close(g, w, rel=1e-6)
        _assert_grad_close(got[3], want[3], rel=1e-6)
    assert frames[1] > frames[0], "the first call compiled nothing"
    assert frames[2] == frames[1], "the second row count compiled again"


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(losses, "_compiled_block", broken)
    s, te, labels, attention = _inputs()
    want = _fused(s, te, labels, attention.float(), temperature=2.0)  # eager (the fixture's switch is off …)
    monkeypatch.setattr(losses, "COMPILE_BLOCKS", True)  # … and on again
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        got = _fused(s, te, labels, attention.float(), temperature=2.0)
        _fused(s, te, labels, attention.float(), temperature=2.0)
    assert len(record) == 1 and losses.COMPILE_BLOCKS is False
    assert torch.equal(got[3], want[3]) and got[0].item() == want[0].item()


def test_an_input_error_is_raised_and_leaves_compilation_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("index out of bounds")

    monkeypatch.setattr(losses, "COMPILE_BLOCKS", True)
    monkeypatch.setattr(losses, "_compiled_block", broken)
    s, te, labels, attention = _inputs()
    labels[0, 1] = 40  # no such class: eager fails as well, so the inputs are at fault
    with pytest.raises(RuntimeError, match="index"):
        _fused(s, te, labels, attention.float(), temperature=2.0)
    assert losses.COMPILE_BLOCKS is True


def test_forward_and_backward_compile_as_one_graph_without_host_syncs(monkeypatch):
    """fullgraph=True raises on any graph break: .item(), bool(), boolean indexing or a data-dependent shape
    would each break the graph. The backward runs through the compiled autograd.Function."""
    monkeypatch.setitem(losses.KD_BLOCK_ELEMS, "cpu", 5 * 40)  # three blocks, the last one padded
    s, te, labels, attention = _inputs()
    weight = attention.float()

    def loss(s, te, labels, weight, norm_ce):
        return losses.kd_mlm_loss(s, te, labels, weight, temperature=2.0, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM,
                                  norm_ce=norm_ce, norm_mlm=None)

    norm_ce = weight.sum()
    explanation = torch._dynamo.explain(loss)(s.requires_grad_(True), te, labels, weight, norm_ce)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(loss, fullgraph=True)
    s_c = s.detach().clone().requires_grad_(True)
    weighted, ce, mlm = compiled(s_c, te, labels, weight, norm_ce)
    weighted.backward()
    want = _reference(s, te, labels, weight, temperature=2.0, norm_ce=norm_ce)
    for g, w in zip((weighted, ce, mlm), want[:3]):
        _assert_close(g.detach(), w)
    _assert_grad_close(s_c.grad, want[3])


def test_importing_the_module_compiles_nothing():
    code = ("import pipeline.losses as l; from torch._dynamo.utils import counters; "
            "assert l._compiled_block is None and not counters['frames'], dict(counters)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
