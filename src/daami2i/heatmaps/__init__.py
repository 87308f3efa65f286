"""Pure tensor algebra on captured attention: regions, queries, word maps. No pipeline here."""

from .maps import GlobalHeatMap, HeatMap, PixelHeatMap, WordHeatMap, image_size_of
from .selfattn import SelfAttentionLevel
from .words import CrossAttentionLayer

__all__ = [
    "CrossAttentionLayer",
    "GlobalHeatMap",
    "HeatMap",
    "PixelHeatMap",
    "SelfAttentionLevel",
    "WordHeatMap",
    "image_size_of",
]
