// The Python module of the CPU engine: every pass with named arguments (the names of torch_ops.py where
// it has the function; fused.py calls forward by keyword). The only file that includes pybind11, and
// only torch's pybind11 casters for tensors, not all of torch/extension.h (a third of the build's time).
#include <torch/csrc/utils/pybind.h>

#include "passes.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace cbam_cpu;
  using py::arg;
  const auto none = py::none();
  m.def("pool", &pool, arg("x"));
  m.def("gated_stats", &gated_stats, arg("x"), arg("mc"));
  m.def("apply", &apply, arg("x"), arg("mc"), arg("ms"), arg("residual") = none, arg("input_affine") = none);
  m.def("gate_grads", &gate_grads, arg("grad"), arg("x"), arg("mc"), arg("ms"), arg("rectified"),
        arg("channel_index"), arg("input_affine") = none, arg("centre") = none);
  m.def("stats_grad", &stats_grad, arg("x"), arg("d_mean"), arg("d_peak"), arg("index"), arg("input_affine") = none,
        arg("centre") = none);
  m.def("input_grad", &input_grad, arg("grad"), arg("x"), arg("mc"), arg("ms"), arg("d_mean"), arg("d_peak"),
        arg("index"), arg("d_avg"), arg("d_max"), arg("channel_index"));
  m.def("batch_norm_input_grad", &batch_norm_input_grad, arg("grad"), arg("x"), arg("mc"), arg("ms"), arg("d_mean"),
        arg("d_peak"), arg("index"), arg("d_avg"), arg("d_max"), arg("channel_index"), arg("gated"), arg("centred"),
        arg("mean"), arg("invstd"), arg("weight"));
  m.def("forward", &forward, arg("x"), arg("size"), arg("avg_coef"), arg("max_coef"), arg("fc1_w"), arg("fc1_b"),
        arg("fc2_w"), arg("fc2_b"), arg("conv_w"), arg("kernel"), arg("hard"), arg("finish"), arg("norm_w"),
        arg("norm_b"), arg("running_mean"), arg("running_var"), arg("eps"), arg("residual"), arg("input_affine"),
        arg("overwrite"), arg("pooled"), arg("indices"));
  m.def("batch_norm_affine", &batch_norm_affine, arg("weight"), arg("bias"), arg("running_mean"), arg("running_var"),
        arg("eps"));
  m.def("batch_norm_pool", &batch_norm_pool, arg("x"), arg("weight"), arg("bias"), arg("eps"));
  m.def("conv_backward", &conv_backward, arg("maps"), arg("d_out"), arg("weight"), arg("size"), arg("kernel"));
  m.def("spatial_backward", &spatial_backward, arg("logits"), arg("ms"), arg("d_ms"), arg("mean"), arg("speak"),
        arg("conv_w"), arg("size"), arg("kernel"), arg("hard"), arg("norm"), arg("batch_statistics"), arg("weight"),
        arg("running_mean"), arg("running_var"), arg("eps"));
  m.def("channel_gate", &channel_gate, arg("avg"), arg("peak"), arg("avg_coef"), arg("max_coef"), arg("fc1_w"),
        arg("fc1_b"), arg("fc2_w"), arg("fc2_b"), arg("hard"));
  m.def("channel_backward", &channel_backward, arg("avg"), arg("peak"), arg("avg_coef"), arg("max_coef"), arg("fc1_w"),
        arg("fc1_b"), arg("fc2_w"), arg("mc"), arg("d_mc"), arg("hard"));
  m.def("set_output_cache_limit", &output_cache::set_limit, arg("bytes"));
  m.def("output_cache_bytes", &output_cache::cached);
}
