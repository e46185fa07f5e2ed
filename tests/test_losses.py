"""The sparse losses equal their definitions on dense [B, T, V] distributions (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F
from profuser_plugins.losses.fuse_kl import FuseKL
from profuser_plugins.losses.jsd import JSD
from profuser_plugins.losses.reverse_kl import ReverseKL
from profuser_plugins.losses.sft import SFT
from pydantic import ValidationError

from profuser import losses as kernel
from profuser.losses import sparse_logits
from profuser.plugins import Engine
from profuser.teacher import teacher_logprobs

B, T, V, K = 3, 7, 40, 5


def make_batch(seed=0, dtype=torch.float32, unused_slots=2, shape=(B, T, V, K)):
    """Random logits and a batch as the trainer passes it (unshifted, indexed like input_ids)."""
    B, T, V, K = shape
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, T - 2] = -100  # a hole inside a response
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    tlogits = torch.randn(B, T, K, generator=g) * 3
    tlogits[..., K - unused_slots :] = float("-inf")  # unused slots ...
    ids[..., K - unused_slots :] = 0  # ... with an arbitrary id
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 3] = True
    weight = torch.tensor([1.0, 0.1, 2.5, 0.5])[:B]
    return logits, {"labels": labels, "teacher_ids": ids, "teacher_logits": tlogits, "teacher_mask": mask, "weight": weight}


def dense_reference(logits, batch, *, beta, divergence="kl", temperature=2.0, top_p=0.95):
    """Eq. 4 on full distributions, shifting the logits (FuseLLM's way): a dense teacher P [B, T-1, V]."""
    logq = F.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    labels = batch["labels"][:, 1:]
    labelled = labels != -100
    ce = -logq.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    logp = teacher_logprobs(batch["teacher_logits"][:, 1:], temperature=temperature, top_p=top_p).double()
    probs = logp.exp()  # 0 on dropped slots
    P = torch.zeros_like(logq).scatter_add(-1, batch["teacher_ids"][:, 1:], probs)
    has = batch["teacher_mask"][:, 1:] & labelled
    Q = logq.exp()
    if divergence == "kl":
        div = (torch.xlogy(P, P) - P * logq).sum(-1)
    elif divergence == "reverse_kl":
        logq_s = torch.log_softmax(logq.masked_fill(P == 0, float("-inf")), dim=-1)
        q_s = logq_s.exp()
        div = (q_s * (logq_s - P.log()).masked_fill(P == 0, 0)).sum(-1)
    else:
        M = (P + Q) / 2
        div = 0.5 * (torch.xlogy(P, P) - torch.xlogy(P, M) + Q * (logq - M.log())).sum(-1)
    w = batch["weight"][:, None].double()
    n = labelled.sum()
    ce_part = (ce * labelled * w).sum() / n
    div_part = (div * has * w).sum() / n
    return ce_part + beta * div_part, ce_part, div_part


@pytest.mark.parametrize("cls,divergence", [(FuseKL, "kl"), (ReverseKL, "reverse_kl"), (JSD, "jsd")])
@pytest.mark.parametrize("merge_elements", [0, 1 << 22])
def test_sparse_equals_dense_values_and_gradients(cls, divergence, merge_elements, monkeypatch):
    monkeypatch.setattr(kernel, "MERGE_ELEMENTS", merge_elements)
    logits, batch = make_batch()
    loss, parts = cls()(logits, batch)
    (grad,) = torch.autograd.grad(loss, logits)
    ref, ref_ce, ref_div = dense_reference(logits, batch, beta=0.5, divergence=divergence)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert parts["ce"] == pytest.approx(ref_ce.item(), rel=1e-5)
    assert parts[cls.part] == pytest.approx(ref_div.item(), rel=1e-4, abs=1e-7)
    assert ref_div.item() > 0  # the batch really has teacher positions
    # the last position predicts nothing: no gradient there
    assert grad[:, -1].abs().max() == 0


def test_fuse_kl_gradient_is_the_fused_formula():
    """dL/dz = ((w_ce + beta w_kl) softmax(z) - w_ce onehot(label) - beta w_kl P_S) / n."""
    logits, batch = make_batch(seed=3)
    beta = 0.7
    loss, _ = FuseKL()(logits, batch, beta=beta)
    (grad,) = torch.autograd.grad(loss, logits)
    z = logits[:, :-1].detach()
    labels = batch["labels"][:, 1:]
    labelled = (labels != -100).float()
    w = batch["weight"][:, None] * labelled
    w_kl = w * batch["teacher_mask"][:, 1:]
    P = torch.zeros_like(z).scatter_add(-1, batch["teacher_ids"][:, 1:], teacher_logprobs(batch["teacher_logits"][:, 1:]).exp())
    onehot = F.one_hot(labels.clamp_min(0), V) * labelled[..., None]
    expected = ((w + beta * w_kl)[..., None] * z.softmax(-1) - w[..., None] * onehot - (beta * w_kl)[..., None] * P) / labelled.sum()
    torch.testing.assert_close(grad[:, :-1], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("merge_elements", [0, 1 << 22])
def test_gradcheck_fused_function_float64(merge_elements, monkeypatch):
    # 0: every run of active rows is its own segment, gaps skipped; else all merged into one
    monkeypatch.setattr(kernel, "MERGE_ELEMENTS", merge_elements)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 6, (9, 3), generator=g)  # duplicates included
    active = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    coef = torch.randn(9, dtype=torch.float64, generator=g)  # negative coefficients too
    for chunk_rows in (1, 2, 4, 100):

        def both(z, chunk_rows=chunk_rows):
            return sparse_logits(z, ids, active, chunk_rows=chunk_rows)

        def scaled(z, chunk_rows=chunk_rows):
            lse, z_at = sparse_logits(z, ids, active, chunk_rows=chunk_rows)
            return (lse * coef).sum() + (z_at * coef[:, None]).sum()

        assert torch.autograd.gradcheck(both, (z,))
        assert torch.autograd.gradcheck(scaled, (z,))
    lse, z_at = sparse_logits(z, ids, active)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1) * active)
    # inactive rows get no gradient from lse, only from z_at
    (grad,) = torch.autograd.grad(lse.sum(), z)
    assert grad[~active].abs().max() == 0 and grad[active].abs().min() > 0
    torch.testing.assert_close(z_at, z.gather(1, ids))


def test_second_backward_recomputes_the_same_gradient():
    """The first backward turns the forward's buffer into the gradient; a second one (retain_graph)
    must recompute it, bit for bit."""
    logits, batch = make_batch(seed=12)
    loss, _ = FuseKL()(logits, batch)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss, logits)[0]
    assert torch.equal(first, second)
    assert first.abs().sum() > 0


def test_no_grad_forward_equals_grad_forward():
    logits, batch = make_batch(seed=13)
    with torch.no_grad():
        quiet, _ = FuseKL()(logits, batch)
    torch.testing.assert_close(quiet, FuseKL()(logits, batch)[0])


@pytest.mark.parametrize("cls", [FuseKL, ReverseKL, JSD])
def test_gradcheck_whole_loss_float64(cls):
    logits, batch = make_batch(seed=5, dtype=torch.float64, shape=(2, 5, 12, 4))
    loss_fn = cls()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, batch)[0], (logits,))


def test_sft_equals_cross_entropy():
    logits, batch = make_batch(seed=6)
    del batch["weight"]  # default weight 1: exactly torch's mean over labelled tokens
    loss, parts = SFT()(logits, batch)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0])
    assert parts == {"ce": pytest.approx(ref.item())}
    # sft ignores the teacher, and equals fuse_kl at beta = 0
    torch.testing.assert_close(FuseKL()(logits, batch, beta=0.0)[0], loss)


def test_beta_override_and_weights():
    logits, batch = make_batch(seed=7)
    fuse = FuseKL({"beta": 0.5})
    _, parts = fuse(logits, batch)
    for beta in (0.0, 0.1, 2.0):
        loss, over = fuse(logits, batch, beta=beta)
        assert over["beta"] == beta
        assert loss.item() == pytest.approx(parts["ce"] + beta * parts["kl"], rel=1e-6)
    # a weight shared by the whole batch scales the loss (it is not normalised away: Eq. 5's w1, w2)
    uniform = dict(batch, weight=torch.full((B,), 0.1))
    ones = dict(batch, weight=torch.ones(B))
    assert fuse(logits, uniform)[0].item() == pytest.approx(0.1 * fuse(logits, ones)[0].item(), rel=1e-6)
    # weight 0 removes an example entirely
    zero = dict(batch, weight=torch.tensor([1.0, 0.0, 1.0]))
    grad = torch.autograd.grad(fuse(logits, zero)[0], logits)[0]
    assert grad[1].abs().max() == 0


def test_positions_without_teacher_are_ce_only():
    logits, batch = make_batch(seed=8)
    no_teacher = dict(batch, teacher_mask=torch.zeros(B, T, dtype=torch.bool))
    loss, parts = FuseKL()(logits, no_teacher)
    torch.testing.assert_close(loss, SFT()(logits, batch)[0])
    assert parts["kl"] == 0
    # a teacher on a prompt position (no label there) is ignored too
    prompt_only = dict(batch, teacher_mask=batch["labels"] == -100)
    torch.testing.assert_close(FuseKL()(logits, prompt_only)[0], SFT()(logits, batch)[0])


def test_unused_teacher_slot_is_ignored_whatever_its_id():
    logits, batch = make_batch(seed=9, unused_slots=2)
    loss, _ = FuseKL()(logits, batch)
    grad = torch.autograd.grad(loss, logits)[0]
    other = dict(batch, teacher_ids=batch["teacher_ids"].clone())
    other["teacher_ids"][..., -2:] = torch.randint(0, V, (B, T, 2))  # garbage ids, including real ones
    loss2, _ = FuseKL()(logits, other)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(torch.autograd.grad(loss2, logits)[0], grad)
    # and equals a teacher stored with fewer slots
    fewer = dict(batch, teacher_ids=batch["teacher_ids"][..., :-2], teacher_logits=batch["teacher_logits"][..., :-2])
    torch.testing.assert_close(FuseKL()(logits, fewer)[0], loss)


def test_teacher_equal_to_student_gives_zero_kl():
    """KL(P_S || P_T) = 0 when the student is the teacher (k = V, temperature 1, top-p 1)."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    ids = torch.arange(V).expand(B, T, V)
    batch = {"labels": labels, "teacher_ids": ids, "teacher_logits": logits.detach(), "teacher_mask": torch.ones(B, T, dtype=torch.bool)}
    teacher_shifted = dict(batch, teacher_logits=F.pad(logits.detach()[:, :-1], (0, 0, 1, 0)))
    for cls in (FuseKL, ReverseKL, JSD):
        _, parts = cls({"temperature": 1.0, "top_p": 1.0})(logits, teacher_shifted)
        assert abs(parts[cls.part]) < 1e-6
    assert JSD()(logits, batch)[1]["jsd"] <= math.log(2)


def test_bfloat16_logits_keep_their_dtype():
    logits, batch = make_batch(seed=11)
    low = logits.detach().bfloat16().requires_grad_()
    loss, _ = FuseKL()(low, batch)
    grad = torch.autograd.grad(loss, low)[0]
    assert grad.dtype == torch.bfloat16
    ref = dense_reference(low.float(), batch, beta=0.5)[0]
    ref_grad = torch.autograd.grad(ref, low)[0]
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=1e-3, rtol=1e-2)


def test_registered_and_params_validated():
    registry = Engine(entrypoints=False).registry
    assert set(registry.names("losses")) >= {"sft", "fuse_kl", "reverse_kl", "jsd"}
    assert registry.get("losses", "kl").cls is FuseKL
    loss = registry.build("losses", "fuse_kl", {"beta": 0.1, "temperature": 1.5})
    assert (loss.params.beta, loss.params.temperature, loss.params.top_p) == (0.1, 1.5, 0.95)
    for bad in ({"top_p": 1.5}, {"temperature": 0}, {"beta": -1}, {"topp": 0.9}):
        with pytest.raises(ValidationError):
            FuseKL(bad)


def _docs_loss_example() -> dict:
    """Run the first python block of docs/losses.md's "Extending Params" section as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    section = text[text.index("### Extending `Params`"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    namespace: dict = {"__name__": "docs_mixed_kl"}
    exec(compile(code, "docs/losses.md", "exec"), namespace)  # noqa: S102 (our own docs, run as a user would)
    return namespace


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_docs_params_example_interpolates_forward_and_reverse_kl(alpha):
    mixed_kl = _docs_loss_example()["MixedKL"]
    logits, batch = make_batch(seed=4)
    mixed, parts = mixed_kl({"alpha": alpha, "beta": 0.5})(logits, batch)
    _, forward = FuseKL({"beta": 0.5})(logits, batch)
    _, reverse = ReverseKL({"beta": 0.5})(logits, batch)
    expected = (1 - alpha) * forward["kl"] + alpha * reverse["reverse_kl"]
    assert parts["mixed_kl"] == pytest.approx(expected, rel=1e-5)
    assert parts["ce"] == pytest.approx(forward["ce"], rel=1e-6)
    mixed.backward()
    assert torch.isfinite(logits.grad).all()


def test_docs_params_example_registers_and_validates_its_params():
    import types

    namespace = _docs_loss_example()
    module = types.ModuleType("docs_mixed_kl")
    module.profuser_register_losses = namespace["profuser_register_losses"]
    engine = Engine(entrypoints=False, extra_plugins=[("mixed", module)])
    info = engine.registry.get("losses", "mixed_kl")
    assert info.cls.Params(alpha=0.25).temperature == 2.0  # the parent's params stay
    assert info.params_problems({"alpa": 0.2}) == [("alpa", "unknown field; did you mean alpha?")]
    assert info.params_problems({"alpha": 2}) and not info.params_problems({"alpha": 1})
