"""The test suite, one folder per package of dcablate/ (config/, models/, kernels/, tasks/, training/, runs/,
bench/) and the whole-tool tests here. Every folder is a package, so pytest imports a test module as
`tests.<folder>.<module>` with the repository root on sys.path: equal basenames in two folders do not clash,
and the shared helpers here are imported as `tests.tiny_recipes`, `tests.faults`, `tests.triton_interpreter`
and `tests.gpu_compare`."""
