"""Run the Triton kernels on CPU: the interpreter must be chosen before any @triton.jit runs.

serve.kernels imports its Triton modules lazily, so setting the variable here (conftest files are
imported before the test modules) is early enough.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
