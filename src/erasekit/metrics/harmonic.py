"""H_o, the harmonic mean of erasure efficacy and specificity that MACE (Lu et al., CVPR 2024) and SPEED report
for mass erasure:

    H_o = 2 / (1 / efficacy + 1 / specificity),  efficacy = 1 − (rate the erased concepts are still drawn),
                                                 specificity = rate the retained concepts are still drawn right

(MACE: efficacy = 1 − Acc_e of the erased classes, specificity = Acc_s of the others). Both in [0, 1]; H_o is 0
when either is 0, and high only when both are.
"""

from __future__ import annotations

from erasekit.errors import ErasekitError


def harmonic_erasure(erased_rate: float, retained_rate: float) -> float:
    """H_o from the rate the erased concepts are still detected and the rate the retained ones are drawn right."""
    for name, value in (("erased_rate", erased_rate), ("retained_rate", retained_rate)):
        if not 0 <= value <= 1:
            raise ErasekitError(f"{name}={value}: a rate must be in [0, 1]")
    efficacy, specificity = 1 - erased_rate, retained_rate
    if efficacy == 0 or specificity == 0:
        return 0.0
    return 2 / (1 / efficacy + 1 / specificity)
