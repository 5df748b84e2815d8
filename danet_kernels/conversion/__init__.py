"""The parts of :func:`danet_kernels.convert`: what replaces what (``replacements``), how a module's
structure proposes readings (``recognition``) and how a reading is checked against the module
(``verification``). The public entry point is :mod:`danet_kernels.convert`."""
