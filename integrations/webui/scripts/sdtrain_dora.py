"""sdtrain extension for AUTOMATIC1111 / Forge: exact output-axis DoRA in the built-in Lora (see sdtrain_dora_webui)."""

from modules import script_callbacks

import sdtrain_dora_webui

sdtrain_dora_webui.install_when_ready(script_callbacks)
