"""Settings for every test run (tests/ and the nbval notebooks): tiny models on a small CPU.

One intra-op thread per process: the tiny test models are too small to gain from more, and with pytest, a notebook
kernel and torch's spinning worker threads sharing two cores, more threads made the suite several times slower.
Notebook kernels inherit the variable.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
