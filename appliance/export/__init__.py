"""Export stage: turn a halted VM into an OVA (one module per provider, plus the OVF/OVA writer)."""
