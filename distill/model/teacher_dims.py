"""``--projection none``: the student distilled straight into the first D dimensions of the teacher's vectors.

The reference system calls this mode "MRL" (after Matryoshka Representation Learning, whose vectors keep a usable
embedding in their leading dimensions). No projection runs: the student's own ``d``-dim output is trained against,
and at search time compared with, the teacher's vectors cut to their first ``D = d`` dimensions and rescaled to unit
length. The hybrid system then searches an index of those cut vectors (``D / dim`` of the full index's size; it is
the full index's first columns, renormalised, so the teacher never runs again) with student queries that need no
projection at all.

:func:`truncate_teacher` is the one place a teacher vector is cut and renormalised: training's targets
(:mod:`distill.train.datasets`), evaluation's hybrid passages (:func:`distill.search.search_inputs.store_blocks`)
and the router's targets (:mod:`distill.route.targets`) all call it. What fills the model's projection slot in this
mode is :class:`distill.model.no_projection.NoProjection`. This module imports numpy only, so ``ddx train`` checks
``--teacher-dims`` against the store before torch loads.

*Why D must equal the student's dimension:* without a linear map, a student of ``d`` dims can only be compared with
``d`` teacher dims. ``D < d`` would need the student's output cut too (its last ``d − D`` dims trained by nothing,
searched by nothing), and ``D > d`` a map that is not the identity: both are the projection this mode leaves out.
"""

from __future__ import annotations

import numpy as np

from storage.errors import DimensionMismatchError

__all__ = ["check_teacher_dims", "truncate_teacher"]


def check_teacher_dims(dims: int, teacher_dim: int) -> None:
    """Refuse ``dims`` unless it is a whole number in ``1..teacher_dim`` (the teacher's vectors' dimension).

    Raises:
        DimensionMismatchError: naming ``--teacher-dims`` and the fix.
    """
    if isinstance(dims, bool) or not isinstance(dims, int | np.integer) or dims < 1:
        raise DimensionMismatchError(f"--teacher-dims must be a whole number >= 1, got {dims!r}.")
    if dims > teacher_dim:
        raise DimensionMismatchError(
            f"--teacher-dims {dims} is more than the teacher's {teacher_dim} dims: the student can be distilled into "
            f"at most the teacher's {teacher_dim}. Pass --teacher-dims <= {teacher_dim}, or use the store of the "
            "teacher the run was trained with."
        )


def truncate_teacher(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """Teacher vectors ``[n, dim]`` cut to their first ``dims`` columns, each row rescaled to unit length.

    ``dims=None`` returns ``vectors`` unchanged (a run with a projection searches the full vectors). An all-zero
    row stays zero.

    Args:
        vectors: ``[n, dim]`` teacher vectors (any float dtype; float16 rows from the store are upcast).
        dims: ``D``, the number of leading dimensions kept; ``None`` keeps everything as it is.

    Returns:
        ``[n, dims]`` float32 unit rows (or ``vectors`` itself when ``dims`` is None).

    Raises:
        DimensionMismatchError: If ``vectors`` is not 2-D or has fewer than ``dims`` columns.

    Example:
        >>> truncate_teacher(np.array([[3.0, 4.0, 12.0]]), 2).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if dims is None:
        return vectors
    if vectors.ndim != 2:
        raise DimensionMismatchError(f"Teacher vectors must be 2-D [n, dim], got shape {tuple(vectors.shape)}.")
    check_teacher_dims(dims, vectors.shape[1])
    cut = np.asarray(vectors[:, :dims], dtype=np.float32)
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
