"""What a run tells its user: the progress lines (`progress`), the run summary and its
plot (`summary`), where the node-hours went (`accounting`, `timeline`).

May import formats/ (it reads the records, the registry and the failure notes through
their owners), console and placement/. The PBS provider's status rounds and the
Snakefile import it.
"""
