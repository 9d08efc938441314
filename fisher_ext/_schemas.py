"""Schemas of the ``torch.ops.fisher_ext`` operators.

The C++ extension declares the same strings in ``csrc/ops.cpp``; the Python
fallback declares them from here when ``fisher_ext._C`` is missing.
``python_tests/test_registration.py`` checks that the two stay identical.

``padding`` holds the *leading* (left/top/front) pad of each spatial dim; the
spatial shape of ``g`` fixes the output size, so asymmetric padding such as
``'same'`` with an even kernel is expressed exactly. ``method`` is ``'auto'``,
``'ghost'`` or ``'materialize'``.
"""

SCHEMAS = {
    "linear_sqnorm": "linear_sqnorm(Tensor a, Tensor g, bool bias, str method) -> Tensor",
    "linear_sqnorm_accumulate_": (
        "linear_sqnorm_accumulate_(Tensor(a!) acc, Tensor a, Tensor g, bool bias, str method) -> ()"
    ),
    "conv_sqnorm": (
        "conv_sqnorm(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool bias, str method) -> Tensor"
    ),
    "conv_sqnorm_accumulate_": (
        "conv_sqnorm_accumulate_(Tensor(a!) acc, Tensor x, Tensor g, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, int groups, bool bias, str method) -> ()"
    ),
    "linear_grad_sqnorm": (
        "linear_grad_sqnorm(Tensor a, Tensor g, bool bias, str method) -> "
        "(Tensor weight_grad, Tensor bias_grad, Tensor sqnorm)"
    ),
    "conv_grad_sqnorm": (
        "conv_grad_sqnorm(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int groups, bool bias, str method) -> (Tensor weight_grad, Tensor bias_grad, Tensor sqnorm)"
    ),
}

METHODS = ("auto", "ghost", "materialize")
