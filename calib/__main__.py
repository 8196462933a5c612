"""``python -m calib``: the same as the ``calib`` console script."""

from calib.cli import entry

if __name__ == "__main__":
    entry()
