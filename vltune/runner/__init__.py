"""Turning experiment files into jobs and running them: the experiment-file schema (``schema``), job expansion
(``jobs``), the scheduler with its lanes and slots (``scheduler``), the executors (``executor``: a fresh process per
job or, by default, a child forked from a warm worker, ``warm``; ``ray_executor``: a Ray cluster), progress, locks."""
