"""libvirt/QEMU through vagrant-libvirt: the provider class (``provider``), its export (``export``)."""
