"""ssapo: Stackelberg Self-Annotated Preference Optimization."""

__version__ = "0.1.0"
