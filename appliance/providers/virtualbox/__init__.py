"""VirtualBox: the provider class (``provider``), its export through VBoxManage (``export``)."""
