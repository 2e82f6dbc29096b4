"""Lab material for the tests, the demo and the benchmarks: images and, later, VMs."""
