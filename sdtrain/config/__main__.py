"""`python -m sdtrain.config > docs/config.md` prints the config reference;
`python -m sdtrain.config --readme README.md` rewrites README's generated config section."""

import sys

from sdtrain.config.dump import config_reference_markdown, update_readme

if len(sys.argv) == 3 and sys.argv[1] == "--readme":
    update_readme(sys.argv[2])
else:
    print(config_reference_markdown(), end="")
