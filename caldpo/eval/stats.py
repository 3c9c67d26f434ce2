"""Win/tie/loss counting and confidence intervals: the one place these rules live.

Win rate: ties count half by default, ``(W + T/2) / (W + T + L)``; with
``ties="exclude"`` it is ``W / (W + L)``. Unparsable verdicts are never in either
count. The 95% interval is Wilson's score interval on that proportion with
n = the items counted (with ties at half this treats a tie as half a success, a
common approximation that is slightly conservative, since a tie has less variance
than a coin flip). Means get a normal-approximation interval, mean +- 1.96 s / sqrt(n).

Position bias: the order of the two responses is a fair coin flip per item, so whatever the
responses say, a judge that reads content prefers the response shown first with probability 1/2
on each decisive verdict. A judge *follows position* when the two-sided exact binomial test of
the count of first-shown preferences among decisive verdicts against 1/2 gives p < 0.05
(``POSITION_ALPHA``); with fewer than 6 decisive verdicts no count can reach that.
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


POSITION_ALPHA = 0.05


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` trials against success probability 1/2: the
    probability of a count at least as far from n/2 (1.0 when n == 0)."""
    if n <= 0:
        return 1.0
    tail = min(k, n - k)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(tail + 1)) / 2.0 ** n)


def position_bias(first_preferred: int, decisive: int, alpha: float = POSITION_ALPHA) -> dict:
    """{"first_shown_preferred", "decisive", "p_value", "follows_position"}: the rule in the module docstring."""
    p = binomial_two_sided_p(first_preferred, decisive)
    return {"first_shown_preferred": first_preferred, "decisive": decisive, "p_value": p,
            "follows_position": decisive > 0 and p < alpha}
