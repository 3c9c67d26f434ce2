"""Evaluation: judged win rates (``python -m caldpo.eval``), the synthetic ground-truth task
(``caldpo.eval.synthetic``) and the laptop reproduction of the calibration claim
(``python -m caldpo.eval.reproduce``). Reward-dynamics plots: ``python -m caldpo.plot``.
"""
