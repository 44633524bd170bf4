"""Thin KFP adapters, one per stage: each body imports `funmatch` and calls one function of
`funmatch.launch.tasks`. Top-level imports are stdlib and kfp only; `install_kfp_package=False` and no
`packages_to_install`: the images (and the local environment) already hold everything.

Images: `FUNMATCH_IMAGE_PREFIX` (default `ghcr.io/funmatch`) and `FUNMATCH_IMAGE_TAG` (default: the
package version) name them; `resources.image` in the config overrides the prefix at compile time.
"""

import os
from importlib.metadata import PackageNotFoundError, version


def image(kind: str, prefix: str = "") -> str:
    """`<prefix>/funmatch-<kind>:<tag>` for kind 'cpu' or 'cuda'."""
    try:
        tag = version("funmatch")
    except PackageNotFoundError:
        tag = "latest"
    prefix = prefix or os.environ.get("FUNMATCH_IMAGE_PREFIX", "ghcr.io/funmatch")
    return f"{prefix.rstrip('/')}/funmatch-{kind}:{os.environ.get('FUNMATCH_IMAGE_TAG', tag)}"
