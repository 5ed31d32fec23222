"""Host-side brokers the guest reaches (remote-resource mounts, credentials, programs, browser,
upstream MCP servers). Brokers never import `ubertool.runtime`; policy objects are passed in."""
