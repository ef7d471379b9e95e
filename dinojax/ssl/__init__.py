"""Self-supervised training: losses and centering, the optimizer recipe, the jitted train step.

    from dinojax.ssl import create_train_state, make_train_step   # dinojax.ssl.step

Modules: `losses` (DINO / iBOT / KoLeo), `centering` (EMA centering, Sinkhorn-Knopp), `optim`
(parameter groups, schedules, AdamW, clipping, freezes), `step` (state creation and the step).
"""

from __future__ import annotations

_STEP_EXPORTS = (
    "create_train_state",
    "flops_per_step",
    "make_train_step",
    "student_backbone",
    "teacher_backbone",
)

__all__ = list(_STEP_EXPORTS)


def __getattr__(name: str):
    # lazy: importing the losses alone must not build the model stack
    if name in _STEP_EXPORTS:
        from dinojax.ssl import step

        return getattr(step, name)
    raise AttributeError(f"module 'dinojax.ssl' has no attribute {name!r}")
