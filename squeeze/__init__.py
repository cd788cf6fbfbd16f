"""squeeze: fine-tune, compress and measure NLP models on one grid."""

__version__ = "0.1.0"
