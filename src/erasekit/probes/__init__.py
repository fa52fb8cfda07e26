"""Probes of whether a concept is erased or only avoided (Lu et al., "When Are Concepts Erased From Diffusion
Models?"), each one registered file (`erasekit.registry.PROBES`) that runs as a scenario of ``erasekit attack``:
inpainting, diffusion completion, noise-based, classifier guidance, interference (the registry imports every module
here on first use). `verdict` holds the likelihood measure and the avoidance-vs-destruction verdict
(`scripts/probe_verdict.py` applies it to a probes bench folder).
"""
