"""Thread-count environment for the PyTorch reference scripts.

The BLAS and OpenMP pools read their variables once, when torch is imported, so a
script calls `threadenv.apply(sys.argv)` before `import torch`.
"""
import os


def from_argv(argv):
    """The value of --threads N / --threads=N in argv, else the number of CPUs."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return os.cpu_count() or 1


def apply(argv):
    n = str(from_argv(argv))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = n
