"""Packaging beyond setup.cfg: the presets' source of truth is the top-level ``configs/presets/`` folder, which
the wheel carries inside the package as ``gptq_tools/configs/presets/`` (read with importlib.resources)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gptq_tools*"]), "gptq_tools.configs"],
    package_dir={"gptq_tools.configs": "configs"},
    package_data={"gptq_tools.configs": ["presets/*.json"], "gptq_tools.runtime.kernels": ["csrc/*.c"]},
)
