"""sdtrain: config-driven DoRA trainer for Stable Diffusion 1.5 and SDXL."""

__version__ = "0.1.0"

from sdtrain.console import install_filters as _install_filters

# Known third-party messages that say nothing to an sdtrain user are filtered at their loggers (see console.py).
_install_filters()
