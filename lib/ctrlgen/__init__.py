"""ctrlgen — the library behind the executable book of the thesis
"Controllable Generation with Diffusion Models and Applications in Medical Imaging".

Chapters import from here; all real logic lives in this package (DESIGN.md §3).
Heavy dependencies (torch, diffusers) are imported lazily by the submodules that need them,
so ``ctrlgen --help`` and the configuration layer stay fast.
"""
from ctrlgen.config import Config, ConfigError, load_profile, available_profiles

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_profile", "available_profiles", "__version__"]
