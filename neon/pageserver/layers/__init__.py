"""Layer files: immutable, checksummed delta and image layers (format: docs/layer-format.md)."""

from __future__ import annotations

from .blockio import (
    BLOCK_SIZE,
    BlockReadStats,
    LayerCorruptionError,
    LayerError,
    LayerFormatError,
    LayerSummaryMismatchError,
)
from .delta_layer import DeltaEntry, DeltaGetResult, DeltaLayer, DeltaLayerWriter
from .image_layer import ImageLayer, ImageLayerWriter
from .layer_name import (
    KEY_MAX,
    KEY_MIN,
    KEY_SIZE,
    DeltaLayerName,
    ImageLayerName,
    LayerName,
    is_temp_file_name,
    key_from_hex,
    key_to_hex,
    parse_layer_file_name,
    try_parse_layer_file_name,
)
from .summary import LayerKind, LayerSummary

__all__ = [
    "BLOCK_SIZE",
    "KEY_MAX",
    "KEY_MIN",
    "KEY_SIZE",
    "BlockReadStats",
    "DeltaEntry",
    "DeltaGetResult",
    "DeltaLayer",
    "DeltaLayerName",
    "DeltaLayerWriter",
    "ImageLayer",
    "ImageLayerName",
    "ImageLayerWriter",
    "LayerCorruptionError",
    "LayerError",
    "LayerFormatError",
    "LayerKind",
    "LayerName",
    "LayerSummary",
    "LayerSummaryMismatchError",
    "is_temp_file_name",
    "key_from_hex",
    "key_to_hex",
    "parse_layer_file_name",
    "try_parse_layer_file_name",
]
