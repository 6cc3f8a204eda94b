"""`python -m sdtrain.config > docs/config.md` prints the config reference."""

from sdtrain.config.dump import config_reference_markdown

print(config_reference_markdown(), end="")
