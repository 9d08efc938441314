// The one place where the fisher_ext operator schemas are declared.
// fisher_ext/_schemas.py repeats these strings for the pure-PyTorch fallback;
// python_tests/test_registration.py checks that both agree.
#include <torch/library.h>

TORCH_LIBRARY(fisher_ext, m) {
  m.def("linear_sqnorm(Tensor a, Tensor g, bool bias, str method) -> Tensor");
  m.def("linear_sqnorm_accumulate_(Tensor(a!) acc, Tensor a, Tensor g, bool bias, str method) -> ()");
  m.def(
      "conv_sqnorm(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, str method) -> Tensor");
  m.def(
      "conv_sqnorm_accumulate_(Tensor(a!) acc, Tensor x, Tensor g, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool bias, str method) -> ()");
  m.def(
      "linear_grad_sqnorm(Tensor a, Tensor g, bool bias, str method) -> "
      "(Tensor weight_grad, Tensor bias_grad, Tensor sqnorm)");
  m.def(
      "conv_grad_sqnorm(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool bias, str method) -> (Tensor weight_grad, Tensor bias_grad, Tensor sqnorm)");
}
