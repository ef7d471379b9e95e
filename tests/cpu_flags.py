"""XLA flags for every JAX process of the test suite: this one (`conftest.py` sets them before JAX
starts) and the child processes the tests start (their environments name them).

XLA's CPU collectives abort the whole process (SIGABRT, exit 134) when the simulated devices do not
all reach a collective within 40 s of the first one (`xla_cpu_collective_call_terminate_timeout_
seconds`, XLA's `debug_options_flags.cc`). On 2 cores the 8 device threads run largely one after
another, so a heavy sharded step lags that long on a loaded runner: CI aborted so in
tests/ssl/test_step.py ("only 1 of 8 threads arrived on time"). A real deadlock still ends, at this
timeout, with XLA's message naming the collective.
"""

CPU_COLLECTIVE_FLAGS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1200"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
)
