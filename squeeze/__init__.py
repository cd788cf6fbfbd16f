"""squeeze: fine-tune, compress and measure NLP models on one grid."""

from squeeze import config as _config  # noqa: F401  registers the config resolvers

__version__ = "0.1.0"
