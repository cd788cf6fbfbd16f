"""squeeze: fine-tune, compress and measure NLP models on one grid."""

import logging as _logging

import torch as _torch

from squeeze import config as _config  # noqa: F401  registers the config resolvers

# transformers imports torchao when it is installed, and torchao warns for each of its CUDA kernel
# libraries that cannot load; on a machine without a GPU that is expected, not news, on every run.
if not _torch.cuda.is_available():
    _logging.getLogger("torchao").setLevel(_logging.ERROR)

__version__ = "0.1.0"
