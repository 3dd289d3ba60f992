"""Pictures and tables a person looks at: heatmap overlays, plots, spreadsheets, HTML.

The modules: `category` (one evaluated category's report folder, segmentation images, score CSV),
`ood` (several test groups), `overlay`, `plots`, `spreadsheet`, `thumbs`, `html`, `tracking`.
"""

from __future__ import annotations

from .category import save_anomaly_scores, save_segmentation_images, write_category_report

__all__ = ["save_anomaly_scores", "save_segmentation_images", "write_category_report"]
