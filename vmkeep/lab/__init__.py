"""The lab: VMs, certificates and networks that the tests, the demo and the benchmarks build."""

LOCAL_URI = "qemu:///system"
