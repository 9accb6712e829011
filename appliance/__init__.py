"""csghub-appliance: build a ready-to-run VirtualBox appliance (OVA) of CSGHub."""

__version__ = "0.1.0"
