"""otface-plugin: OTFace loss and P x K sampling for InsightFace's arcface_torch recipe."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "otface_plugin" / "__init__.py").read_text()).group(1)

# patches/ and configs/ sit at the repository root (where reviewers look for them) but ship
# inside the package, so an installed wheel can patch a checkout without the source tree.
DATA_PACKAGES = {
    "otface_plugin.patches": "patches",
    "otface_plugin.configs": "configs",
}

setup(
    name="otface-plugin",
    version=VERSION,
    description="OTFace loss (margin softmax + optimal transport on hard triplets) and an "
    "identity-balanced sampler for InsightFace's arcface_torch recipe",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["otface_plugin", "otface_plugin.*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
    package_data={
        "otface_plugin.patches": ["*.patch", "*.md", "NOTICE*"],
        "otface_plugin.configs": ["*.py", "*.yaml", "*.yml", "*.md"],
    },
    include_package_data=False,
    # Floors = the versions .ci/lowest_deps.sh runs the tests with (.ci/lowest-deps.txt; a test
    # keeps the two equal). torch is not varied there: tested with 2.13.0 and 2.14.1.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23.2",
        "pillow>=9.2",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "easydict>=1.12",  # 1.9-1.11 turn tuples (margin_list) into lists
    ],
    extras_require={
        "test": ["pytest>=7.0", "pot>=0.9.7", "geomloss>=0.2.6", "matplotlib>=3.6"],  # pot 0.9.6: solve_batch(solver=)
        "bench": ["pot>=0.9.7", "geomloss>=0.2.6", "matplotlib>=3.6"],
    },
    entry_points={
        "console_scripts": [
            "otface-data=otface_plugin.data.cli:main",
            "otface-install=otface_plugin.arcface_torch.installer:main",
            "otface-train=otface_plugin.arcface_torch.train_wrapper:main",
            "otface-demo=otface_plugin.demo:main",
            "otface-bench=otface_plugin.bench.cli:main",
            "otface-ckpt=otface_plugin.arcface_torch.checkpoint:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
