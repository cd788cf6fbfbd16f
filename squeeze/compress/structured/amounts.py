"""How much to remove: amounts (fractions or counts), iterative schedules, and which units survive. Pure."""

from __future__ import annotations

from typing import Any

import torch

from squeeze.errors import SqueezeError


def check_amount(amount: Any, what: str) -> None:
    """`amount` follows torch.nn.utils.prune: a float in [0, 1) is a fraction, an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise SqueezeError(f"{what}={amount!r} is neither a fraction in [0, 1) nor a whole count")
    if isinstance(amount, float) and not 0.0 <= amount < 1.0:
        count = f", or a count as an integer ({what}={int(amount)})" if amount >= 1 and amount.is_integer() else ""
        raise SqueezeError(f"{what}={amount} is a fraction outside [0, 1); give e.g. 0.25{count}")
    if isinstance(amount, int) and amount < 0:
        raise SqueezeError(f"{what}={amount} is a negative count; give a count ≥ 0 or a fraction in [0, 1)")


def units_to_remove(amount: float, units: int, group: int, what: str, where: str) -> int:
    """How many of a layer's `units` to remove; a unit is `group` heads (or dims, or neurons).

    A fraction is of the units (rounded to nearest); a count is of heads, so under grouped-query
    attention it must be a whole number of groups. Removing every unit is refused.
    """
    if isinstance(amount, float):
        n = int(amount * units + 0.5)
        if n >= units:
            raise SqueezeError(f"{what}={amount} would leave none of {where}; use a smaller fraction "
                               f"(below {(units - 0.5) / units:.3g})")
        return n
    if amount >= units * group:
        raise SqueezeError(f"{what}={amount} is not fewer than {where}; give a count below {units * group}")
    if amount % group:
        raise SqueezeError(f"{what}={amount}: {where} go in whole groups of {group} (grouped-query attention "
                           f"prunes a key/value head with its {group} query heads); give a multiple of {group}")
    return amount // group


def removed_by(total: int, iteration: int, iterations: int) -> int:
    """Units removed in total after `iteration` (0-based) of `iterations` equal pruning steps."""
    return int(total * (iteration + 1) / iterations + 0.5)


def keep_highest(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices of the units to keep (all but the `remove` lowest scores), in their original order."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[remove:].tolist())
