"""Host-side brokers the guest reaches (remote-resource mounts, credentials, programs, browser,
upstream MCP servers). Brokers never import `ubertool.runtime`; policy objects are passed in."""


class ToolFailure(Exception):
    """A host tool's failure whose message the guest may read (any other error shows it only
    that the tool failed)."""
