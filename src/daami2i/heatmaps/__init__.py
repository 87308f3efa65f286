"""Pure tensor algebra on captured attention: regions, queries, word maps. No pipeline here."""

from .maps import GlobalHeatMap, HeatMap, PixelHeatMap, WordHeatMap, image_size_of
from .selfattn import SelfAttentionLevel
from .syntax import ParsedHeatMap, SyntacticHeatMapPair
from .words import CrossAttentionLayer

__all__ = [
    "CrossAttentionLayer",
    "GlobalHeatMap",
    "HeatMap",
    "ParsedHeatMap",
    "PixelHeatMap",
    "SelfAttentionLevel",
    "SyntacticHeatMapPair",
    "WordHeatMap",
    "image_size_of",
]
