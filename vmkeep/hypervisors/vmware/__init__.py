"""VMware vSphere (vCenter or a standalone ESXi) through the vSphere API (pyvmomi)."""
