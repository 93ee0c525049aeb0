"""Native CPU kernels for GGUF block-quantized linear layers (C++ AVX2/FMA/F16C with a scalar fallback).

Build: `python -m sgl.kernels.cpu.build` (run by `make setup`). Without the build every call takes the
torch reference path (dequantize + mm) after one warning."""

from sgl.kernels.cpu.quant import (ACT_QUANT, QTYPES, QuantWeight, extension_available, get_act_quant,
                                   get_num_threads, quant_linear, quant_linear_reference, set_act_quant,
                                   set_num_threads, set_q16_batches)

__all__ = ["ACT_QUANT", "QTYPES", "QuantWeight", "extension_available", "get_act_quant", "get_num_threads",
           "quant_linear", "quant_linear_reference", "set_act_quant", "set_num_threads", "set_q16_batches"]
