"""Quantization: fake-quant training (`compress=qat`), dynamic int8 (`dq`), weight-only int8/int4
(`int8wo`, `int4wo`).

    base.py           which layers, the settings checks, float → integer layers, the shared compressor
    qat.py            QuantizationAwareTraining: fake-quantized weights (and inputs) while fine-tuning
    post_training.py  DynamicQuantization, WeightOnlyQuantization: quantize a trained model

The integer math (squeeze/formats/integers.py) and the integer layers with their kernels
(squeeze/formats/quantized_layers.py) live below the compressors, in the formats layer, so that saving
and loading a quantized model never imports a compressor. GPT-2's Conv1D is first converted to the
exactly equivalent nn.Linear (squeeze/arch/linear.py): the thesis lost 12% BLEU because its swap
changed the model; `conv1d_to_linear` does not.
"""

# The names callers use as `quantization.X` (benchmarks, tests); each lives where its docstring says.
from squeeze.arch.linear import conv1d_to_linear, convert_conv1d, replace_module  # noqa: F401
from squeeze.compress.quantization.base import (  # noqa: F401
    BITS, GRANULARITIES, SCHEMES, check_groups, check_scheme, layer_kind, quantize_layers, select_layers,
    select_norms, weight_rows,
)
from squeeze.compress.quantization.post_training import DynamicQuantization, WeightOnlyQuantization  # noqa: F401
from squeeze.compress.quantization.qat import QuantizationAwareTraining  # noqa: F401
from squeeze.formats.integers import (  # noqa: F401
    Scheme, choose_qparams, dequantize, fake_quant, fake_quant_any, fake_quant_with, qparams_from_range, quantize,
    quantization_error_bound,
)
from squeeze.formats.quantized_layers import (  # noqa: F401
    CPU_KERNELS, KERNELS, QuantizedEmbedding, QuantizedLinear, dynamic_kernels_available, fbgemm_pack, kernels_used,
    torchao_config, use_cpu_kernel,
)
