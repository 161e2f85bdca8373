"""Weight-only block quantization for CPU linears: formats (``blocks``), kernels (``cpu_kernels``), and the
one swap point (``method.apply_quantization``) that turns a freshly built model's dense layers into block
layers before its weights are loaded."""
