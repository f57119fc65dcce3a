"""Every value the autograd lesson prints, checked against math derived by hand."""

import jax
import numpy as np
import pytest

from experiments import autograd as script
from experiments import autograd_lesson as lesson


def test_1_gradient_of_a_sum():
    np.testing.assert_allclose(lesson.gradient_of_a_sum().values["grad"], [4.0, 6.0, 8.0])


def test_2_graph_and_partials():
    v = lesson.computation_graph().values
    assert v["z"] == 10.0 and v["dz_dx"] == 7.0 and v["dz_dy"] == 2.0
    for primitive in ("mul", "integer_pow", "add"):  # x*y, x**2, their sum
        assert primitive in v["jaxpr"]


def test_3_gradients_are_returned_not_accumulated():
    v = lesson.no_zero_grad().values
    assert v["grad_quadratic"] == 7.0 and v["grad_cube"] == 12.0
    np.testing.assert_allclose(v["w_accumulated"], v["w_full_batch"], rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(v["w_full_batch"])).min() > 0  # a real step was taken


def test_4_finite_differences_and_analytic():
    errors = lesson.finite_differences().values["errors"]
    assert set(errors) == set(lesson.CHECKS)
    for fd_error, analytic_error in errors.values():
        assert fd_error < lesson.FD_TOL and analytic_error < lesson.ANALYTIC_TOL
    assert not jax.config.jax_enable_x64  # x64 stayed inside the demo


def test_5_backprop_by_hand_equals_jax_grad():
    v = lesson.hand_vs_grad().values
    for name in ("w1", "b1", "w2", "b2"):
        np.testing.assert_allclose(v["by_hand"][name], v["jax_grad"][name], rtol=1e-4, atol=1e-6)
        assert np.abs(np.asarray(v["jax_grad"][name])).max() > 1e-4  # not trivially zero


def test_6_linear_regression_learns_the_slope():
    v = lesson.linear_regression().values
    # Any draw: the gap to 3 shrinks about 0.98x a step (x ~ N(0, 1), lr 0.01), 0.13x in 100;
    # 0.25 leaves room for the sample's variance and the noise's pull on the slope.
    assert abs(v["weight"] - 3.0) < 0.25 * abs(v["initial_weight"] - 3.0)
    assert 2.2 < v["weight"] < 3.1
    assert v["losses"][-1] < 0.3 * v["losses"][0]
    assert len(v["losses"]) == 100


def test_7_naive_cross_entropy_overflows_fused_does_not():
    v = lesson.nan_and_stable_loss().values
    assert not np.isfinite(v["naive_loss"]) or not np.all(np.isfinite(v["naive_grad"]))
    assert np.isnan(v["naive_grad"]).any()
    assert v["fused_loss"] == pytest.approx(2000.0)
    np.testing.assert_allclose(v["fused_grad"][0], [1.0, 0.0, -1.0], atol=1e-6)


def test_8_custom_vjp_rules_are_used():
    v = lesson.custom_gradients().values
    np.testing.assert_allclose(v["plain"], [10.0, 10.0, 10.0])
    np.testing.assert_allclose(v["clipped"], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(v["round_grad"], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(v["ste_grad"], [4.0, 4.0, 4.0])
    # forward pass untouched
    assert float(lesson.clip_gradient(5.0, 1.0)) == 5.0 and float(lesson.round_ste(2.6)) == 3.0


def test_9_forward_and_reverse_mode_agree():
    v = lesson.jacobians().values
    for key in ("vjp_rows", "jvp_cols", "jacrev", "jacfwd"):
        np.testing.assert_allclose(v[key], v["analytic"], rtol=1e-6)


def test_script_prints_every_section_and_one_on_request(capsys):
    script.main([])
    out = capsys.readouterr().out
    for n, section in enumerate(lesson.SECTIONS, 1):
        assert f"\n{n}. " in out
    assert "dy/dx = [4. 6. 8.]" in out and "dz/dx = 7.0, dz/dy = 2.0" in out
    script.main(["--section", "5"])
    one = capsys.readouterr().out
    assert "5. Backpropagation" in one and "\n1. " not in one
    with pytest.raises(SystemExit) as bad:
        script.main(["--section", "13"])
    assert bad.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_10_one_step_of_linear_2_1_from_stated_weights():
    v = lesson.one_step_by_hand().values
    assert float(v["loss"]) == pytest.approx(0.845)
    np.testing.assert_allclose(v["grads"]["kernel"].ravel(), [-2.9, -4.6], rtol=1e-6)
    np.testing.assert_allclose(v["grads"]["bias"], [-1.7], rtol=1e-6)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(v["by_hand"][name], v["grads"][name], rtol=1e-6)
    np.testing.assert_allclose(v["new"]["kernel"].ravel(), [0.129, 0.246], rtol=1e-6)
    np.testing.assert_allclose(v["new"]["bias"], [0.017], rtol=1e-6)


def test_11_argnums_and_stop_gradient():
    v = lesson.which_inputs_get_gradients().values
    assert v["only_x"] == 7.0 and tuple(map(float, v["both"])) == (7.0, 2.0)
    assert v["detached"] == 3.0


def test_12_tracing_retraces_per_shape_and_a_python_if_fails_under_jit():
    v = lesson.tracing().values
    assert v["traces"] == [(3,), (4,)]
    assert v["error"] == "TracerBoolConversionError"
    assert v["cond"] == [2.0, 0.0] and v["cond_grads"] == [1.0, 0.0]
