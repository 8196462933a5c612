"""Package list for setuptools (everything else is in pyproject.toml).

The repo keeps the dashboard in ``apps/`` and the dataset recipes in ``datasets/``; the wheel
ships them inside the ``calib`` distribution as ``calib._apps`` and ``calib._recipes`` (private
names that cannot shadow an installed package such as Hugging Face ``datasets``).
``calib.cli.dashboard.app_path`` and ``calib.data.recipes.recipes_dir`` look there first and
fall back to the source checkout's folders.
"""

from setuptools import find_packages, setup

SHIPPED_FOLDERS = {"calib._apps": "apps", "calib._apps.views": "apps/views", "calib._recipes": "datasets"}

setup(
    packages=find_packages(include=["calib", "calib.*"]) + list(SHIPPED_FOLDERS),
    package_dir=SHIPPED_FOLDERS,
    package_data={"calib._recipes": ["README.md"]},
)
