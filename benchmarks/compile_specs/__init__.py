"""What the compile report knows about each op (see benchmarks/compile_report.py).

One module per op, beside the kernels it describes: how to call the op's launcher for a
problem, and per kernel its work model (executed FLOPs, exp2 and operand bytes from the grid
and the tiles) and its exp2 tile. Adding or changing a kernel is an edit of its op's module:
a :class:`~benchmarks.compile_types.KernelSpec` in that module's ``KERNELS``.

The report runs without TRITON_INTERPRET (its command refuses it): under the interpreter the
kernel modules build the interpreter's configs, not the GPU's (the tests record launches there).
"""

from benchmarks.compile_specs import cam, pam_backward, pam_forward

SPECS = (pam_forward.SPEC, pam_backward.SPEC, pam_backward.DETERMINISTIC, cam.FORWARD, cam.BACKWARD)
