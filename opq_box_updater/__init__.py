"""OPQ Box Updater: secure remote updates for the OPQ Box fleet."""

__version__ = "1.1.0"
