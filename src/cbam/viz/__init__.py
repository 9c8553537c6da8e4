"""Attention visualisation: capture CBAM's gates from any model, draw them, score them.

- ``capture_attention(model)``: context manager -> ``{module path: AttentionRecord(channel, spatial)}``
- ``attention_figure(image, records)`` -> a matplotlib ``Figure``; ``save_figure(figure, path)``
  (PNG, SVG or PDF by extension); ``draw_overlay``/``draw_channel_weights`` for your own layouts
- ``grad_cam(model, x, layer)``: Grad-CAM, to set beside the spatial maps
- ``pointing_game(spatial_maps, boxes, image_size)``: how often the spatial peak lies on the object
- ``load_image(path, size)``: an image file as a normalised batch and as pixels

Capture, Grad-CAM and the pointing game need only torch; figures need matplotlib and ``load_image``
Pillow (``pip install 'cbam[viz]'``), imported when first used.
"""

from .capture import AttentionRecord, capture_attention, is_cbam_module, select_layers
from .figures import attention_figure, draw_channel_weights, draw_overlay
from .grad_cam import GradCAM, grad_cam
from .image import IMAGENET_MEAN, IMAGENET_STD, LoadedImage, load_image
from .pointing_game import PointingGame, pointing_game
from .save import figure_format, save_figure
from .upsample import upsample_maps

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "AttentionRecord", "GradCAM", "LoadedImage", "PointingGame", "attention_figure",
    "capture_attention", "draw_channel_weights", "draw_overlay", "figure_format", "grad_cam", "is_cbam_module",
    "load_image", "pointing_game", "save_figure", "select_layers", "upsample_maps",
]
