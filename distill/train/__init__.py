"""Training: config, data resolved against the store, datasets, losses, the trainer and the ``ddx train`` entry.

Entry point: :func:`distill.train.run.train`; its config: :class:`distill.train.config.TrainConfig`.

``train`` is also a name of the ``distill`` API (``from distill import train``), and once this package is imported
Python binds ``distill.train`` to it: so the package itself is callable, ``train(config)`` runs
:func:`distill.train.run.train`, and ``from distill import train`` always gives this package.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.train.config import TrainConfig
    from distill.train.run import TrainResult


class _CallablePackage(types.ModuleType):
    def __call__(self, config: TrainConfig) -> TrainResult:
        """Run one phase end to end: :func:`distill.train.run.train`."""
        from distill.train.run import train  # on call: importing this package must not load the data code

        return train(config)


sys.modules[__name__].__class__ = _CallablePackage
