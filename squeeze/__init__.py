"""squeeze: fine-tune, compress and measure NLP models on one grid."""

import logging as _logging
import sys as _sys

from squeeze import config as _config  # noqa: F401  registers the config resolvers


class _NoGpuKernelNoise(_logging.Filter):
    """transformers imports torchao when it is installed, and torchao warns for each of its CUDA kernel
    libraries that cannot load; without a GPU that is expected, not news, on every run. Decided when a
    warning comes (torch is loaded by then), so importing squeeze loads no torch (the report needs none)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        torch = _sys.modules.get("torch")
        no_gpu = torch is not None and not torch.cuda.is_available()
        return not (no_gpu and record.getMessage().startswith("Failed to load"))


_logging.getLogger("torchao").addFilter(_NoGpuKernelNoise())

__version__ = "0.1.0"
