"""Routing between student and teacher: difficulty targets, router fit, the routing curve, the routed encoder.

Entry points: :func:`distill.route.fit.fit_router` (``ddx router fit``), :func:`distill.route.curve.evaluate_routed`
(``ddx evaluate --routed``), :func:`distill.route.routed_model.export_routed` (``ddx router export``).
"""
