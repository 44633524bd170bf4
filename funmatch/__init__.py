"""funmatch: patient and consistent knowledge distillation (Beyer et al., CVPR 2022) as a KFP pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("funmatch")
except PackageNotFoundError:  # running from a source tree (e.g. PYTHONPATH=.)
    __version__ = "0.1.0+src"
