"""spinbot: a practice gym for SPIN Selling."""

__version__ = "0.1.0"
