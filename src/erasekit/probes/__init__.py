"""Probes of whether a concept is erased or only avoided (Lu et al.), each one registered file
(`erasekit.registry.PROBES`). None is implemented yet."""
