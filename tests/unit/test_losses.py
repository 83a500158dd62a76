"""Distillation losses and the KD + CE objective, checked against hand-computed values."""

import numpy as np
import pytest
import torch

from tasks.errors import UserError
from tasks.losses import LOSSES, distillation_objective, get_loss, register_loss, resolve_loss

# An asymmetric 2x3 example: the student is confident where the teacher is not.
STUDENT = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
TEACHER = [[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * np.log(p / q)).sum(axis=-1)


def _loss(name: str, temperature: float = 1.0, beta: float = 0.5, s=STUDENT, t=TEACHER) -> np.ndarray:
    out = LOSSES[name](
        torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), temperature, beta
    )
    assert out.shape == (len(s),)
    return out.numpy()


def test_kl_matches_hand_computed_value():
    expected = _kl(_softmax(TEACHER), _softmax(STUDENT))
    np.testing.assert_allclose(_loss("kl"), expected, rtol=1e-12)


def test_kl_is_scaled_by_temperature_squared():
    softened = _kl(_softmax(TEACHER, 2.0), _softmax(STUDENT, 2.0))
    np.testing.assert_allclose(_loss("kl", temperature=2.0), 4.0 * softened, rtol=1e-12)


def test_reverse_kl_takes_the_student_distribution_first():
    expected = 9.0 * _kl(_softmax(STUDENT, 3.0), _softmax(TEACHER, 3.0))
    np.testing.assert_allclose(_loss("reverse_kl", temperature=3.0), expected, rtol=1e-12)
    assert not np.allclose(_loss("reverse_kl"), _loss("kl"))
    np.testing.assert_allclose(_loss("reverse_kl"), _loss("kl", s=TEACHER, t=STUDENT), rtol=1e-12)


def test_jsd_at_beta_zero_is_forward_kl_and_at_beta_one_is_reverse_kl():
    np.testing.assert_allclose(_loss("jsd", 2.0, beta=0.0), _loss("kl", 2.0), rtol=1e-12)
    np.testing.assert_allclose(_loss("jsd", 2.0, beta=1.0), _loss("reverse_kl", 2.0), rtol=1e-12)


def test_jsd_at_half_is_the_symmetric_jensen_shannon_divergence():
    p, q = _softmax(TEACHER, 2.0), _softmax(STUDENT, 2.0)
    m = 0.5 * (p + q)
    expected = 4.0 * (0.5 * _kl(p, m) + 0.5 * _kl(q, m))
    np.testing.assert_allclose(_loss("jsd", 2.0, beta=0.5), expected, rtol=1e-12)
    np.testing.assert_allclose(
        _loss("jsd", 2.0, beta=0.5), _loss("jsd", 2.0, beta=0.5, s=TEACHER, t=STUDENT), rtol=1e-12
    )


def test_jsd_weights_the_teacher_by_beta():
    p, q = _softmax(TEACHER), _softmax(STUDENT)
    m = 0.3 * p + 0.7 * q
    expected = 0.3 * _kl(p, m) + 0.7 * _kl(q, m)
    np.testing.assert_allclose(_loss("jsd", beta=0.3), expected, rtol=1e-12)
    np.testing.assert_allclose(
        _loss("jsd", beta=0.3), _loss("jsd", beta=0.7, s=TEACHER, t=STUDENT), rtol=1e-12
    )


def test_jsd_stays_finite_for_extreme_logits():
    s = torch.tensor([[1000.0, -1000.0, 0.0]])
    t = torch.tensor([[-1000.0, 1000.0, 0.0]])
    out = LOSSES["jsd"](s, t, 1.0, 0.5)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(np.log(2.0), rel=1e-5)


def test_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        _loss("jsd", beta=1.5)


def test_mse_is_mean_squared_logit_difference_and_ignores_temperature():
    expected = ((np.array(STUDENT) - np.array(TEACHER)) ** 2).mean(axis=-1)
    np.testing.assert_allclose(_loss("mse"), expected, rtol=1e-12)
    np.testing.assert_allclose(_loss("mse", temperature=4.0), expected, rtol=1e-12)


def _hand_ce(rows: list[int], labels: list[int]) -> float:
    probs = _softmax(STUDENT)
    return float(np.mean([-np.log(probs[r, labels[r]]) for r in rows]))


def _objective(labels: list[int], alpha: float, **kwargs):
    return distillation_objective(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(labels),
        loss=kwargs.pop("loss", "kl"),
        temperature=kwargs.pop("temperature", 2.0),
        alpha=alpha,
        **kwargs,
    )


def test_objective_mixes_kd_and_ce_with_alpha():
    kd = float(np.mean(4.0 * _kl(_softmax(TEACHER, 2.0), _softmax(STUDENT, 2.0))))
    ce = _hand_ce([0, 1], [0, 2])
    total, parts = _objective([0, 2], alpha=0.3)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)
    assert parts["total"].item() == pytest.approx(total.item())


def test_alpha_one_is_only_kd_and_alpha_zero_is_only_ce():
    total, parts = _objective([0, 2], alpha=1.0)
    assert total.item() == pytest.approx(parts["kd"].item(), rel=1e-6)
    total, parts = _objective([0, 2], alpha=0.0)
    assert total.item() == pytest.approx(parts["ce"].item(), rel=1e-6)
    assert total.item() != pytest.approx(parts["kd"].item(), rel=1e-3)


def test_unlabeled_rows_are_left_out_of_ce_but_kept_in_kd():
    _, all_labeled = _objective([0, 2], alpha=0.5)
    _, one_labeled = _objective([0, -1], alpha=0.5)
    assert one_labeled["ce"].item() == pytest.approx(_hand_ce([0], [0, 2]), rel=1e-5)
    assert one_labeled["kd"].item() == pytest.approx(all_labeled["kd"].item())


def test_all_unlabeled_batch_has_zero_ce_and_no_nan():
    student = torch.tensor(STUDENT, requires_grad=True)
    total, parts = distillation_objective(
        student, torch.tensor(TEACHER), torch.tensor([-1, -1]), loss="kl", temperature=2.0, alpha=0.5
    )
    total.backward()
    assert parts["ce"].item() == 0.0
    assert total.item() == pytest.approx(0.5 * parts["kd"].item())
    assert torch.isfinite(student.grad).all()


def test_gradients_reach_the_student_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    total, parts = distillation_objective(
        student, teacher, torch.tensor([0, 2]), loss="jsd", temperature=2.0, alpha=0.5
    )
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert all(not part.requires_grad for part in parts.values())


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    labels = torch.tensor([0, 2])
    total_half, _ = distillation_objective(
        student.half(), teacher.bfloat16(), labels, loss="kl", temperature=2.0, alpha=0.5
    )
    total_fp32, _ = distillation_objective(
        student.half().float(), teacher.bfloat16().float(), labels, loss="kl", temperature=2.0, alpha=0.5
    )
    assert total_half.dtype == torch.float32
    assert total_half.item() == pytest.approx(total_fp32.item(), rel=1e-6)


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="reverse_kl"):
        _objective([0, 2], alpha=0.5, loss="kld")


@pytest.fixture
def scratch_loss_name():
    name = "test_half_mse"
    yield name
    LOSSES.pop(name, None)


def test_user_registered_loss_is_found_by_name(scratch_loss_name):
    @register_loss(scratch_loss_name)
    def half_mse(student, teacher, temperature, beta):
        return 0.5 * (student - teacher).pow(2).mean(dim=-1)

    assert get_loss(scratch_loss_name) is half_mse
    _, parts = _objective([0, 2], alpha=1.0, loss=scratch_loss_name)
    _, mse_parts = _objective([0, 2], alpha=1.0, loss="mse")
    assert parts["kd"].item() == pytest.approx(0.5 * mse_parts["kd"].item())


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("kl")(lambda s, t, temperature, beta: s.sum(dim=-1))
    assert LOSSES["kl"].__name__ == "forward_kl"


# ---------------------------------------------------------------- a user's own loss, named from YAML


USER_LOSSES = '''
import torch


def half_kl(student_logits, teacher_logits, temperature):
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    log_q = torch.log_softmax(student_logits / temperature, -1)
    return 0.5 * (log_p.exp() * (log_p - log_q)).sum(-1)


def with_beta(student_logits, teacher_logits, temperature, beta):
    return beta * (student_logits - teacher_logits).pow(2).mean(-1)


def scalar(student_logits, teacher_logits, temperature):
    return (student_logits - teacher_logits).pow(2).mean()


not_a_function = 3
'''


@pytest.fixture
def user_losses(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_losses"
    resolve_loss.cache_clear()


def test_a_users_loss_from_an_import_path_gets_alpha_the_label_term_and_the_mean(user_losses):
    """fn(student, teacher, T) -> loss per row; kdflow mixes it with CE by alpha and takes the mean."""
    name = f"{user_losses}:half_kl"
    total, parts = _objective([0, 2], alpha=0.6, loss=name)
    _, kl = _objective([0, 2], alpha=0.6, loss="kl")
    # the built-in kl is T^2 * KL; the user's is 0.5 * KL at T: the KD terms differ by exactly that factor
    assert parts["kd"].item() == pytest.approx(kl["kd"].item() * 0.5 / 2.0**2, rel=1e-5)  # T = 2
    assert total.item() == pytest.approx(0.6 * parts["kd"].item() + 0.4 * parts["ce"].item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(kl["ce"].item())


def test_a_users_loss_that_takes_beta_gets_it(user_losses):
    _, half = _objective([0, 2], alpha=1.0, loss=f"{user_losses}:with_beta", beta=0.5)
    _, one = _objective([0, 2], alpha=1.0, loss=f"{user_losses}:with_beta", beta=1.0)
    assert half["kd"].item() == pytest.approx(0.5 * one["kd"].item())


def test_a_users_loss_that_returns_no_value_per_row_names_distill_loss(user_losses):
    with pytest.raises(UserError, match="distill.loss.*one value per row"):
        _objective([0, 2], alpha=0.5, loss=f"{user_losses}:scalar")


def test_a_bad_import_path_is_an_error_naming_distill_loss(user_losses):
    from orchestrator.spec import validate
    from tests.helpers import workflow

    assert validate(workflow(**{"distill.loss": f"{user_losses}:half_kl"})).distill.loss == f"{user_losses}:half_kl"
    for bad, says in ((f"{user_losses}:nope", "has no function"), (f"{user_losses}:not_a_function", "no function"),
                      ("no_such_module:fn", "cannot import"), ("kld", "unknown loss")):
        with pytest.raises(UserError, match=f"distill.loss: .*{says}"):
            validate(workflow(**{"distill.loss": bad}))
