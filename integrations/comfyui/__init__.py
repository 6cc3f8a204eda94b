"""sdtrain's ComfyUI nodes: "Load DoRA (sdtrain, exact)" and "Train DoRA (sdtrain)".

Install with `sdtrain install-comfyui COMFYUI_DIR` (links or copies this folder to custom_nodes/sdtrain), or copy the
folder there by hand. Loading the package imports neither torch nor ComfyUI; the nodes do when they run.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
