"""A picklable stand-in for the model's input builder that hangs on chosen pages.

Used to test the per-document timeout in worker processes (importable by spawned workers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline import tiling


@dataclass(frozen=True)
class HangingBuilder:
    hang_on_uri_containing: str
    seconds: float = 3600.0

    stretches_to_canvas = True  # the default tiling policy's page geometry (pipeline.tiling.PageGeometry)

    def target_size(self, width_pt: float, height_pt: float):
        return tiling.TilingOptions().target_size(width_pt, height_pt)

    def plan(self, width: int, height: int):
        return tiling.plan_tiles(width, height, tiling.TilingOptions())

    def build(self, page, plan):
        if self.hang_on_uri_containing in page.uri:
            time.sleep(self.seconds)
        return {"page": page.page_number}
