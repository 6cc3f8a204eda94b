"""sdtrain: config-driven DoRA trainer for Stable Diffusion 1.5 and SDXL."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs a warning about its 4-bit CPU kernels on import; sdtrain uses only its 8-bit optimizers.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
