"""What the Snakefile's rules call: one rank's job (`rank_job`: on the run's warm engines
or on an engine of its own, its failure note).

The top of the runtime: may import every package below it (formats/, placement/,
engine/, rank/, model/, reporting/); nothing of scripts/ imports it.
"""
