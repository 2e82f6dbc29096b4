"""Hypervisor connectors: each turns a hypervisor into (NBD export, extent map, configuration)."""
