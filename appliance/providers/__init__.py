"""The hypervisors behind one interface: ``base.Provider``, one folder per provider (``libvirt/``,
``virtualbox/``), and ``registry.provider_for``, which picks one for a resolved configuration.

Nothing outside this package branches on the provider's name: ask the provider instead.
"""
