"""`python -m diffusers_vae_ext.cli`: the same as the `diffusers-vae` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
