"""Win/tie/loss counting and confidence intervals: the one place these rules live.

Win rate: ties count half by default, ``(W + T/2) / (W + T + L)``; with
``ties="exclude"`` it is ``W / (W + L)``. Unparsable verdicts are never in either
count. The 95% interval is Wilson's score interval on that proportion with
n = the items counted (with ties at half this treats a tie as half a success, a
common approximation that is slightly conservative, since a tie has less variance
than a coin flip). Means get a normal-approximation interval, mean +- 1.96 s / sqrt(n).
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for successes out of n; (nan, nan) when n == 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(wins: int, ties: int, losses: int, ties_mode: str = "half") -> dict:
    """{"win_rate", "ci_low", "ci_high", "n"}: see the module docstring for the rule."""
    if ties_mode == "half":
        succ, n = wins + 0.5 * ties, wins + ties + losses
    elif ties_mode == "exclude":
        succ, n = float(wins), wins + losses
    else:
        raise ValueError(f"ties_mode must be 'half' or 'exclude', not {ties_mode!r}")
    lo, hi = wilson(succ, n)
    return {"win_rate": succ / n if n else math.nan, "ci_low": lo, "ci_high": hi, "n": n}


def mean_ci(values, z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi): normal-approximation interval of the mean; the interval is nan for n < 2."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)
