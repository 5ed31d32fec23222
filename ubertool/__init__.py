"""ubertool: a secure runtime for agent-written code (one stateful Python tool, jailed in WebAssembly)."""

__version__ = "0.1.0"
