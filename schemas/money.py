"""Money: exact decimal USD on the outside, integer atto-dollars (1e-18 USD) inside.

1e-18 is the resolution of the ClickHouse columns (``Decimal(38, 18)``); integers make sums exact and fast.
"""

from __future__ import annotations

from decimal import Context, Decimal
from typing import Final

#: Wide enough for any Decimal(38, 18) value, so conversions, and sums of such values, never round.
EXACT: Final = Context(prec=60)


def to_atto(amount: str | Decimal) -> int:
    """USD (a decimal string or Decimal with at most 18 decimal places) in atto-dollars, exactly.

    Raises:
        ValueError: the amount has more than 18 decimal places.
    """
    scaled = Decimal(amount).scaleb(18, EXACT)
    if scaled != scaled.to_integral_value(context=EXACT):
        raise ValueError(f"{amount} has more than 18 decimal places")
    return int(scaled)


def round_to_atto(amount: Decimal) -> int:
    """USD in atto-dollars, rounded half-even below 1e-18 (only per-second or per-hour prices need it)."""
    return int(Decimal(amount).scaleb(18, EXACT).to_integral_value(context=EXACT))


def from_atto(atto: int) -> Decimal:
    """Atto-dollars as USD, exactly (e.g. 450_000_000_000_000 -> Decimal('0.000450000000000000'))."""
    return Decimal(atto).scaleb(-18, EXACT)


def format_usd(amount: Decimal) -> str:
    """Plain notation, no exponent, no trailing zeros beyond the integer: '0.00045', '12', '0.000000075'."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
