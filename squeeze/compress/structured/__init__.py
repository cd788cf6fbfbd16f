"""Structured pruning: whole attention heads (`compress=heads`) and whole rows of weight matrices
(`compress=rows`: MLP neurons, per-head q/k/v dims), physically removed, so the saved model is
smaller and faster, and reloadable by transformers without squeeze.

    amounts.py     how much: fractions or counts, iterative schedules, which units survive (pure)
    importance.py  which: head, head-dim and neuron scores (magnitude; gradient for heads)
    surgery.py     the cut, through the family adapter (squeeze.arch), and the config that reloads it
    heads.py       HeadPruning, the `compress=heads` compressor
    rows.py        RowPruning, the `compress=rows` compressor
"""

from squeeze.compress.structured.heads import HeadPruning
from squeeze.compress.structured.rows import RowPruning

__all__ = ["HeadPruning", "RowPruning"]
