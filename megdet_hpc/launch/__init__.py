"""Launching, in one place: the launcher vocabulary (``names``), where a process sits in a job
(``environment``), Slurm from inside a job (``slurm``: requeue, node list, master address), what a Slurm
job asks for (``resources``: shared by sbatch and submitit), sbatch scripts from one template
(``sbatch``), the submitit launcher (``submitit_launcher``) and local launcher command lines (``local``).
``python -m megdet_hpc.launch`` offers them as the subcommands ``submitit`` (default), ``sbatch`` and
``local``."""
