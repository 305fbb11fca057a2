"""Old import path of the routed encoder, kept for folders that ``ddx router export`` wrote before the move.

sentence-transformers records each module's class path in the folder's ``modules.json`` and imports it on load;
routed folders exported before ddx split ``distill/`` into rooms name ``distill.routed_model.RoutedEncoder``, so
this module must keep that name importable. New exports record ``distill.route.routed_model.RoutedEncoder``.
"""

from distill.route.routed_model import RoutedEncoder, RouterExportConfig, export_routed

__all__ = ["RoutedEncoder", "RouterExportConfig", "export_routed"]
