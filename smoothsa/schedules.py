"""Learning-rate and detach schedules (docs/official.md §4), pure functions of the optimiser step.

``step`` is the number of optimiser steps already taken (0 .. total); the training loop evaluates
both functions before every training step, never during validation.
"""

import math


def linear_warmup_cosine(
    step: int,
    total: int,
    base_lr: float,
    warmup: int | None = None,
    start: float = 0.0,
    final: float | None = None,
) -> float:
    """Linear warm-up then cosine decay, the official ``CbLinearCosine``.

    lr(s) = start + (base_lr - start)·s/warmup for s <= warmup, then
    lr(s) = final + ½(base_lr - final)(1 + cos(π(s - warmup)/(total - warmup))).
    So lr(0) = start (0: the first step does nothing), lr(warmup) = base_lr, lr(total) = final.

    Args:
        step: optimiser steps already taken, 0 <= step <= total.
        total: total number of optimiser steps.
        base_lr: peak learning rate.
        warmup: warm-up steps; the configs use ``total // 20``.
        start: learning rate at step 0.
        final: learning rate at step ``total``; the configs use ``base_lr / 1000``.
    """
    warmup = total // 20 if warmup is None else warmup
    final = base_lr / 1e3 if final is None else final
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup={warmup} must lie in [0, total={total}]")
    # The official schedule is a precomputed list of total+1 values: any other step is an IndexError there.
    if not 0 <= step <= total:
        raise ValueError(f"step={step} outside [0, total={total}]")
    if step <= warmup:
        if warmup == 0:
            return base_lr
        # Same operation order as the official CbLinear.linear, so values agree to the last bit.
        return (base_lr - start) / warmup * step + start
    return 0.5 * (base_lr - final) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) + final


def detach_flag(step: int, total: int, fraction: float = 0.1) -> bool:
    """Whether the preheated initializer detaches its input: the official ``CbSquarewave``.

    Points ``[0, total // 10, total]`` with values ``[1, 0]``: True for the first tenth of training. Other
    fractions move the switch-off point to ``floor(total · fraction)``; 1 keeps the input detached throughout.

    Args:
        step: optimiser steps already taken, 0 <= step <= total.
        total: total number of optimiser steps.
        fraction: the detached share of training, in [0, 1]; the configs use 0.1.
    """
    if not 0 <= step <= total:
        raise ValueError(f"step={step} outside [0, total={total}]")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} outside [0, 1]")
    if fraction >= 1.0:
        return True
    # floor(total · 0.1) == total // 10 for every integer total (0.1 rounds up in binary).
    return step < math.floor(total * fraction)
