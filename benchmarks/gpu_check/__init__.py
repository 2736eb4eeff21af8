"""The CUDA path of covnet, proven in one prepared run on a GPU machine (issue 15): ``python -m benchmarks.gpu_check
OUTDIR`` (README, "GPU"). ``--dry-run`` runs every step on the CPU at tiny sizes; tests/test_gpu_check.py runs it.

Modules: ``__main__`` (the command), ``runner`` (budget, guarded steps, JSON and log), ``steps`` (what is
measured), ``workers`` (the parts that run in processes of their own), ``data`` (phantom workspaces and models
through covnet's commands), ``agreement`` (CPU against device predictions, for tests/test_cuda.py), ``packing``
(wheels and the CT made small enough to travel), ``scale`` (sizes and time estimates of the real and the dry run),
``speed`` (the steps on the training step's speed: its profile, worker ``stepprofile``, and its variants, worker
``variants``).
"""
