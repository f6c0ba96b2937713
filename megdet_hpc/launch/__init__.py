"""Launching, in one place: where a process sits in a job (``environment``), Slurm from inside a job
(``slurm``: requeue, master address), sbatch scripts from one template (``sbatch``), the submitit
launcher (``submitit_launcher``) and local launcher command lines (``local``).
``python -m megdet_hpc.launch`` offers them as the subcommands ``submitit`` (default), ``sbatch`` and
``local``."""
