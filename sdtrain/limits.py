"""Upper bounds of numeric settings, shared by the config schema and the sample-prompt parser.

Each is far above any useful value and low enough that a wrong value fails in validation instead of hanging or
exhausting memory later (bucket enumeration, the materialised epoch, seeds that torch generators accept).
"""

MAX_RANK = 2048  # above the smaller side of every SD1.5/SDXL layer (at most 1280): a higher rank adds nothing
MAX_SIDE = 8192  # bucket sides and resolutions, in pixels
MAX_SEED = 2**32 - 1
MAX_SAMPLE_STEPS = 1000  # the schedulers' training timesteps: diffusers refuses more inference steps
MAX_REPEATS = 10_000  # per image and epoch; the epoch's sample list is materialised
MAX_CFG_SCALE = 100.0
