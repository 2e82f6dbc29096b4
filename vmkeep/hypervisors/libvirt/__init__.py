"""KVM through libvirt: checkpoints, pull-mode backup jobs, persistent qcow2 dirty bitmaps."""
