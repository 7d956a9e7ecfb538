"""edgec: compile models for edge devices and deliver them over the air.

This package is the command line and the wire contract shared by the compiler, the OTA
server and the on-device agent. It imports only the standard library and pydantic, so
``edgec --help`` stays fast and the agent can depend on it without ML packages.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
